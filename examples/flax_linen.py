"""Flax Linen integration: a ``TrainState`` that forwards the task losses.

``flax.training.train_state.TrainState.apply_gradients`` calls
``tx.update(grads, opt_state, params)`` without extra arguments, so methods
that read ``task_losses`` would never see them. ``MultiTaskTrainState``
forwards any keyword arguments to ``tx.update``.

  python examples/flax_linen.py --steps 300
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax_mtl

NUM_TASKS = 3


class MultiTaskTrainState(train_state.TrainState):
  """``TrainState`` whose ``apply_gradients`` forwards extra args to ``tx.update``."""

  def apply_gradients(self, *, grads: Any, **extra_args) -> "MultiTaskTrainState":
    updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    new_params = optax_mtl.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state)


class MultiTaskMLP(nn.Module):
  num_tasks: int
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, name="trunk_0")(x))
    h = nn.gelu(nn.Dense(self.hidden, name="trunk_1")(h))
    return jnp.concatenate([nn.Dense(1, name=f"head_{i}")(h) for i in range(self.num_tasks)], axis=-1)


def make_data(num_examples: int = 1024, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, 8)).astype(np.float32)
  z = x @ rng.normal(size=(8,)).astype(np.float32) / np.sqrt(8)
  y = np.stack([np.sin(2 * z), z**2, 30 * np.cos(z)], axis=-1).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def trunk_only(params):
  return {"params": {name: name.startswith("trunk") for name in params["params"]}}


def create_state(seed: int = 0) -> MultiTaskTrainState:
  model = MultiTaskMLP(NUM_TASKS)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8)))
  aggregator = optax_mtl.weighted_aggregation(
      NUM_TASKS, lambda gram: 1.0 / jnp.sqrt(jnp.diag(gram) + 1e-12), shared=trunk_only)
  tx = optax.chain(aggregator, optax.adam(3e-3))
  return MultiTaskTrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(state: MultiTaskTrainState, x, y):
  def losses_of(params):
    return jnp.mean((state.apply_fn(params, x) - y) ** 2, axis=0)

  losses, per_task_grads = optax_mtl.value_and_jacobian(losses_of)(state.params)
  return state.apply_gradients(grads=per_task_grads, task_losses=losses), losses


def train(steps: int, seed: int = 0):
  x, y = make_data(seed=seed)
  state = create_state(seed)
  losses = None
  for _ in range(steps):
    state, losses = train_step(state, x, y)
  return state, np.asarray(losses)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  state, losses = train(args.steps)
  print("final losses:", np.round(losses, 4))
  print("last weights:", np.round(np.asarray(optax.tree.get(state.opt_state, "weights")), 4))


if __name__ == "__main__":
  main()
