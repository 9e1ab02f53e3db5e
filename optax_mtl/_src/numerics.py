"""Numerics shared by the weightings: cosine scaling and small SPD solves.

Everything here acts on ``K x K`` matrices, is pure JAX (no host calls) and
works under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def full_precision(fn):
  """Runs ``fn`` with float32 matmuls at full precision.

  The ``K x K`` solves cost nothing, but on accelerators JAX's default
  matmul precision rounds float32 operands to TF32 or bf16, which would
  cost the solvers several digits.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


def nan_for_nonfinite_gram(fn):
  """Makes a public weighting ``fn(gram, ...)`` return NaN for a non-finite Gram.

  A NaN in the Gram reads as a zero-gradient task to the cosine scaling
  (``diag > tiny`` is false), so several solvers returned finite weights for
  it; called on their own, they would hand a finite update to
  ``optax.apply_if_finite``. The transforms check the Gram themselves.
  """

  @functools.wraps(fn)
  def wrapped(gram, *args, **kwargs):
    out = fn(gram, *args, **kwargs)
    finite = jnp.all(jnp.isfinite(gram))

    def poison(x):
      return jnp.where(finite, x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    return jax.tree.map(poison, out)

  return wrapped


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


def newton_loop(step, x: jax.Array, *, max_iter: int, tol: float) -> jax.Array:
  """Iterates ``x, decrement = step(x)`` until the Newton decrement is at most ``tol``.

  At most ``max_iter`` steps; ``step`` returns a zero decrement when it
  cannot move, which ends the loop.
  """

  def cond(carry):
    _, it, decrement = carry
    return (it < max_iter) & (decrement > tol)

  def body(carry):
    x, it, _ = carry
    x, decrement = step(x)
    return x, it + 1, decrement

  x, _, _ = jax.lax.while_loop(cond, body, (x, 0, jnp.asarray(jnp.inf, x.dtype)))
  return x


class QPSolution(NamedTuple):
  """Solution of a small QP with its optimality diagnostics.

  Attributes:
    x: the minimiser.
    objective: its objective value.
    kkt_residual: max of the primal, dual and complementarity violations,
      relative to the problem's scale.
    iterations: interior-point iterations.
  """

  x: jax.Array
  objective: jax.Array
  kkt_residual: jax.Array
  iterations: jax.Array


def _qp_kkt(q, c, x, e):
  """Dual and complementarity violations at ``x >= 0`` for the constraint ``e^T x = 1``.

  ``e`` is ``None`` without the equality constraint.
  """
  grad = q @ x + c
  if e is None:
    s = grad
  else:
    # The equality multiplier: grad_i / e_i is the same on the support at
    # the optimum; the smallest value there is the safe estimate.
    support = x > 0
    y = jnp.min(jnp.where(support, grad / e, jnp.inf))
    y = jnp.where(jnp.isfinite(y), y, 0.0)
    s = grad - y * e  # must be >= 0, and 0 on the support
  dual = jnp.max(jnp.maximum(-s, 0.0))
  complementarity = jnp.max(jnp.abs(x * s))
  return dual, complementarity


@full_precision
def box_simplex_qp(
    q: jax.Array,
    c: jax.Array | None = None,
    *,
    simplex: bool = True,
    equality: jax.Array | None = None,
    max_iter: int = 30,
    tol: float = 1e-6,
) -> QPSolution:
  r"""Solves :math:`\min_x \tfrac12 x^\top Q x + c^\top x` s.t. :math:`x \ge 0` (and :math:`a^\top x = 1`).

  For the small (``K x K``) positive semidefinite problems of the weightings
  (MGDA's min-norm point, the dual-cone projections of UPGrad/DualProj):
  Mehrotra predictor-corrector interior point in the working precision,
  then a primal active-set refinement started from its support: the
  equality-constrained KKT system is solved exactly on the support (least
  squares, so that singular ``Q`` from duplicated tasks are fine), blocking
  components leave it and the most violated free index joins it, until the
  KKT conditions hold. The result is kept when it is finite and not worse.
  This makes the zeros exact and the KKT residual reach rounding level even
  where float32 stalls the interior point.

  Args:
    q: ``(K, K)`` symmetric positive semidefinite.
    c: ``(K,)`` linear term (default zero).
    simplex: add the constraint ``a^T x = 1``, by default ``sum(x) = 1``
      (the probability simplex).
    equality: ``(K,)`` positive ``a`` of that constraint (default ones): a
      simplex in diagonally rescaled variables.
    max_iter: interior-point iteration cap.
    tol: stop when the scaled duality measure and residuals fall below it
      (float32 stalls not far below 1e-6; the active-set refinement then
      makes the solution exact).

  Returns:
    A :class:`QPSolution`.
  """
  k = q.shape[0]
  dtype = q.dtype
  c = jnp.zeros((k,), dtype) if c is None else c.astype(dtype)
  q = 0.5 * (q + q.T)
  tiny = jnp.finfo(dtype).tiny
  curvature = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(q))), tiny)
  if simplex:
    # The constraint fixes the size of x; only the objective is normalised.
    scale, size = jnp.maximum(curvature, jnp.max(jnp.abs(c))), jnp.ones([], dtype)
  else:
    # Without it the minimiser has the size of |c| / |Q|: rescale x = size * x'
    # so that x' is of order one, which the absolute tolerances assume.
    size = jnp.where(jnp.max(jnp.abs(c)) > 0, jnp.max(jnp.abs(c)) / curvature, 1.0)
    scale = curvature
  qs, cs = q / scale, c / (scale * size)
  ones = jnp.ones((k,), dtype)
  if simplex:
    e = ones if equality is None else equality.astype(dtype)
  else:
    e = jnp.zeros((k,), dtype)

  def newton(x, s, rd, rp, rc):
    """Solves the reduced Newton system for a complementarity target ``rc``."""
    h = qs + jnp.diag(s / x)
    h = h + jnp.eye(k, dtype=dtype) * (jnp.finfo(dtype).eps * jnp.max(jnp.diagonal(h)))
    factor = jax.scipy.linalg.cho_factor(h, lower=True)
    rhs = -rd + rc / x
    u = jax.scipy.linalg.cho_solve(factor, rhs)
    if simplex:
      v = jax.scipy.linalg.cho_solve(factor, e)
      dy = (rp - e @ u) / (e @ v)
      dx = u + v * dy
    else:
      dy = jnp.zeros([], dtype)
      dx = u
    ds = (rc - s * dx) / x
    return dx, dy, ds

  def max_step(v, dv):
    ratios = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratios))

  def residuals(x, y, s):
    rd = qs @ x + cs - y * e - s
    rp = jnp.where(simplex, 1.0 - e @ x, 0.0)
    mu = (x @ s) / k
    return rd, rp, mu

  def cond(carry):
    x, y, s, it = carry
    rd, rp, mu = residuals(x, y, s)
    err = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(rd)), jnp.abs(rp)), mu)
    return (it < max_iter) & (err > tol) & jnp.all(jnp.isfinite(x))

  def body(carry):
    x, y, s, it = carry
    rd, rp, mu = residuals(x, y, s)
    # Predictor (affine scaling), then Mehrotra's centred corrector.
    dx_a, _, ds_a = newton(x, s, rd, rp, -x * s)
    alpha_p, alpha_d = max_step(x, dx_a), max_step(s, ds_a)
    mu_aff = ((x + alpha_p * dx_a) @ (s + alpha_d * ds_a)) / k
    sigma = jnp.clip((mu_aff / jnp.maximum(mu, jnp.finfo(dtype).tiny)) ** 3, 0.0, 1.0)
    dx, dy, ds = newton(x, s, rd, rp, -x * s + sigma * mu - dx_a * ds_a)
    alpha_p = 0.99 * max_step(x, dx)
    alpha_d = 0.99 * max_step(s, ds)
    ok = jnp.all(jnp.isfinite(dx)) & jnp.all(jnp.isfinite(ds)) & jnp.isfinite(dy)
    x = jnp.where(ok, x + alpha_p * dx, x)
    y = jnp.where(ok, y + alpha_d * dy, y)
    s = jnp.where(ok, s + alpha_d * ds, s)
    return x, y, s, jnp.where(ok, it + 1, max_iter)

  x0 = 1.0 / (k * e) if simplex else ones
  s0 = ones
  y0 = jnp.where(simplex, jnp.min((qs @ x0 + cs) / jnp.where(simplex, e, 1.0)) - 1.0, 0.0).astype(dtype)
  x, y, s, iterations = jax.lax.while_loop(cond, body, (x0, y0, s0, jnp.zeros([], jnp.int32)))
  x = jnp.maximum(x, 0.0)
  if simplex:
    x = x / (e @ x)

  objective = lambda z: 0.5 * z @ (qs @ z) + cs @ z
  e_or_none = e if simplex else None
  violation = lambda z: jnp.maximum(*_qp_kkt(qs, cs, z, e_or_none))
  refined = _active_set(qs, cs, x, e_or_none, max_rounds=2 * k + 2)
  # The refinement's KKT residual is held to its own tolerance (100 eps), not to the interior
  # point's: at a flat face of minimisers (exactly opposite tasks) the exact point has a residual
  # of 10.2 eps, an interior point off the face 3.8 eps, and keeping the latter left the
  # update 3e-4 off (relative to the gradients' size).
  better = (
      jnp.all(jnp.isfinite(refined))
      & (objective(refined) <= objective(x) + 10 * jnp.finfo(dtype).eps * (1.0 + jnp.abs(objective(x))))
      & (violation(refined) <= jnp.maximum(violation(x), 100 * jnp.finfo(dtype).eps))
  )
  x = jnp.where(better, refined, x)
  return QPSolution(
      x=size * x,
      objective=scale * size**2 * objective(x),
      kkt_residual=violation(x),
      iterations=iterations,
  )


def _support_solve(qs, cs, support, e):
  """The equality-constrained minimiser on ``support`` and its multiplier.

  An LU solve of the KKT system with a ridge at rounding level: singular
  ``Q`` on the support (duplicated tasks) get the ridge-regularised
  solution, at a fraction of the cost of least squares.
  """
  k = qs.shape[0]
  dtype = qs.dtype
  both = support[:, None] & support[None, :]
  ridge = 10 * jnp.finfo(dtype).eps * jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(qs))), 1.0)
  q_s = jnp.where(both, qs, 0.0) + jnp.diag(jnp.where(support, ridge, 1.0)).astype(dtype)
  rhs = jnp.where(support, -cs, 0.0)
  if e is None:
    return jnp.where(support, jnp.linalg.solve(q_s, rhs), 0.0), jnp.zeros([], dtype)
  e_s = jnp.where(support, e, 0.0)
  kkt = jnp.block([[q_s, -e_s[:, None]], [e_s[None, :], -ridge * jnp.ones((1, 1), dtype)]])
  solution = jnp.linalg.solve(kkt, jnp.concatenate([rhs, jnp.ones((1,), dtype)]))
  return jnp.where(support, solution[:k], 0.0), solution[k]


def _active_set(qs, cs, x, e, max_rounds):
  """Primal active-set refinement (Lawson-Hanson style) from a feasible ``x``.

  The support is the interior point's; each round solves the KKT system on
  it exactly. If that leaves the feasible set, move towards it until the
  first component reaches 0 and drop it; otherwise add the free index with
  the most negative reduced gradient, or stop when there is none. Finite,
  and exact to the rounding of the small linear solves.
  """
  dtype = qs.dtype
  tol = 100 * jnp.finfo(dtype).eps
  support = x > 1e3 * jnp.finfo(dtype).eps * jnp.max(x)

  def cond(carry):
    _, _, rounds, done = carry
    return (rounds < max_rounds) & ~done

  def body(carry):
    x, support, rounds, _ = carry
    z, nu = _support_solve(qs, cs, support, e)
    blocked = support & (z < 0)
    ratios = jnp.where(blocked, x / jnp.where(blocked, x - z, 1.0), jnp.inf)
    step = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    feasible = ~jnp.any(blocked)
    moved = jnp.where(feasible, z, x + step * (z - x))
    moved = jnp.maximum(moved, 0.0)
    # Infeasible: drop the components that reached zero.
    dropped = support & (moved <= tol * jnp.max(moved))
    reduced = qs @ z + cs - (0.0 if e is None else nu * e)
    candidates = ~support & (reduced < -tol)
    entering = jnp.argmin(jnp.where(candidates, reduced, jnp.inf))
    optimal = feasible & ~jnp.any(candidates)
    new_support = jnp.where(feasible, support.at[entering].set(True), support & ~dropped)
    return moved, new_support, rounds + 1, optimal | ~jnp.all(jnp.isfinite(moved))

  x, _, _, done = jax.lax.while_loop(cond, body, (x, support, jnp.zeros([], jnp.int32), jnp.zeros([], bool)))
  if e is not None:
    x = x / (e @ x)
  return jnp.where(done & jnp.all(jnp.isfinite(x)), x, jnp.nan)


@full_precision
def graded_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenpairs of a PSD Gram with relative accuracy for graded (badly scaled) tasks.

  ``eigh(M)`` resolves eigenvalues only to ``eps * max(lambda)`` in absolute
  terms, so with task norms spanning ``1e-3..1e3`` (eigenvalues spanning
  1e12) the small ones are noise in float32. Here ``M = D C D`` is factored
  as ``F F^T`` with ``F = D Q Lambda_C^{1/2}`` (``C = Q Lambda_C Q^T`` is the
  well-scaled cosine matrix) and the SVD of the row-graded ``F`` gives
  ``M = U S^2 U^T`` with the small eigenvalues accurate relative to their
  own size whenever ``C`` is well conditioned.

  Returns:
    ``(eigenvalues, vectors)``, eigenvalues ascending as :func:`jnp.linalg.eigh`.
  """
  scaling = cosine_scaling(gram)
  cos_values, cos_vectors = jnp.linalg.eigh(scaling.cosines)
  factor = scaling.norms[:, None] * (cos_vectors * jnp.sqrt(jnp.maximum(cos_values, 0.0))[None, :])
  # Bidiagonalisation keeps the relative accuracy of a row-graded matrix only
  # with its rows in decreasing size (the smallest eigenvalue of norms
  # 1e-3..1e3: 7e-7 relative error sorted, 5e-3 unsorted).
  order = jnp.argsort(-scaling.norms)
  u, s, _ = jnp.linalg.svd(factor[order])  # descending
  u = u[jnp.argsort(order)]
  return (s**2)[::-1], u[:, ::-1]
