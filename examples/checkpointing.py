"""Checkpointing with orbax: the whole optimizer state, method state included.

Trains with a multi-task transform whose state matters (weights reused for
``update_weights_every`` steps, the step count, Adam's moments), saves params
and optimizer state mid-training with orbax, restores them into freshly
initialised structures and continues. The continued run equals the
uninterrupted one exactly.

  python examples/checkpointing.py --steps 20 --save-at 7
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_mtl

NUM_TASKS = 3


def init_params(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "trunk": jax.random.normal(k1, (8, 16)) / jnp.sqrt(8.0),
      "heads": jax.random.normal(k2, (16, NUM_TASKS)) / 4.0,
  }


def batch(step: int):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = np.stack([x[:, 0], 10 * x[:, 1] ** 2, np.sin(x[:, 2])], axis=-1).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def task_losses(params, x, y):
  preds = jnp.tanh(x @ params["trunk"]) @ params["heads"]
  return jnp.mean((preds - y) ** 2, axis=0)


def make_tx():
  aggregator = optax_mtl.weighted_aggregation(
      NUM_TASKS,
      lambda gram: 1.0 / jnp.sqrt(jnp.diag(gram) + 1e-12),
      shared={"trunk": True, "heads": False},
      update_weights_every=4,
  )
  return optax.chain(aggregator, optax.adam(1e-2))


@jax.jit
def train_step(params, opt_state, x, y):
  grads = optax_mtl.task_gradients(task_losses)(params, x, y)
  updates, opt_state = make_tx().update(grads, opt_state, params)
  return optax_mtl.apply_updates(params, updates), opt_state


def run(params, opt_state, start: int, stop: int):
  for step in range(start, stop):
    params, opt_state = train_step(params, opt_state, *batch(step))
  return params, opt_state


def save(directory: pathlib.Path, params, opt_state) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, {"params": params, "opt_state": opt_state})


def restore(directory: pathlib.Path):
  """Restores into the structure (NamedTuples included) of a fresh init."""
  params = init_params()
  target = {"params": params, "opt_state": make_tx().init(params)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory, abstract)
  return restored["params"], restored["opt_state"]


def interrupted_equals_uninterrupted(steps: int, save_at: int, workdir: pathlib.Path) -> bool:
  params = init_params()
  opt_state = make_tx().init(params)
  reference = run(params, opt_state, 0, steps)

  params, opt_state = run(params, opt_state, 0, save_at)
  save(workdir / f"step_{save_at}", params, opt_state)
  del params, opt_state
  params, opt_state = restore(workdir / f"step_{save_at}")
  resumed = run(params, opt_state, save_at, steps)

  same_structure = jax.tree.structure(resumed) == jax.tree.structure(reference)
  same_values = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)))
  return same_structure and same_values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--save-at", type=int, default=7)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    same = interrupted_equals_uninterrupted(args.steps, args.save_at, pathlib.Path(workdir))
  print(f"saved at step {args.save_at}, restored and continued to step {args.steps}:"
        f" {'identical to' if same else 'DIFFERENT from'} the uninterrupted run")
  if not same:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
