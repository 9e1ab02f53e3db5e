"""Small multi-task problems shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TASKS = 3
WIDTH = 16  # divisible by the 8 fake devices, so every trunk leaf can be sharded
HIDDEN = 8


def init_params(num_tasks: int = NUM_TASKS, seed: int = 0, dtype=jnp.float32) -> dict:
  """A two-layer trunk shared by all tasks and one linear head per task."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), dtype)
  return {
      "trunk": {"w": normal(WIDTH, HIDDEN), "b": jnp.zeros((HIDDEN,), dtype)},
      "heads": {f"task{i}": normal(HIDDEN) for i in range(num_tasks)},
  }


def make_batch(num_tasks: int = NUM_TASKS, seed: int = 1, batch: int = 32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, WIDTH)).astype(np.float32)
  # Tasks of very different scales, so the weightings have something to do.
  scales = np.logspace(0, 1, num_tasks)
  y = rng.normal(size=(batch, num_tasks)).astype(np.float32) * scales
  return jnp.asarray(x), jnp.asarray(y)


def encoder(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """The trunk's ``(batch, HIDDEN)`` representation ``z``."""
  del y
  trunk = jax.tree.map(lambda p: p.astype(jnp.float32), params["trunk"])
  return jnp.tanh(x @ trunk["w"] + trunk["b"][None, :])


def heads_per_task(params: dict, zs: list, x: jax.Array, y: jax.Array) -> jax.Array:
  """The heads for ``per_task_heads=K``: task i reads only its own copy ``zs[i]``."""
  del x
  heads = params["heads"]
  preds = jnp.stack([zs[i] @ heads[f"task{i}"].astype(jnp.float32) for i in range(len(heads))], axis=-1)
  return jnp.mean((preds - y) ** 2, axis=0)


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """``(K,)`` mean squared errors, one per head."""
  return heads_per_task(params, [encoder(params, x, y)] * len(params["heads"]), x, y)


@jax.jit
def per_task_gradients(params: dict, x: jax.Array, y: jax.Array):
  """Losses and the per-task gradient tree, every leaf ``(K, *param.shape)``."""
  losses = task_losses(params, x, y)
  jac = jax.jacrev(task_losses)(params, x, y)
  return losses, jax.tree.map(lambda j, p: j.astype(p.dtype), jac, params)


def is_shared(params: dict) -> dict:
  return {"trunk": True, "heads": False}


def mesh_devices(count: int) -> list:
  """``count`` devices for a test mesh: the default backend's, or else conftest's fake CPU ones.

  A one-GPU machine has too few of its own; there the sharded side of a test runs on the CPU.
  """
  devices = jax.devices()
  if len(devices) < count:
    devices = jax.devices("cpu")
  return devices[:count]
