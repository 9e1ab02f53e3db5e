"""Flax NNX integration: optax_mtl inside ``nnx.Optimizer`` and in a lazy-gradient step.

Two ways to train an NNX model with a multi-task transform:

1. ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, per_task_grads,
   task_losses=losses)``: the per-task gradients come from
   ``optax_mtl.value_and_jacobian`` on the model's ``nnx.Param`` state, and the
   losses travel as an extra argument.
2. The lazy path: ``optax_mtl.task_gradients`` hands the transform one forward
   pass; with ``update_weights_every > 1`` the steps in between cost one
   backward pass. ``nnx.Optimizer.update`` expects a gradient tree, so this
   step calls ``tx.update`` itself and writes the params back with
   ``nnx.update``.

  python examples/flax_nnx.py --steps 300
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_mtl

NUM_TASKS = 3


class MultiTaskMLP(nnx.Module):
  """A shared trunk and one linear head per task."""

  def __init__(self, num_tasks: int, features: int = 8, hidden: int = 32, *, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
        nnx.Linear(features, hidden, rngs=rngs), jax.nn.gelu,
        nnx.Linear(hidden, hidden, rngs=rngs), jax.nn.gelu,
    )
    self.heads = nnx.List([nnx.Linear(hidden, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, x):
    h = self.trunk(x)
    return jnp.concatenate([head(h) for head in self.heads], axis=-1)


def make_data(num_examples: int = 1024, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, 8)).astype(np.float32)
  z = x @ rng.normal(size=(8,)).astype(np.float32) / np.sqrt(8)
  y = np.stack([np.sin(2 * z), z**2, 30 * np.cos(z)], axis=-1).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def mse_per_task(model: MultiTaskMLP, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)  # (K,)


def trunk_only(params):
  """The shared= mask: True on the trunk's parameters (params is an nnx.State)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", params)


def make_tx(update_weights_every: int = 1):
  aggregator = optax_mtl.weighted_aggregation(
      NUM_TASKS,
      # Inverse-norm weighting: every task's shared gradient gets unit norm.
      lambda gram: 1.0 / jnp.sqrt(jnp.diag(gram) + 1e-12),
      shared=trunk_only,
      update_weights_every=update_weights_every,
  )
  return optax_mtl.checked(optax.chain(aggregator, optax.adam(3e-3)))


@nnx.jit
def optimizer_step(model: MultiTaskMLP, optimizer: nnx.Optimizer, x, y):
  """Path 1: explicit per-task gradients through ``nnx.Optimizer.update``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses_of(params):
    return mse_per_task(nnx.merge(graphdef, params, rest), x, y)

  losses, per_task_grads = optax_mtl.value_and_jacobian(losses_of)(params)
  optimizer.update(model, per_task_grads, task_losses=losses)
  return losses


@jax.jit
def lazy_step(graphdef, params, rest, opt_state, x, y):
  """Path 2: lazy task gradients; pure function of the split model."""
  tx = make_tx(update_weights_every=5)

  def losses_of(params):
    return mse_per_task(nnx.merge(graphdef, params, rest), x, y)

  grads = optax_mtl.task_gradients(losses_of)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax_mtl.apply_updates(params, updates), opt_state, grads.losses


def train_with_optimizer(steps: int, seed: int = 0):
  x, y = make_data(seed=seed)
  model = MultiTaskMLP(NUM_TASKS, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  losses = mse_per_task(model, x, y)
  for _ in range(steps):
    losses = optimizer_step(model, optimizer, x, y)
  weights = optax.tree.get(nnx.as_pure(optimizer.opt_state), "weights")
  return model, np.asarray(losses), np.asarray(weights)


def train_lazy(steps: int, seed: int = 0):
  x, y = make_data(seed=seed)
  model = MultiTaskMLP(NUM_TASKS, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)
  opt_state = make_tx(update_weights_every=5).init(params)
  losses = mse_per_task(model, x, y)
  for _ in range(steps):
    params, opt_state, losses = lazy_step(graphdef, params, rest, opt_state, x, y)
  nnx.update(model, params)
  return model, np.asarray(losses), np.asarray(optax.tree.get(opt_state, "weights"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  x, y = make_data()
  initial = np.asarray(mse_per_task(MultiTaskMLP(NUM_TASKS, rngs=nnx.Rngs(0)), x, y))
  print("initial losses:          ", np.round(initial, 4))
  _, losses, weights = train_with_optimizer(args.steps)
  print("nnx.Optimizer path:      ", np.round(losses, 4), "weights", np.round(weights, 4))
  _, losses, weights = train_lazy(args.steps)
  print("lazy path (every 5 steps):", np.round(losses, 4), "weights", np.round(weights, 4))


if __name__ == "__main__":
  main()
