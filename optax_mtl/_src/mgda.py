r"""MGDA and MGDA-UB: the min-norm point of the convex hull of the task gradients.

Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
<https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (Désidéri's MGDA, 2012).

.. math::
  w = \arg\min_{w \in \Delta_K} w^\top M w, \qquad d = J^\top w .

``d`` is zero at a Pareto-stationary point and otherwise decreases every task:
the KKT conditions :math:`(M w)_i \ge w^\top M w`, with equality where
:math:`w_i > 0`, give :math:`g_i^\top d \ge \|d\|^2`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib

Normalization = Literal["none", "l2", "loss", "loss+"]
Solver = Literal["exact", "pgd", "fw"]

# The official MinNormSolver's constants.
_STOP_CRIT = 1e-5
_MAX_ITER = 250


class MGDAInfo(NamedTuple):
  """Diagnostics of one MGDA solve (on the normalised Gram).

  Attributes:
    cost: :math:`w^\\top M w`, the squared norm of the min-norm element (0 at a
      Pareto-stationary point); for the official solvers, the cost they report.
    kkt_residual: largest violation of :math:`(M w)_i \\ge w^\\top M w`,
      relative to :math:`\\max_i M_{ii}`.
    iterations: solver iterations.
  """

  cost: jax.Array
  kkt_residual: jax.Array
  iterations: jax.Array


def gradient_normalizers(gram, normalization: Normalization, task_losses=None):
  """The official ``gradient_normalizers``: 1, ``||g_i||``, ``L_i`` or ``L_i ||g_i||``."""
  if normalization not in ("none", "l2", "loss", "loss+"):
    raise ValueError(f"normalization must be 'none', 'l2', 'loss' or 'loss+', got {normalization!r}.")
  k = gram.shape[0]
  if normalization == "none":
    return jnp.ones((k,), gram.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  if normalization == "l2":
    return norms
  if task_losses is None:
    raise ValueError(f"normalization={normalization!r} needs task_losses.")
  losses = jnp.asarray(task_losses, gram.dtype)
  return losses if normalization == "loss" else losses * norms


def _normalize(gram, normalizers):
  """``M_ij / (c_i c_j)``; a task with ``c_i = 0`` (or non-finite) counts as a zero gradient."""
  ok = jnp.isfinite(normalizers) & (normalizers != 0)
  inv = jnp.where(ok, 1.0 / jnp.where(ok, normalizers, 1.0), 0.0)
  return gram * inv[:, None] * inv[None, :]


def _kkt_residual(gram, w):
  cost = w @ gram @ w
  scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(gram.dtype).tiny)
  return jnp.max(jnp.maximum(cost - gram @ w, 0.0)) / scale


def _two_point(v11, v12, v22):
  """Official ``_min_norm_element_from2``: ``min_c ||c x1 + (1-c) x2||`` with its 0.999/0.001 rule."""
  denominator = v11 + v22 - 2.0 * v12
  safe = jnp.where(denominator > 0, denominator, 1.0)
  interior = -(v12 - v22) / safe
  gamma = jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))
  cost = jnp.where(v12 >= v11, v11, jnp.where(v12 >= v22, v22, v22 + interior * (v12 - v22)))
  return gamma, cost


def _best_pair(gram):
  """Official ``_min_norm_2d``: the best two-task solution over pairs ``i < j`` in order."""
  k = gram.shape[0]
  rows, cols = (jnp.asarray(i) for i in np.triu_indices(k, 1))
  gamma, cost = _two_point(gram[rows, rows], gram[rows, cols], gram[cols, cols])
  best = jnp.argmin(cost)  # first minimum, as the official strict '<' scan
  w = jnp.zeros((k,), gram.dtype)
  w = w.at[rows[best]].set(gamma[best]).at[cols[best]].add(1.0 - gamma[best])
  return w, cost[best]


def _projection_to_simplex(y):
  """Official ``_projection2simplex`` (sort-based Euclidean projection)."""
  m = y.shape[0]
  ordered = jnp.sort(y)[::-1]
  cumulative = jnp.cumsum(ordered)
  thresholds = (cumulative[:-1] - 1.0) / jnp.arange(1, m, dtype=y.dtype)
  hit = thresholds > ordered[1:]
  default = (jnp.sum(y) - 1.0) / m
  tmax = jnp.where(jnp.any(hit), thresholds[jnp.argmax(hit)], default)
  return jnp.maximum(y - tmax, 0.0)


def _next_point(current, grad):
  """Official ``_next_point``: a projected step along the centred gradient."""
  n = current.shape[0]
  projected = grad - jnp.sum(grad) / n
  neg, pos = projected < 0, projected > 0
  tm1 = jnp.where(neg, -current / jnp.where(neg, projected, -1.0), jnp.inf)
  tm2 = jnp.where(pos, (1.0 - current) / jnp.where(pos, projected, 1.0), jnp.inf)
  valid1, valid2 = neg & (tm1 > 1e-7), pos & (tm2 > 1e-7)
  t = jnp.where(jnp.any(valid1), jnp.min(jnp.where(valid1, tm1, jnp.inf)), 1.0)
  t = jnp.where(jnp.any(valid2), jnp.minimum(t, jnp.min(jnp.where(valid2, tm2, jnp.inf))), t)
  return _projection_to_simplex(projected * t + current)


def _official(gram, variant: Literal["pgd", "fw"], max_iter):
  """The official MinNormSolver loop (``find_min_norm_element[_FW]``) with an enforced cap."""
  k = gram.shape[0]
  if k == 1:
    return jnp.ones((1,), gram.dtype), gram[0, 0], jnp.zeros([], jnp.int32)
  w, cost = _best_pair(gram)
  if k < 3:
    return w, cost, jnp.zeros([], jnp.int32)

  def step(w):
    if variant == "pgd":
      new_point = _next_point(w, -(gram @ w))
      nc, nd = _two_point(w @ gram @ w, w @ gram @ new_point, new_point @ gram @ new_point)
      return nc * w + (1.0 - nc) * new_point, nd
    target = jnp.argmin(gram @ w)
    nc, nd = _two_point(w @ gram @ w, w @ gram[:, target], gram[target, target])
    return (nc * w).at[target].add(1.0 - nc), nd

  def cond(carry):
    _, _, it, done = carry
    return (it < max_iter) & ~done

  def body(carry):
    w, cost, it, _ = carry
    new, nd = step(w)
    done = jnp.sum(jnp.abs(new - w)) < _STOP_CRIT
    # On convergence the official code returns the iterate before the step.
    return jnp.where(done, w, new), nd, it + 1, done

  w, cost, iterations, _ = lax.while_loop(cond, body, (w, cost, jnp.zeros([], jnp.int32), jnp.zeros([], bool)))
  return w, cost, iterations


def _exact(gram):
  k = gram.shape[0]
  if k == 1:
    return jnp.ones((1,), gram.dtype), gram[0, 0], jnp.zeros([], jnp.int32)
  if k == 2:
    # w_1 = clip((g_2 - g_1)^T g_2 / ||g_1 - g_2||^2, 0, 1); equal tasks split evenly.
    denominator = gram[0, 0] + gram[1, 1] - 2.0 * gram[0, 1]
    w1 = jnp.where(denominator > 0, (gram[1, 1] - gram[0, 1]) / jnp.where(denominator > 0, denominator, 1.0), 0.5)
    w = jnp.stack([jnp.clip(w1, 0.0, 1.0), 1.0 - jnp.clip(w1, 0.0, 1.0)])
    return w, w @ gram @ w, jnp.zeros([], jnp.int32)
  # In the variables y = D w (D = diag of the norms) the quadratic form is the
  # well-scaled cosine matrix and the simplex becomes sum_i y_i / n_i = 1, so
  # float32 resolves tasks whose norms differ by orders of magnitude; when
  # that interior point breaks down (norm ratios around 1e6, a large KKT
  # residual), the unscaled problem is the fallback and the lower objective
  # wins (objectives agree to float32 noise when both succeed, so they do not
  # decide then). Zero gradients make
  # the min-norm point 0: their tasks share the weight.
  scaling = numerics.cosine_scaling(gram)
  zero = ~scaling.nonzero
  safe = jnp.where(scaling.nonzero, scaling.norms, 1.0)
  scaled = numerics.box_simplex_qp(scaling.cosines, equality=1.0 / safe)
  unscaled = numerics.box_simplex_qp(gram)
  w_scaled = (scaled.x / safe).astype(gram.dtype)
  w_scaled = w_scaled / jnp.sum(w_scaled)
  use_scaled = jnp.all(jnp.isfinite(w_scaled)) & (
      (scaled.kkt_residual <= 1e-5) | (w_scaled @ gram @ w_scaled <= unscaled.x @ gram @ unscaled.x))
  w = jnp.where(use_scaled, w_scaled, unscaled.x)
  iterations = jnp.where(use_scaled, scaled.iterations, unscaled.iterations)
  w = jnp.where(jnp.any(zero), zero / jnp.maximum(jnp.sum(zero), 1), w).astype(gram.dtype)
  return w, w @ gram @ w, iterations


@numerics.full_precision
def mgda_solve(
    gram: jax.Array,
    *,
    normalization: Normalization = "none",
    task_losses: jax.Array | None = None,
    solver: Solver = "exact",
    max_iter: int = _MAX_ITER,
) -> tuple[jax.Array, MGDAInfo]:
  """MGDA weights (sum 1) with :class:`MGDAInfo`; see :func:`mgda`."""
  if solver not in ("exact", "pgd", "fw"):
    raise ValueError(f"solver must be 'exact', 'pgd' or 'fw', got {solver!r}.")
  normalized = _normalize(gram, gradient_normalizers(gram, normalization, task_losses))
  if solver == "exact":
    w, cost, iterations = _exact(normalized)
  else:
    # The official rules are scale invariant but for their 1e-7 step
    # thresholds; a Gram far from unit scale is brought back by a power of
    # two (exact), so that float32 neither overflows nor cancels.
    largest = jnp.max(jnp.abs(jnp.diagonal(normalized)))
    unsafe = (largest > 1e10) | ((largest < 1e-10) & (largest > 0))
    scale = jnp.where(unsafe, jnp.exp2(jnp.round(jnp.log2(jnp.where(unsafe, largest, 1.0)))), 1.0)
    w, cost, iterations = _official(normalized / scale, solver, max_iter)
    cost = cost * scale
  return w, MGDAInfo(cost=cost, kkt_residual=_kkt_residual(normalized, w), iterations=iterations)


@numerics.nan_for_nonfinite_gram
def mgda(
    gram: jax.Array,
    *,
    normalization: Normalization = "none",
    task_losses: jax.Array | None = None,
    solver: Solver = "exact",
    max_iter: int = _MAX_ITER,
) -> jax.Array:
  r"""MGDA weights: the min-norm point of the convex hull of the (normalised) gradients.

  .. math::
    w = \arg\min_{w \in \Delta_K} w^\top \tilde M w, \qquad
    \tilde M_{ij} = \frac{M_{ij}}{c_i c_j}

  with the official gradient normalisers ``c``: ``"none"`` (1), ``"l2"``
  (:math:`\|g_i\|`), ``"loss"`` (:math:`L_i`), ``"loss+"``
  (:math:`L_i \|g_i\|`). As in the official training code the weights then
  multiply the raw losses, so the update is :math:`J^\top w`. A task whose
  normaliser is 0 (zero gradient with ``"l2"``, zero loss) counts as a zero
  gradient, which makes the min-norm point 0 (a Pareto-stationary point).

  Solvers:

  - ``"exact"`` (default): closed form for ``K <= 2``; otherwise an
    interior-point method on the simplex QP with an active-set polish, to
    float32 precision for ``K`` up to 100 and more (KKT residual reported).
  - ``"pgd"`` / ``"fw"``: the official ``MinNormSolver.find_min_norm_element``
    (projected gradient) and ``find_min_norm_element_FW`` (Frank-Wolfe): best
    pair first, the two-point line search with its 0.999/0.001 boundary rule,
    stop when the iterate moves less than 1e-5 in L1. The official loop has
    no effective iteration cap; here ``max_iter`` (default 250, the official
    constant) is enforced.

  Args:
    gram: ``(K, K)`` Gram matrix.
    normalization: gradient normalisation before the solve.
    task_losses: ``(K,)`` losses, for ``"loss"`` and ``"loss+"``.
    solver: ``"exact"``, ``"pgd"`` or ``"fw"``.
    max_iter: iteration cap of the official solvers.

  Returns:
    ``(K,)`` weights on the simplex (sum 1).

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = optax_mtl.weighting.mgda(jac @ jac.T)
    >>> print(*(f"{x:.4f}" for x in w))
    0.6000 0.4000
  """
  return mgda_solve(gram, normalization=normalization, task_losses=task_losses, solver=solver,
                    max_iter=max_iter)[0]


def mgda_transform(
    num_tasks: int,
    *,
    normalization: Normalization = "none",
    solver: Solver = "exact",
    weights_sum: Literal["one", "num_tasks"] = "one",
    max_iter: int = _MAX_ITER,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""MGDA / MGDA-UB (Sener & Koltun, 2018): descend along the min-norm element.

  .. math::
    w = \arg\min_{w \in \Delta_K} w^\top \tilde M w, \qquad d = s\, J^\top w

  with :math:`s = 1` (``weights_sum="one"``, the isl-org/MultiObjectiveOptimization
  training code) or :math:`s = K` (``weights_sum="num_tasks"``,
  AvivNavon/nash-mtl's ``MGDA``). Every leaf, task-specific ones included,
  receives :math:`s\, J^\top w` (the official codes backpropagate
  :math:`\sum_t s\, w_t L_t`). See :func:`optax_mtl.weighting.mgda` for the
  normalisations and solvers.

  **MGDA-UB**: give the transform :func:`optax_mtl.feature_task_gradients`
  (encoder and heads): the min-norm problem is then solved on the gradients
  with respect to the shared representation and the update costs one
  backward pass through the encoder, as in the paper's Section 3.3.

  Args:
    num_tasks: number of tasks ``K``.
    normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``;
      the last two need ``task_losses``.
    solver: ``"exact"`` (default), ``"pgd"`` or ``"fw"``.
    weights_sum: ``"one"`` (default) or ``"num_tasks"``.
    max_iter: iteration cap of the official solvers.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram matrix).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state``
    holds the :class:`MGDAInfo` of the last solve.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> params = {"w": jnp.zeros(3)}
    >>> jac = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax_mtl.mgda(2)
    >>> updates, _ = tx.update(jac, tx.init(params), params)
    >>> updates["w"].round(5) + 0.0  # d = [0, 1, 1]: both tasks decrease
    Array([0., 1., 1.], dtype=float32)

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_, 2012.
  """
  k = contract.check_num_tasks(num_tasks)
  if weights_sum not in ("one", "num_tasks"):
    raise ValueError(f"weights_sum must be 'one' or 'num_tasks', got {weights_sum!r}.")
  gradient_normalizers(jnp.eye(k), normalization, jnp.ones(k))  # validates the option
  if solver not in ("exact", "pgd", "fw"):
    raise ValueError(f"solver must be 'exact', 'pgd' or 'fw', got {solver!r}.")
  factor = 1.0 if weights_sum == "one" else float(k)

  def init(num_tasks, dtype):
    zero = jnp.zeros([], dtype)
    return MGDAInfo(cost=zero, kkt_residual=zero, iterations=jnp.zeros([], jnp.int32))

  def update(gram, state, task_losses):
    w, info = mgda_solve(gram, normalization=normalization, task_losses=task_losses, solver=solver,
                         max_iter=max_iter)
    info = jax.tree.map(lambda new, old: new.astype(old.dtype), info, state)
    return factor * w, info

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update, needs_task_losses=normalization in ("loss", "loss+")),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), factor / k),
      nonfinite=nonfinite,
  )
