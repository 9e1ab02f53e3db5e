"""Trace and compile time of one train step as the parameter tree gets more leaves.

The model of ``gradient_paths.py`` made deep and narrow: an MLP trunk of
``depth`` layers of width 64 shared by ``K`` linear heads, so the tree has
``2 depth + 2 K`` leaves, the count that matters here. For each depth, each step is
built from scratch (``jax.clear_caches()``), lowered (``trace_s``: tracing and
lowering to StableHLO) and compiled (``compile_s``: XLA); ``instructions`` is
the number of HLO instructions in the compiled program and ``and_ops`` the
number of its ``and`` ops (the symptom of the flag duplication that the
non-finite policy used to suffer, see ``optax_mtl._src.aggregation.all_finite``);
``while_loops`` counts its loops and ``data_dependent_loops`` those without a
trip count known to XLA (a solver's convergence test): XLA:GPU runs such a loop
from the host, copying its predicate back and waiting for the stream at every
iteration, where a loop of known trip count is launched without a wait.
Steps, each with ``optax.adam`` and ``optax.apply_updates``:

- ``sum_grad``: ``jax.grad`` of the summed loss, no ``optax_mtl`` (the floor);
- ``linear_scalarization``: on the lazy ``task_gradients`` (one backward pass);
- ``nash_mtl``, ``mgda``, ``upgrad``, ``graddrop``: on ``value_and_jacobian``
  with ``shared=`` the trunk;
- ``nash_mtl_cached``: ``task_gradients`` with ``update_weights_every=50``
  (both branches of the refresh in one program);
- ``feature_level_mgda``: ``feature_task_gradients`` with MGDA-UB.

Each entry also gets ``ratio_to_sum_grad``: its trace + compile time over
``sum_grad``'s at the same depth. Times are the median of ``--repeats``
fresh builds.

  python benchmarks/compile_time.py          # writes results/compile_time_<platform>.json
  python benchmarks/compile_time.py --depths 8 32 --tasks 4
  python benchmarks/compile_time.py --tiny --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import gradient_paths as mlp  # noqa: E402
import train_step  # noqa: E402  (the step builders shared with the timing benchmark)

LEARNING_RATE = 1e-4
CACHED_EVERY = 50

# name -> (factory num_tasks -> transform, gradient path), the train-step benchmark's where it has
# the step; "sum_grad" has no transform.
STEPS = {
    "sum_grad": (None, None),
    **{name: train_step.METHODS[name] for name in ("linear_scalarization", "nash_mtl", "mgda", "upgrad",
                                                   "graddrop")},
    "nash_mtl_cached": (lambda k: optax_mtl.nash_mtl(k, shared=train_step.SHARED,
                                                     update_weights_every=CACHED_EVERY), "lazy"),
    "feature_level_mgda": (train_step.FEATURE_METHODS["mgda"], "feature"),
}
GRADIENT_PATHS = {"jacobian": train_step.jacobian_grads, "lazy": train_step.lazy_grads,
                  "feature": train_step.feature_grads}


def build(name: str, k: int):
  """``(step, init)`` for one entry of ``STEPS``."""
  adam = optax.adam(LEARNING_RATE)
  factory, path = STEPS[name]
  if factory is None:
    return train_step.sum_grad_step(adam), adam.init
  tx = optax.chain(factory(k), adam)
  return train_step.apply_step(tx, GRADIENT_PATHS[path](None)), tx.init


def measure(name: str, k: int, params, x, y) -> dict:
  jax.clear_caches()
  step, init = build(name, k)
  opt_state = init(params)
  start = time.perf_counter()
  lowered = jax.jit(step).lower(params, opt_state, x, y)
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  text = compiled.as_text()
  lines = text.splitlines()
  instructions = sum(1 for line in lines if line.lstrip().startswith(("%", "ROOT ")))
  loops = [line for line in lines if " while(" in line]
  return {"trace_s": traced - start, "compile_s": done - traced, "instructions": instructions,
          "and_ops": text.count(" and("), "while_loops": len(loops),
          "data_dependent_loops": sum("known_trip_count" not in line for line in loops)}


def run(args) -> dict:
  rows = []
  for depth in args.depths:
    params = mlp.init_params(jax.random.key(0), args.width, args.width, depth, args.tasks, args.head_dim)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.width)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(args.batch, args.tasks, args.head_dim)), jnp.float32)
    steps = {}
    for name in args.only or STEPS:
      samples = [measure(name, args.tasks, params, x, y) for _ in range(args.repeats)]
      entry = {key: statistics.median(s[key] for s in samples) for key in ("trace_s", "compile_s")}
      entry.update({key: samples[0][key] for key in ("instructions", "and_ops", "while_loops",
                                                     "data_dependent_loops")}, repeats=args.repeats)
      steps[name] = entry
      print(f"depth {depth:4d} {name:<22} trace {entry['trace_s']:7.2f} s  compile {entry['compile_s']:7.2f} s"
            f"  {entry['instructions']:8d} instructions  {entry['and_ops']:7d} and"
            f"  {entry['while_loops']:3d} loops, {entry['data_dependent_loops']} data-dependent", flush=True)
    if "sum_grad" in steps:
      floor = steps["sum_grad"]["trace_s"] + steps["sum_grad"]["compile_s"]
      for entry in steps.values():
        entry["ratio_to_sum_grad"] = (entry["trace_s"] + entry["compile_s"]) / floor
    rows.append({"depth": depth, "leaves": len(jax.tree.leaves(params)), "steps": steps})
  return {
      "benchmark": "compile_time",
      "environment": common.environment(),
      "sizes": {"depths": list(args.depths), "width": args.width, "num_tasks": args.tasks,
                "batch": args.batch, "head_dim": args.head_dim},
      "rows": rows,
  }


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", type=int, nargs="+", default=[8, 32, 96])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--only", nargs="+", choices=sorted(STEPS), default=None,
                      help="time only these steps (sum_grad, the floor, is kept for the ratios)")
  parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.only and "sum_grad" not in args.only:
    args.only = ["sum_grad", *args.only]
  if args.tiny:
    args.depths, args.width, args.tasks, args.batch, args.head_dim = [1, 3], 8, 2, 4, 2
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  result = run(args)
  path = common.write(result, args.out, f"compile_time_{result['environment']['platform']}.json")
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
