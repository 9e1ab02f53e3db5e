"""PRNG keys carried in transform states.

Keys are stored as raw ``uint32`` key data, which checkpoints (orbax) and
``jax.ShapeDtypeStruct`` handle like any other array; they are wrapped back
into typed keys only to draw.
"""

from __future__ import annotations

import jax
import numpy as np


def key_data(key) -> jax.Array:
  """Raw key data from an int seed, a typed key or raw key data."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jax.numpy.asarray(key, jax.numpy.uint32)


def next_key(data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(new_key_data, subkey)``: advance the carried key and draw a typed subkey."""
  key, sub = jax.random.split(jax.random.wrap_key_data(data))
  return jax.random.key_data(key), sub
