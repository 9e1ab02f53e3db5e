r"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024 (UPGrad; TorchJD). DualProj is the
projection of GEM (Lopez-Paz & Ranzato, 2017) applied to the average gradient.

The projection of :math:`J^\top u` onto the dual cone
:math:`\{d : J d \ge 0\}` is :math:`J^\top v` with

.. math::
  v = \arg\min_{v \ge u} v^\top M v ,

a small non-negative QP in :math:`v - u`; its optimality conditions give
:math:`M v \ge 0`: the projected direction conflicts with no task.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib


def _working_gram(gram, regularization):
  """``M``, or TorchJD's ``M / tr(M) + reg I`` when ``regularization > 0``."""
  if isinstance(regularization, (int, float)) and regularization == 0:
    return gram
  trace = jnp.maximum(jnp.trace(gram), jnp.finfo(gram.dtype).tiny)
  return gram / trace + regularization * jnp.eye(gram.shape[0], dtype=gram.dtype)


def project_to_dual_cone(gram: jax.Array, u: jax.Array) -> jax.Array:
  r""":math:`v = \arg\min_{v \ge u} v^\top M v`, exactly (KKT to float32 rounding).

  Solved in the variables :math:`z = D (v - u) \ge 0` where the quadratic
  form is the cosine matrix, so tasks whose norms differ by orders of
  magnitude are resolved; zero gradients keep :math:`v_i = u_i`. A ridge of
  one machine epsilon on the unit-diagonal cosine matrix keeps the minimiser
  bounded at Pareto-stationary sets (without it the weights grow to 1e12 and
  the direction is lost to cancellation).
  """
  k = gram.shape[0]
  scaling = numerics.cosine_scaling(gram)
  active = scaling.nonzero
  norms = jnp.where(active, scaling.norms, 1.0)
  cosines = jnp.where(active[:, None] & active[None, :], scaling.cosines, jnp.eye(k, dtype=gram.dtype))
  # At a Pareto-stationary set the minimisers form an unbounded face; a ridge
  # at float32 resolution keeps them bounded without moving the projection
  # beyond rounding.
  cosines = cosines + jnp.finfo(gram.dtype).eps * jnp.eye(k, dtype=gram.dtype)
  # min (u + z/n)^T M (u + z/n) = z^T C z + 2 (n u)^T C z + const over z >= 0.
  linear = jnp.where(active, cosines @ jnp.where(active, norms * u, 0.0), 0.0)
  z = numerics.box_simplex_qp(cosines, linear, simplex=False).x
  return u + jnp.where(active, z / norms, 0.0)


def _preference(k, preference, dtype):
  if preference is None:
    return jnp.full((k,), 1.0 / k, dtype)
  return contract.check_task_vector(preference, k, "preference").astype(dtype)


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def upgrad(gram: jax.Array, *, preference: jax.Array | None = None, regularization: float = 0.0) -> jax.Array:
  r"""UPGrad weights: the sum of the projections of each :math:`p_i g_i` onto the dual cone.

  .. math::
    w = \sum_i v^{(i)}, \qquad v^{(i)} = \arg\min_{v \ge p_i e_i} v^\top M v

  so :math:`d = J^\top w` averages (for the default preference
  :math:`p = 1/K`, TorchJD's) the projections of the task gradients onto
  :math:`\{d : J d \ge 0\}` and satisfies :math:`M w \ge 0`: no task
  conflicts with the update. Each QP is solved exactly in-graph (interior
  point with an active-set polish; KKT residual reported by the solver at
  float32 rounding).

  ``regularization`` reproduces TorchJD's ``QuadprogProjector``
  (``M / tr(M) + reg I`` with ``reg = 1e-4``); the default 0 solves the
  projection itself. (TorchJD also falls back to the mean when
  :math:`\mathrm{tr}(M) < 10^{-4}`, an absolute threshold this function
  does not copy.)

  Args:
    gram: ``(K, K)`` Gram matrix.
    preference: ``(K,)`` preference ``p``; ``None`` is ``1/K`` (TorchJD's
      default).
    regularization: ridge added to the trace-normalised Gram (0: none).

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = optax_mtl.weighting.upgrad(jac @ jac.T, preference=jnp.ones(2))
    >>> print(*(f"{x:.4f}" for x in w))
    2.2222 1.5789
  """
  k = gram.shape[0]
  working = _working_gram(gram, regularization)
  p = _preference(k, preference, gram.dtype)
  project = lambda u: project_to_dual_cone(working, u)
  if jax.default_backend() == "cpu":
    # One projection after another: the batched solver loops have deadlocked
    # XLA:CPU's runtime (jax 0.10.2; every thread parked on a futex, no CPU
    # used) in a K = 40 training step, float32 too, while the unbatched
    # loops never did.
    columns = jax.lax.map(project, jnp.diag(p))
  else:
    columns = jax.vmap(project)(jnp.diag(p))
  return jnp.sum(columns, axis=0)


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def dualproj(gram: jax.Array, *, preference: jax.Array | None = None, regularization: float = 0.0) -> jax.Array:
  r"""DualProj weights: the projection of :math:`J^\top p` onto the dual cone.

  .. math::
    w = \arg\min_{w \ge p} w^\top M w

  (GEM's projection of the averaged gradient; TorchJD's ``DualProj``), with
  :math:`M w \ge 0`. See :func:`upgrad` for ``preference`` and
  ``regularization``.

  Args:
    gram: ``(K, K)`` Gram matrix.
    preference: ``(K,)`` preference; ``None`` is ``1/K``.
    regularization: ridge added to the trace-normalised Gram (0: none).

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> print(*(f"{x:.4f}" for x in optax_mtl.weighting.dualproj(jac @ jac.T)))
    0.6111 0.5000
  """
  k = gram.shape[0]
  return project_to_dual_cone(_working_gram(gram, regularization), _preference(k, preference, gram.dtype))


def _dual_cone_transform(weighting, num_tasks, preference, regularization, task_specific, update_weights_every,
                         shared, nonfinite):
  k = contract.check_num_tasks(num_tasks)
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  if preference is not None:
    contract.check_task_vector(preference, k, "preference")
  return aggregation.weighted_aggregation(
      k,
      lambda gram: weighting(gram, preference=preference, regularization=regularization),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), 1.0 / k),
      task_specific_weights=jnp.ones((k,), jnp.float32) if task_specific == "unweighted" else None,
      nonfinite=nonfinite,
  )


def upgrad_transform(
    num_tasks: int,
    *,
    preference: jax.Array | None = None,
    regularization: float | jax.Array = 0.0,
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto the dual cone.

  The weights of :func:`optax_mtl.weighting.upgrad`. As TorchJD's
  ``mtl_backward``, task-specific parameters receive their plain gradients
  (``task_specific="weighted"`` gives them ``w``-weighted ones).

  Args:
    num_tasks: number of tasks ``K``.
    preference: ``(K,)`` preference, ``None`` for ``1/K``.
    regularization: TorchJD's relative ridge (0: the exact projection).
    task_specific: ``"unweighted"`` (TorchJD) or ``"weighted"``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  return _dual_cone_transform(upgrad, num_tasks, preference, regularization, task_specific,
                              update_weights_every, shared, nonfinite)


def dualproj_transform(
    num_tasks: int,
    *,
    preference: jax.Array | None = None,
    regularization: float | jax.Array = 0.0,
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: the averaged gradient projected onto the dual cone of the task gradients.

  The weights of :func:`optax_mtl.weighting.dualproj` (TorchJD's
  ``DualProj``; the projection of GEM). Options as :func:`upgrad`.

  Args:
    num_tasks: number of tasks ``K``.
    preference: ``(K,)`` preference, ``None`` for ``1/K``.
    regularization: TorchJD's relative ridge (0: the exact projection).
    task_specific: ``"unweighted"`` (TorchJD) or ``"weighted"``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  """
  return _dual_cone_transform(dualproj, num_tasks, preference, regularization, task_specific,
                              update_weights_every, shared, nonfinite)
