"""Numerics shared by the weightings: cosine scaling and small SPD solves.

Everything here acts on ``K x K`` matrices, is pure JAX (no host calls) and
works under ``jit`` and ``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CosineScaling(NamedTuple):
  """``M = D C D`` with ``D = diag(norms)``; zero-norm tasks are flagged.

  Attributes:
    cosines: ``C`` with unit diagonal; rows and columns of zero-norm tasks are
      those of the identity, so that solvers see a well-posed problem for them.
    norms: ``n_i = sqrt(M_ii)`` (0 for zero gradients).
    nonzero: bool mask of the tasks whose gradient is not zero.
  """

  cosines: jax.Array
  norms: jax.Array
  nonzero: jax.Array


def cosine_scaling(gram: jax.Array) -> CosineScaling:
  """Splits a Gram matrix into task norms and the cosine matrix.

  A task counts as zero when ``M_ii`` is not a positive normal float of the
  Gram's dtype (its gradient's squared norm underflowed or is exactly zero).
  Dividing by each norm separately avoids overflowing ``n_i n_j``.
  """
  gram = 0.5 * (gram + gram.T)
  diag = jnp.diagonal(gram)
  nonzero = diag > jnp.finfo(gram.dtype).tiny
  norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, diag, 1.0)), 0.0)
  safe = jnp.where(nonzero, norms, 1.0)
  cosines = jnp.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0)
  both = nonzero[:, None] & nonzero[None, :]
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  cosines = jnp.where(both, cosines, 0.0)
  cosines = jnp.where(eye > 0, 1.0, cosines)
  return CosineScaling(cosines, norms, nonzero)


def spd_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves ``matrix x = rhs`` for a symmetric positive definite ``matrix``."""
  factor = jax.scipy.linalg.cho_factor(matrix, lower=True)
  return jax.scipy.linalg.cho_solve(factor, rhs)


def off_diagonal_extremes(matrix: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Min and max of the off-diagonal entries (over ``mask``'s pairs); 0 when none."""
  k = matrix.shape[0]
  pairs = ~jnp.eye(k, dtype=bool)
  if mask is not None:
    pairs = pairs & mask[:, None] & mask[None, :]
  any_pair = jnp.any(pairs)
  low = jnp.min(jnp.where(pairs, matrix, jnp.inf))
  high = jnp.max(jnp.where(pairs, matrix, -jnp.inf))
  return jnp.where(any_pair, low, 0.0), jnp.where(any_pair, high, 0.0)
