"""Scale-invariant linear scalarization (SI): descend on the sum of log-losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib


def scale_invariant(
    num_tasks: int,
    *,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Scale-invariant scalarization: the gradient of :math:`\sum_i \log L_i`.

  .. math::
    w_i = 1 / L_i, \qquad d = \sum_i g_i / L_i

  invariant to a rescaling of any loss (AvivNavon/nash-mtl
  ``ScaleInvariantLinearScalarization``, a baseline of the Nash-MTL paper).
  Needs ``task_losses``; they must be positive: a non-positive loss makes its
  weight non-finite and the step is skipped and counted (see
  :func:`optax_mtl.weighted_aggregation`). No Gram matrix is computed, so
  with :func:`optax_mtl.task_gradients` a step costs one backward pass.

  Args:
    num_tasks: number of tasks ``K``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (every leaf gets the same weights).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> params = {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = optax_mtl.scale_invariant(2)
    >>> updates, _ = tx.update(jac, tx.init(params), params, task_losses=jnp.array([0.5, 4.0]))
    >>> updates["w"]
    Array([2.  , 0.25], dtype=float32)
  """
  k = contract.check_num_tasks(num_tasks)

  def update(gram, state, task_losses):
    del gram
    return jnp.where(task_losses > 0, 1.0 / task_losses, jnp.nan), state

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=lambda num_tasks, dtype: (), update=update, needs_gram=False,
                            needs_task_losses=True),
      shared=shared,
      update_weights_every=update_weights_every,
      nonfinite=nonfinite,
  )
