"""Peak device memory of one train step on each gradient path, and the largest trunk that fits.

The model of ``gradient_paths.py`` (an MLP trunk shared by ``K`` linear heads,
batch 256, Adam) with Nash-MTL (``shared=`` the trunk) on every per-task path.
Each step is jitted with the params and the optimizer state donated, as a
training loop would, and compiled on abstract inputs (nothing is allocated to
compile it). Paths:

- ``sum_grad``: one backward pass of the summed loss, no ``optax_mtl`` (the floor);
- ``jacobian``: ``value_and_jacobian(batch_size=K)`` (vectorised on every
  backend: the ``K x params`` Jacobian and the K backward passes'
  intermediates at once);
- ``jacobian_chunked_<b>``: the same with ``batch_size=b`` (``lax.map`` over
  chunks of ``b`` backward passes);
- ``streamed``: ``task_gradients(store_jacobian=False)`` (the Gram from K VJPs
  and K JVPs; no Jacobian is stored);
- ``cached``: ``task_gradients`` with ``update_weights_every=50`` (one program
  holding both branches, so its peak is the refresh branch's);
- ``feature_level``: ``feature_task_gradients`` with MGDA-UB (the Jacobian of
  the features only).

``cached`` and ``feature_level`` use the default ``batch_size=None``
(vectorised; the committed CPU results were taken while that default meant
one backward pass at a time on CPU).

Two numbers per path: ``compiled_peak_bytes``, from XLA's buffer assignment for
the program (``Compiled.memory_analysis()``: arguments + outputs + temporaries
- donated aliases, an upper bound of the live peak); and, where
the device reports allocator statistics (GPU, TPU), ``measured_peak_bytes``,
the allocator's peak while a fresh process runs two steps. The search part
doubles the trunk width (depth 4) until the compiled peak of each path exceeds
the device's memory (GPU: the allocator's limit; CPU: the host's physical
memory) and bisects between the last width that fits and the first that does
not, to 64 columns.

  python benchmarks/memory.py                 # writes results/memory_<platform>.json
  python benchmarks/memory.py --tiny --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import gradient_paths as model  # noqa: E402
import train_step  # noqa: E402  (the step builders shared with the timing benchmark)

LEARNING_RATE = 1e-4
CACHED_EVERY = 50


def transform(path: str, k: int):
  if path == "feature_level":
    return optax_mtl.mgda(k)
  every = CACHED_EVERY if path == "cached" else 1
  return optax_mtl.nash_mtl(k, shared=train_step.SHARED, update_weights_every=every)


def grads_of(path: str, k: int):
  if path == "jacobian":
    return train_step.jacobian_grads(k)
  if path.startswith("jacobian_chunked_"):
    return train_step.jacobian_grads(int(path.rsplit("_", 1)[1]))
  if path == "cached":
    return train_step.lazy_grads(None)
  if path == "feature_level":
    return train_step.feature_grads(None)
  if path == "streamed":
    def streamed(params, x, y):
      grads = optax_mtl.task_gradients(model.task_losses, store_jacobian=False)(params, x, y)
      return grads.losses, grads
    return streamed
  raise ValueError(f"unknown path {path!r}")


def build(path: str, k: int, args, width: int):
  """``(jitted step, abstract (params, opt_state, x, y))`` of ``path`` for a trunk of ``width``."""
  adam = optax.adam(LEARNING_RATE)
  if path == "sum_grad":
    tx, step = adam, train_step.sum_grad_step(adam)
  else:
    tx = optax.chain(transform(path, k), adam)
    step = train_step.apply_step(tx, grads_of(path, k))
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), args.features, width, args.depth, k,
                                                    args.head_dim))
  opt_state = jax.eval_shape(tx.init, params)
  x = jax.ShapeDtypeStruct((args.batch, args.features), jnp.float32)
  y = jax.ShapeDtypeStruct((args.batch, k, args.head_dim), jnp.float32)
  return jax.jit(step, donate_argnums=(0, 1)), (params, opt_state, x, y)


def compiled_peak(path: str, k: int, args, width: int) -> dict:
  step, abstract = build(path, k, args, width)
  stats = step.lower(*abstract).compile().memory_analysis()
  # XLA:CPU's peak_memory_in_bytes leaves the temporaries out (it is about the
  # arguments' size on every path), so the peak is bounded by the buffer
  # assignment's totals instead; the temporaries already reflect buffer reuse.
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
  trunk = sum(leaf.size for leaf in jax.tree.leaves(abstract[0]["trunk"]))
  return {"width": width, "trunk_params": int(trunk), "compiled_peak_bytes": int(peak),
          "argument_bytes": int(stats.argument_size_in_bytes), "temp_bytes": int(stats.temp_size_in_bytes),
          "xla_reported_peak_bytes": int(getattr(stats, "peak_memory_in_bytes", 0))}


def measured_peak(path: str, k: int, args, width: int) -> int | str | None:
  """The allocator's peak over two real steps, in a fresh process (the peak counter cannot be reset).

  None where the backend keeps no allocator statistics (CPU); the child's error, as a string, where
  it failed (out of memory, say), so that one path's failure leaves the other rows.
  """
  if jax.devices()[0].memory_stats() is None:
    return None
  command = [sys.executable, __file__, "--measure-one", path, "--ks", str(k), "--width", str(width),
             "--batch", str(args.batch), "--features", str(args.features), "--depth", str(args.depth),
             "--head-dim", str(args.head_dim)]
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  if out.returncode:
    return f"exit {out.returncode}: " + (out.stderr.strip().splitlines() or [""])[-1][-300:]
  return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes_in_use"])


def measure_one(args) -> None:
  path, k, width = args.measure_one, args.ks[0], args.width
  step, abstract = build(path, k, args, width)
  params = model.init_params(jax.random.key(0), args.features, width, args.depth, k, args.head_dim)
  tx_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract[1])
  x, y = (jnp.ones(s.shape, s.dtype) for s in abstract[2:])
  for _ in range(2):
    params, tx_state = step(params, tx_state, x, y)
  jax.block_until_ready(params)
  print(json.dumps({"peak_bytes_in_use": jax.devices()[0].memory_stats()["peak_bytes_in_use"]}))


def device_budget() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]), "allocator bytes_limit"
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host physical memory"


def largest_width(path: str, k: int, args, budget: int) -> dict:
  """The widest trunk (a multiple of 64) whose compiled peak fits in ``budget``."""
  fits, fails, last = None, None, None
  width = args.width
  while fails is None and width <= args.max_width:
    entry = compiled_peak(path, k, args, width)
    if entry["compiled_peak_bytes"] <= budget:
      fits, last, width = width, entry, width * 2
    else:
      fails = width
  if fails is None:
    return {**last, "bounded_by": f"--max-width {args.max_width}"}
  if fits is None:
    return {"width": None, "note": f"width {fails} does not fit"}
  while fails - fits > 64:
    mid = (fits + fails) // 2 // 64 * 64
    entry = compiled_peak(path, k, args, mid)
    if entry["compiled_peak_bytes"] <= budget:
      fits, last = mid, entry
    else:
      fails = mid
  return {**last, "first_width_over": fails}


def run(args) -> dict:
  budget, budget_source = device_budget()
  rows = []
  for k in args.ks:
    paths = {}
    for path in args.paths:
      entry = compiled_peak(path, k, args, args.width)
      entry["measured_peak_bytes"] = measured_peak(path, k, args, args.width) if args.measure else None
      paths[path] = entry
    floor = paths["sum_grad"]["compiled_peak_bytes"]
    for entry in paths.values():
      entry["ratio_to_sum_grad"] = entry["compiled_peak_bytes"] / floor
    row = {"K": k, "paths": paths}
    if k in args.search_ks:
      row["largest_trunk"] = {path: largest_width(path, k, args, budget) for path in args.search_paths}
    rows.append(row)
    report(row)
  return {
      "benchmark": "memory",
      "environment": common.environment(),
      "budget": {"bytes": budget, "source": budget_source},
      "sizes": {"batch": args.batch, "features": args.features, "width": args.width, "depth": args.depth,
                "head_dim": args.head_dim},
      "settings": {"method": "nash_mtl(shared=trunk) on the per-task paths, mgda (UB) on the feature level",
                   "optimizer": f"adam({LEARNING_RATE})", "donated": "params and optimizer state",
                   "cached_every": CACHED_EVERY},
      "rows": rows,
  }


def report(row):
  print(f"K = {row['K']}")
  for name, entry in row["paths"].items():
    measured = entry["measured_peak_bytes"]
    if isinstance(measured, int):
      measured = f"  measured {measured / 2**20:9.1f} MiB"
    else:
      measured = "" if measured is None else f"  measured: {measured}"
    print(f"  {name:<22}{entry['compiled_peak_bytes'] / 2**20:>10.1f} MiB  x{entry['ratio_to_sum_grad']:.2f}{measured}")
  for name, entry in row.get("largest_trunk", {}).items():
    if entry.get("width"):
      print(f"  largest trunk {name:<22} width {entry['width']:>6}  {entry['trunk_params'] / 1e6:8.1f}M params")
    else:
      print(f"  largest trunk {name:<22} {entry['note']}")
  sys.stdout.flush()


PATHS = ("sum_grad", "jacobian", "jacobian_chunked_1", "jacobian_chunked_5", "streamed", "cached", "feature_level")


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
  parser.add_argument("--search-ks", type=int, nargs="*", default=[10])
  parser.add_argument("--paths", nargs="+", default=list(PATHS))
  parser.add_argument("--search-paths", nargs="+", default=list(PATHS))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--features", type=int, default=256)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=8)
  parser.add_argument("--max-width", type=int, default=65536)
  parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                      help="also run each path in a fresh process for the allocator's peak (GPU/TPU only)")
  parser.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.tiny:
    args.ks, args.search_ks, args.batch, args.features, args.width, args.depth, args.head_dim = [3], [3], 8, 8, 64, 2, 2
    args.max_width, args.search_paths = 256, ["sum_grad", "jacobian"]
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  if args.measure_one:
    measure_one(args)
    return {}
  result = run(args)
  path = common.write(result, args.out, f"memory_{result['environment']['platform']}.json")
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
