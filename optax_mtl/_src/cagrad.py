r"""CAGrad: conflict-averse gradient descent.

Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
<https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.

Maximise the worst task's improvement within a ball around the average
gradient :math:`g_0`. Its dual is the simplex problem

.. math::
  w^\star = \arg\min_{w \in \Delta_K} g_w^\top g_0 + c \|g_0\| \|g_w\| ,
  \qquad g_w = J^\top w ,

and the update :math:`d = g_0 + \frac{c \|g_0\|}{\|g_{w^\star}\|} g_{w^\star}`,
optionally divided by :math:`1 + c^2` (``rescale=1``) or :math:`1 + c`
(``rescale=2``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib

# The barrier smooths ||g_w|| as sqrt(||g_w||^2 + delta), delta this
# fraction of the smallest task's squared norm (the smallest ||g_w|| short
# of cancellation): an exact kink at g_w = 0 would stall Newton where zero
# lies in the convex hull but is not optimal. The polish then solves the
# exact conditions.
_SMOOTHING = 1e-10
# ||g_w|| below this fraction of sum_i w_i ||g_i|| (its size without
# cancellation) counts as zero: the worst task cannot improve (a
# Pareto-stationary set) and CAGrad degenerates.
_DEGENERATE = 1e-4
# Barrier stages stop at this duality gap relative to the objective's size.
_GAP = 1e-7


class _Scaled(NamedTuple):
  r"""The simplex problem in the variables :math:`y_i = n_i w_i`.

  With :math:`M = D C D` (task norms ``n``, normalised to a largest of 1, and
  cosines ``C``), :math:`\|g_w\|^2 = y^\top C y`,
  :math:`g_w^\top g_0 = a^\top y` with :math:`a = C n / K`, and the simplex
  becomes :math:`y \ge 0,\ e^\top y = 1` with :math:`e_i = 1 / n_i`. Every
  quantity is of order one whatever the spread of the norms, which is what
  float32 needs (solving in ``w`` loses the small tasks below
  ``eps * max(n)^2``). Zero-gradient tasks are left out (``active``): their
  weight would only move mass away from the others.
  """

  cosines: jax.Array
  norms: jax.Array
  active: jax.Array
  linear: jax.Array
  radius: jax.Array
  equality: jax.Array
  smoothing: jax.Array


def _scaled(gram, c):
  k = gram.shape[0]
  scaling = numerics.cosine_scaling(gram)
  norms = scaling.norms / jnp.maximum(jnp.max(scaling.norms), jnp.finfo(gram.dtype).tiny)
  mean = norms / k
  linear = scaling.cosines @ mean
  radius = c * jnp.sqrt(jnp.maximum(mean @ linear, 0.0))
  equality = jnp.where(scaling.nonzero, 1.0 / jnp.where(scaling.nonzero, norms, 1.0), 0.0)
  smallest = jnp.min(jnp.where(scaling.nonzero, norms, 1.0))
  smoothing = jnp.maximum(_SMOOTHING * smallest**2, jnp.finfo(gram.dtype).tiny)
  return _Scaled(scaling.cosines, norms, scaling.nonzero, linear, radius, equality, smoothing)


def _gradient(p, y, delta):
  cy = p.cosines @ y
  norm = jnp.sqrt(jnp.maximum(y @ cy, 0.0) + delta)
  norm = jnp.maximum(norm, jnp.finfo(y.dtype).tiny)
  return p.linear + p.radius * cy / norm, cy, norm


def _equality_step(hess, grad, e, active):
  """Newton step ``min grad^T d + d^T hess d / 2`` on ``e^T d = 0`` over ``active``.

  ``hess`` may be singular along ``y`` (the objective is positively
  homogeneous): adding ``gamma e e^T`` leaves the constrained step unchanged
  and makes it definite, since ``e^T y = 1``. The Cholesky factorisation is
  Jacobi-scaled, so that rows of very different sizes (barrier terms of
  small weights) keep their accuracy.
  """
  k = hess.shape[0]
  dtype = hess.dtype
  both = active[:, None] & active[None, :]
  e = jnp.where(active, e, 0.0)
  # The Hessian is positive semidefinite: a negative diagonal is rounding.
  hess = hess - jnp.diag(jnp.minimum(jnp.diagonal(hess), 0.0))
  trace = jnp.sum(jnp.where(active, jnp.diagonal(hess), 0.0))
  # A single-task support has a zero Hessian; any gamma > 0 then does.
  gamma = jnp.where(trace > 0, trace, 1.0) / jnp.maximum(e @ e, jnp.finfo(dtype).tiny)
  hess = jnp.where(both, hess + gamma * jnp.outer(e, e), 0.0) + jnp.diag(jnp.where(active, 0.0, 1.0))
  s = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(hess), jnp.finfo(dtype).tiny))
  scaled = s[:, None] * hess * s[None, :] + jnp.eye(k, dtype=dtype) * (10 * jnp.finfo(dtype).eps)
  factor = jax.scipy.linalg.cho_factor(scaled, lower=True)
  u = s * jax.scipy.linalg.cho_solve(factor, -s * jnp.where(active, grad, 0.0))
  v = s * jax.scipy.linalg.cho_solve(factor, s * e)
  return u - v * (e @ u) / (e @ v)


def _solve(p, max_stages=24, inner=25):
  r"""Log-barrier Newton for :math:`\min_{y \ge 0, e^\top y = 1} a^\top y + \rho \sqrt{y^\top C y + \delta}`.

  The equality constraint is kept by the Newton system, positivity by the
  barrier; each stage multiplies the barrier weight ``t`` by 10, from the
  inverse of the objective's size at the start until the duality gap
  ``K / t`` is below ``_GAP`` times the objective's size (which can be many
  orders below its starting size: with graded norms the optimum leans on the
  smallest tasks). Then
  :func:`_polish` solves the optimality conditions on the support exactly.
  """
  dtype = p.cosines.dtype
  e, active = p.equality, p.active
  count = jnp.sum(active)
  safe = lambda y: jnp.where(active, y, 1.0)

  def smoothing(t):
    # Shrinks with the duality gap count / t (the error rho * sqrt(delta)
    # stays a tenth of it): far from the optimum the norm is smooth enough
    # for Newton, near it the kink at g_w = 0 is resolved.
    wanted = (0.1 * count / (t * jnp.maximum(p.radius, jnp.finfo(dtype).tiny))) ** 2
    return jnp.clip(wanted, p.smoothing, 1.0)

  def value(y, t):
    delta = smoothing(t)
    return t * (p.linear @ y + p.radius * jnp.sqrt(jnp.maximum(y @ p.cosines @ y, 0.0) + delta)) - jnp.sum(
        jnp.where(active, jnp.log(safe(y)), 0.0))

  def newton(y, t):
    grad, cy, norm = _gradient(p, y, smoothing(t))
    grad = t * grad - jnp.where(active, 1.0 / safe(y), 0.0)
    hess = t * p.radius * (p.cosines / norm - jnp.outer(cy, cy) / norm**3) + jnp.diag(1.0 / safe(y) ** 2)
    step = _equality_step(hess, grad, e, active)
    decrement = -(grad @ step)
    boundary = jnp.min(jnp.where(step < 0, -y / jnp.where(step < 0, step, -1.0), jnp.inf))
    length = jnp.minimum(1.0, 0.99 * boundary)
    start = value(y, t)

    def too_long(length):
      # Backtrack only while the predicted decrease is resolvable in the
      # working precision; close to the centre, full (positivity-bounded)
      # Newton steps converge quadratically.
      resolvable = decrement > 1e3 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(start), 1.0)
      return resolvable & (value(y + length * step, t) > start - 0.25 * length * decrement) & (length > 1e-12)

    length = lax.while_loop(too_long, lambda length: 0.5 * length, length)
    ok = jnp.all(jnp.isfinite(step)) & (length > 1e-12)
    moved = y + length * step
    # Re-project on e^T y = 1: at large t the Newton system loses the
    # constraint to rounding.
    return jnp.where(ok, moved / (e @ moved), y), jnp.where(ok, decrement, 0.0)

  def centre(y, t):
    return numerics.newton_loop(lambda y: newton(y, t), y, max_iter=inner, tol=1e-10)

  def size(y):
    # The objective's own scale at y, floored where g_w cancels (the
    # degenerate optimum F = 0) at the threshold that calls it zero.
    norm = jnp.sqrt(jnp.maximum(y @ p.cosines @ y, 0.0))
    return jnp.maximum(jnp.abs(p.linear @ y) + p.radius * norm, p.radius * _DEGENERATE * jnp.sum(y))

  def unfinished(carry):
    y, t, stage = carry
    # The central path's duality gap is (number of tasks) / t.
    return (stage < max_stages) & (count > _GAP * t * size(y))

  def stage(carry):
    y, t, stage = carry
    return centre(y, t), 10.0 * t, stage + 1

  start = jnp.where(active, p.norms, 0.0) / jnp.maximum(jnp.sum(active), 1)
  t0 = 1.0 / jnp.maximum(size(start), jnp.finfo(dtype).tiny)
  y, _, _ = lax.while_loop(unfinished, stage, (centre(start, t0), 10.0 * t0, 1))
  polished = _polish(p, y)
  better = jnp.all(jnp.isfinite(polished)) & (_kkt(p, polished) <= _kkt(p, y))
  return jnp.where(better, polished, y)


def _solve_pair(p):
  r"""The two-task problem in closed form.

  On the segment :math:`g_w = w g_1 + (1 - w) g_2` the objective is
  :math:`F(w) = p w + \rho \sqrt{A w^2 + 2 B w + C_0}` (plus a constant),
  convex in ``w``; :math:`F' = 0` gives :math:`s = A w + B = r \sqrt{D / (A -
  r^2)}` with :math:`r = -p / \rho` and :math:`D = A C_0 - B^2 = n_1^2 n_2^2
  (1 - \cos^2)`, clipped to ``[0, 1]`` (``|r| >= sqrt(A)``: ``F`` is monotone
  and the optimum is an end point; ``D = 0``: the kink ``g_w = 0``). With one
  zero gradient, all the weight goes to the other task.
  """
  dtype = p.cosines.dtype
  n1, n2 = p.norms[0], p.norms[1]
  cos = p.cosines[0, 1]
  slope = 0.5 * (n1 - n2) * (n1 + n2)  # (g1 - g2)^T g0
  a = n1 * n1 + n2 * n2 - 2 * n1 * n2 * cos
  b = n1 * n2 * cos - n2 * n2
  d = jnp.maximum((n1 * n2) ** 2 * (1 - cos) * (1 + cos), 0.0)
  r = -slope / jnp.maximum(p.radius, jnp.finfo(dtype).tiny)
  interior = r * r < a
  s = r * jnp.sqrt(d / jnp.where(interior, a - r * r, 1.0))
  w = jnp.where(interior, (s - b) / jnp.where(a > 0, a, 1.0), jnp.where(r > 0, 1.0, 0.0))
  w = jnp.where(a > 0, jnp.clip(w, 0.0, 1.0), 0.5)  # equal gradients: any w
  w = jnp.where(p.active[0] & p.active[1], w, jnp.where(p.active[0], 1.0, 0.0))
  return jnp.stack([n1 * w, n2 * (1 - w)]).astype(dtype)


def _kkt(p, y):
  """KKT violation in ``y``: ``max_i y_i |dF/dy_i - nu e_i|`` and ``max_i max(0, nu e_i - dF/dy_i)``."""
  grad, _, _ = _gradient(p, y, jnp.zeros([], y.dtype))
  nu = y @ grad  # F is positively homogeneous: the multiplier of e^T y = 1
  complementarity = jnp.max(jnp.where(p.active, y * jnp.abs(grad - nu * p.equality), 0.0))
  infeasibility = jnp.max(jnp.where(p.active, jnp.maximum(nu * p.equality - grad, 0.0), 0.0))
  return jnp.maximum(complementarity, infeasibility)


def _polish(p, y):
  """Newton on the KKT equations of the support, with an active-set update.

  The barrier's line search compares objective values, which float32 cannot
  resolve near the flat optimum; Newton on the first-order conditions
  ``dF/dy_S = nu e_S``, ``e_S^T y_S = 1`` resolves them to rounding. A weight
  driven negative leaves the support; once the support's conditions hold, the
  task whose reduced gradient ``dF/dy_i - nu e_i`` is most negative joins it
  (the barrier may leave weights of the optimum below its resolution).
  """
  k = y.shape[0]
  dtype = y.dtype
  delta = jnp.zeros([], dtype)
  support = p.active & (y * p.equality > 1e-6 * jnp.max(y * p.equality))
  y = jnp.where(support, y, 0.0)
  y = y / (p.equality @ y)
  resolution = 1e3 * jnp.finfo(dtype).eps

  def body(carry):
    y, support, it, _ = carry
    grad, cy, norm = _gradient(p, y, delta)
    hess = p.radius * (p.cosines / norm - jnp.outer(cy, cy) / norm**3)
    step = jnp.where(support, _equality_step(hess, grad, p.equality, support), 0.0)
    moved = y + step
    kept = support & (moved > 0)
    moved = jnp.where(kept, moved, 0.0)
    moved = moved / (p.equality @ moved)
    settled = jnp.all(kept == support) & (jnp.max(jnp.abs(step) * p.equality) <= resolution)
    reduced = grad - (y @ grad) * p.equality
    scale = jnp.max(jnp.where(support, jnp.abs(grad), 0.0))
    candidates = p.active & ~support & (reduced < -resolution * scale)
    entering = jnp.argmin(jnp.where(candidates, reduced, jnp.inf))
    grow = settled & jnp.any(candidates)
    kept = jnp.where(grow, kept.at[entering].set(True), kept)
    done = settled & ~jnp.any(candidates)
    return moved, kept, it + 1, done

  def cond(carry):
    _, _, it, done = carry
    return (it < 2 * k + 10) & ~done

  y, _, _, _ = lax.while_loop(cond, body, (y, support, 0, jnp.zeros([], bool)))
  return y


def kkt_residual(gram: jax.Array, c: float, w: jax.Array) -> jax.Array:
  r"""Largest violation of the KKT conditions of the CAGrad simplex problem at ``w``.

  Measured in the variables :math:`y_i = n_i w_i` of the solver (norms
  normalised to a largest of 1, zero-gradient tasks left out, ``w``
  renormalised onto the simplex): with ``F`` the objective and
  ``nu = y^T grad F`` (the multiplier of :math:`e^\top y = 1` at the
  optimum), the larger of the complementarity
  :math:`\max_i y_i |\partial_i F - \nu e_i|` (the same number in ``w``)
  and the dual infeasibility :math:`\max_i \max(0, \nu e_i - \partial_i F)`
  (in ``w`` it is this times :math:`n_i \le 1`).
  """
  p = _scaled(gram, c)
  y = jnp.where(p.active, p.norms * w, 0.0)
  return _kkt(p, y / (p.equality @ y))


def _check_rescale(rescale):
  """``rescale`` in {0, 1, 2}; a traced value (``inject_hyperparams``) is taken as is."""
  if not isinstance(rescale, jax.core.Tracer) and (isinstance(rescale, bool) or rescale not in (0, 1, 2)):
    raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}.")


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def cagrad(gram: jax.Array, *, c: float = 0.4, rescale: Literal[0, 1, 2] = 1) -> jax.Array:
  r"""CAGrad weights: :math:`J^\top w` is the authors' update.

  .. math::
    J^\top w = \frac{1}{s} \Big(g_0 + \frac{c \|g_0\|}{\|g_{w^\star}\|} g_{w^\star}\Big),
    \qquad w = \frac{1}{s} \Big(\frac{1}{K} + \frac{c \|g_0\|}{\|g_{w^\star}\|} w^\star\Big)

  with :math:`s = 1` (``rescale=0``), :math:`1 + c^2` (``1``, the official
  NYUv2 setting) or :math:`1 + c` (``2``). The simplex problem is solved
  in-graph in the variables :math:`y_i = \|g_i\| w_i`, where every term is
  of order one whatever the spread of the task norms: log-barrier Newton
  (the duality gap driven below 1e-7 of the objective's own size), then
  Newton on the KKT conditions of the support with an active-set update;
  two tasks have a closed form (a one-dimensional convex problem). The KKT
  residual reaches float32 rounding, and with task norms spanning
  1e-3..1e3 the float32 weights agree with float64 to about 1e-7 (solving
  in ``w`` loses the small tasks below ``eps * max_i ||g_i||^2``). The
  official code's scipy SLSQP and TorchJD's CLARABEL stop earlier (their
  weights differ from the optimum by up to about 4e-4). At ``c = 0`` this is
  the mean gradient.

  Zero-gradient tasks are left out of the simplex: their weight would only
  take mass from the others (the official solver puts it there whenever the
  others cannot all improve, and returns the mean), so CAGrad acts on the
  tasks that can still move; they still count in the mean :math:`g_0`.
  When :math:`\|g_{w^\star}\|` vanishes (below 1e-4 of
  :math:`\sum_i w^\star_i \|g_i\|`, its size without cancellation: the
  optimum sits at zero in the convex hull of the gradients, a
  Pareto-stationary set) the worst task cannot improve and the weights are
  zero. TorchJD zeroes the weights below 1e-4 of the Frobenius norm of
  ``J``, which also discards tasks with small gradients (every scale-disparity
  fixture); the official code divides by :math:`\|g_w\| + 10^{-8}`.

  Args:
    gram: ``(K, K)`` Gram matrix.
    c: radius of the ball around the mean gradient, in units of its norm
      (0.4 in the Nash-MTL experiments, 0.5 in CAGrad's).
    rescale: 0, 1 or 2, see above.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = optax_mtl.weighting.cagrad(jac @ jac.T, c=0.5, rescale=0)
    >>> print(*(f"{x:.4f}" for x in w))
    0.7041 0.5000
  """
  _check_rescale(rescale)
  k = gram.shape[0]
  p = _scaled(gram, c)
  y = _solve_pair(p) if k == 2 else _solve(p)
  w_star = jnp.where(p.active, y * p.equality, 0.0)
  norm = jnp.sqrt(jnp.maximum(y @ p.cosines @ y, 0.0))
  degenerate = norm <= _DEGENERATE * jnp.sum(y)  # sum_i w_i ||g_i||
  weights = 1.0 / k + p.radius / jnp.where(degenerate, 1.0, norm) * w_star
  weights = jnp.where(degenerate & (c > 0), 0.0, weights)
  # All gradients zero: any weights give the zero update; keep the mean's.
  weights = jnp.where(jnp.any(p.active), weights, 1.0 / k)
  divisor = jnp.where(rescale == 0, 1.0, jnp.where(rescale == 1, 1.0 + c**2, 1.0 + c))
  return weights / divisor


def cagrad_transform(
    num_tasks: int,
    *,
    c: float | jax.Array = 0.4,
    rescale: Literal[0, 1, 2] = 1,
    reduction: Literal["sum", "mean"] = "sum",
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad (Liu et al., 2021): conflict-averse update around the mean gradient.

  The shared update is :math:`K J^\top w` (``reduction="sum"``, as
  AvivNavon/nash-mtl ``CAGrad``, which multiplies by ``K`` "to match the sum
  loss") or :math:`J^\top w` (``"mean"``, the authors' and TorchJD's scale),
  with the weights of :func:`optax_mtl.weighting.cagrad`. Task-specific
  parameters get their plain gradients, as in the official code.

  Args:
    num_tasks: number of tasks ``K``.
    c: ball radius (nash-mtl default 0.4).
    rescale: 0, 1 (official default) or 2.
    reduction: ``"sum"`` (official nash-mtl) or ``"mean"``.
    task_specific: ``"unweighted"`` (official) or ``"weighted"``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  k = contract.check_num_tasks(num_tasks)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  _check_rescale(rescale)
  factor = float(k) if reduction == "sum" else 1.0
  return aggregation.weighted_aggregation(
      k,
      lambda gram: factor * cagrad(gram, c=c, rescale=rescale),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), factor / k),
      task_specific_weights=jnp.ones((k,), jnp.float32) if task_specific == "unweighted" else None,
      nonfinite=nonfinite,
  )
