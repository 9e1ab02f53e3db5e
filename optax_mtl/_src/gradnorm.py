r"""GradNorm: learned task weights that balance the gradient norms.

Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in
Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_, ICML 2018.

.. math::
  L_{\text{grad}} = \sum_i \Big| w_i \|g_i\| - \overline{w \|g\|}\; r_i^\alpha \Big|,
  \qquad r_i = \frac{L_i(t)/L_i(0)}{\frac1K \sum_j L_j(t)/L_j(0)}

with the target treated as a constant; after each step the weights are
renormalised to sum to ``K``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib


class GradNormState(NamedTuple):
  """Method state of :func:`optax_mtl.gradnorm`.

  Attributes:
    task_weights: the learned weights (ones at the start, sum ``K``).
    initial_losses: :math:`L_i(0)`, from the first update.
    optimizer_state: state of the weights' optimizer.
  """

  task_weights: jax.Array
  initial_losses: jax.Array
  optimizer_state: Any


def gradnorm(
    num_tasks: int,
    *,
    alpha: float | jax.Array = 1.5,
    learning_rate: float | jax.Array = 0.025,
    optimizer: optax.GradientTransformation | None = None,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""GradNorm (Chen et al., 2018), trained inside the transform.

  The per-task gradient norms :math:`\|g_i\|` are those of the parameters
  marked by ``shared`` (the paper uses the last shared layer: pass a mask
  selecting it), read off the Gram diagonal. Each update uses the current
  weights :math:`w` (sum ``K``) for :math:`J^\top w`, then takes one step of
  :math:`w` on the L1 objective above with its own optimizer (Adam with
  ``learning_rate``, or ``optimizer``), clips at a small positive floor and
  renormalises to sum ``K``. :math:`L_i(0)` are the losses of the first
  update. ``alpha`` 1.5 is LibMTL's default (SamsungLabs/MTL uses 2). The
  weights' optimizer is independent of the outer one (see
  :func:`optax_mtl.uncertainty_weighting`). Needs ``task_losses``.

  Args:
    num_tasks: number of tasks ``K``.
    alpha: restoring-force strength.
    learning_rate: Adam learning rate of the weights (ignored with
      ``optimizer``).
    optimizer: optax transformation for the weights (default ``optax.adam``).
    update_weights_every: update the weights every this many steps.
    shared: mask of the parameters whose gradient norms are balanced (and
      that enter the Gram matrix).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state`` is
    a :class:`GradNormState`.

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
    ICML 2018.
  """
  k = contract.check_num_tasks(num_tasks)
  inner = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init(num_tasks, dtype):
    w = jnp.ones((num_tasks,), dtype)
    return GradNormState(task_weights=w, initial_losses=jnp.full((num_tasks,), jnp.nan, dtype),
                         optimizer_state=inner.init(w))

  def update(gram, state, task_losses):
    w = state.task_weights
    losses = task_losses.astype(w.dtype)
    initial = jnp.where(jnp.isnan(state.initial_losses), losses, state.initial_losses)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)).astype(w.dtype)
    weighted_norms = w * norms
    relative = losses / initial
    rates = relative / jnp.mean(relative)
    target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * rates**alpha)
    grad = jnp.sign(weighted_norms - target) * norms  # d/dw_i of sum_j |w_j n_j - target_j|
    step, optimizer_state = inner.update(grad, state.optimizer_state, w)
    new_w = jnp.maximum(optax.apply_updates(w, step), 1e-3)
    new_w = k * new_w / jnp.sum(new_w)
    return w, GradNormState(task_weights=new_w, initial_losses=initial, optimizer_state=optimizer_state)

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update, needs_task_losses=True),
      shared=shared,
      update_weights_every=update_weights_every,
      nonfinite=nonfinite,
  )
