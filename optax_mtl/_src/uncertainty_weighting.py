r"""Uncertainty weighting (UW): learned homoscedastic task uncertainties.

Kendall et al., `Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.

The total loss :math:`\sum_i \tfrac12 (e^{-s_i} L_i + s_i)` is minimised over
the model and the log-variances :math:`s`; the model sees the weights
:math:`\tfrac12 e^{-s_i}`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib


class UncertaintyState(NamedTuple):
  """Method state of :func:`optax_mtl.uncertainty_weighting`.

  Attributes:
    log_variances: the learned ``s`` (zeros at the start).
    optimizer_state: state of the optimizer of ``s``.
  """

  log_variances: jax.Array
  optimizer_state: Any


def uncertainty_weighting(
    num_tasks: int,
    *,
    learning_rate: float | jax.Array = 0.025,
    optimizer: optax.GradientTransformation | None = None,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Uncertainty weighting (Kendall et al., 2018), trained inside the transform.

  .. math::
    \mathcal L = \sum_i \tfrac12 \big(e^{-s_i} L_i + s_i\big), \qquad
    w_i = \tfrac12 e^{-s_i}, \qquad
    \frac{\partial \mathcal L}{\partial s_i} = \tfrac12 (1 - e^{-s_i} L_i)

  as AvivNavon/nash-mtl ``Uncertainty`` (``s`` initialised at 0, so the
  weights start at 0.5; stationary at :math:`s_i = \log L_i`). Each update
  uses the current ``s`` for the weights, then takes one step of ``s`` with
  its own optimizer: Adam with ``learning_rate`` (nash-mtl's
  ``--method-params-lr`` default, 0.025), or ``optimizer`` if given. That
  optimizer is independent of the one chained after this transform (the
  official code puts ``s`` in a second parameter group of the model's Adam;
  a learning-rate schedule on the outer optimizer does not reach ``s``:
  schedule ``learning_rate`` through :func:`optax.inject_hyperparams` or pass
  a scheduled ``optimizer``). Needs ``task_losses``; no Gram matrix.

  Args:
    num_tasks: number of tasks ``K``.
    learning_rate: Adam learning rate of ``s`` (ignored with ``optimizer``).
    optimizer: optax transformation for ``s`` (default ``optax.adam``).
    update_weights_every: update the weights and ``s`` every this many steps.
    shared: mask of the shared parameters (every leaf gets the same weights).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state`` is
    an :class:`UncertaintyState`.

  References:
    Kendall et al., `Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_,
    CVPR 2018.
  """
  k = contract.check_num_tasks(num_tasks)
  inner = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init(num_tasks, dtype):
    s = jnp.zeros((num_tasks,), dtype)
    return UncertaintyState(log_variances=s, optimizer_state=inner.init(s))

  def update(gram, state, task_losses):
    del gram
    s = state.log_variances
    weights = 0.5 * jnp.exp(-s)
    grad = 0.5 * (1.0 - jnp.exp(-s) * task_losses.astype(s.dtype))
    step, optimizer_state = inner.update(grad, state.optimizer_state, s)
    return weights, UncertaintyState(optax.apply_updates(s, step), optimizer_state)

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update, needs_gram=False, needs_task_losses=True),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), 0.5),
      nonfinite=nonfinite,
  )
