"""PRNG keys carried in transform states.

Keys are stored as raw ``uint32`` key data, which checkpoints (orbax) and
``jax.ShapeDtypeStruct`` handle like any other array; they are wrapped back
into typed keys, of the implementation they came with, only to draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_data(key) -> tuple[jax.Array, object]:
  """``(raw key data, implementation)`` from a seed, a typed key or raw key data.

  A seed is an int or a 0-d integer array (``optax.inject_hyperparams`` turns
  an int ``key`` into one, possibly traced); a typed key must be a single key
  (any implementation); raw key data is that of the default implementation.
  Raises ``ValueError`` for anything else, here rather than at the first
  draw.
  """
  if isinstance(key, bool):  # an int to Python, not a seed
    raise ValueError(f"key must be an int seed or a PRNG key, got {key!r}.")
  dtype = getattr(key, "dtype", None)
  integer = isinstance(key, int) or (dtype is not None and jnp.issubdtype(dtype, jnp.integer))
  if integer and jnp.ndim(key) == 0:
    return jax.random.key_data(jax.random.key(key)), None
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key, got a batch of shape {key.shape}.")
    return jax.random.key_data(key), jax.random.key_impl(key)
  expected = jax.random.key_data(jax.random.key(0)).shape
  if not integer or jnp.shape(key) != expected:
    raise ValueError(
        f"key must be an int seed, a typed PRNG key (jax.random.key) or raw key data of shape {expected}"
        f" (jax.random.PRNGKey); got {type(key).__name__} of shape {jnp.shape(key)} and dtype {dtype}.")
  return jnp.asarray(key, jnp.uint32), None


def next_key(data: jax.Array, impl=None) -> tuple[jax.Array, jax.Array]:
  """``(new_key_data, subkey)``: advance the carried key and draw a typed subkey."""
  key, sub = jax.random.split(jax.random.wrap_key_data(data, impl=impl))
  return jax.random.key_data(key), sub
