r"""Dynamic weight average (DWA): weights from the recent rate of change of each loss.

Liu et al., `End-to-End Multi-Task Learning with Attention
<https://arxiv.org/abs/1803.10704>`_, CVPR 2019.

.. math::
  w_i = K \, \mathrm{softmax}(r / T)_i, \qquad
  r_i = \bar L_i^{(\text{newer})} / \bar L_i^{(\text{older})}
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib


class DWAState(NamedTuple):
  """Loss history of :func:`optax_mtl.dwa`.

  Attributes:
    history: ``(2 * window, K)`` losses, oldest first (``"sliding"``: the
      last ``2 * window`` steps, ones before any; ``"blockwise"``: rows 0 and
      1 hold the averages of the two last complete windows, row 2 the sum of
      the current one).
    steps: steps seen.
    ratios_weights: the ``K softmax(r / T)`` in force (ones at the start).
  """

  history: jax.Array
  steps: jax.Array
  ratios_weights: jax.Array


def dwa(
    num_tasks: int,
    *,
    temperature: float | jax.Array = 2.0,
    window: int = 25,
    mode: Literal["sliding", "blockwise"] = "sliding",
    reduction: Literal["mean", "sum"] = "mean",
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic weight average (Liu et al., 2019).

  :math:`w = K\,\mathrm{softmax}(r / T)` with :math:`r_i` the ratio of the
  average loss of task ``i`` over the newer of two consecutive windows to
  that over the older one: tasks whose loss falls slowly get more weight.

  - ``mode="sliding"`` (default, AvivNavon/nash-mtl and SamsungLabs/MTL
    ``DynamicWeightAverage``): the windows are the last ``2 * window`` steps
    (the current one included), initialised with ones; the weights are ones
    for the first ``window + 1`` steps and recomputed at every step after.
  - ``mode="blockwise"``: the paper's epoch-level rule with ``window`` =
    steps per epoch: the weights change only at window boundaries, from the
    averages of the last two complete windows, and are ones during the first
    two windows.

  A task whose loss averaged exactly 0 over the older window gets the ratio 1
  (the references divide 0 by 0 and stop training on NaN weights).

  ``reduction="mean"`` (nash-mtl: the mean of the weighted losses, i.e.
  weights summing to 1) or ``"sum"`` (the paper: weights summing to ``K``).
  Needs ``task_losses``; no Gram matrix is computed, so with
  :func:`optax_mtl.task_gradients` a step costs one backward pass.

  Args:
    num_tasks: number of tasks ``K``.
    temperature: ``T`` (2 in both references).
    window: window length in steps (nash-mtl: 25; blockwise: steps per epoch).
    mode: ``"sliding"`` or ``"blockwise"``.
    reduction: ``"mean"`` or ``"sum"``.
    shared: mask of the shared parameters (every leaf gets the same weights).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state`` is
    a :class:`DWAState`. Its ``update`` ignores the extra arg
    ``refresh_weights`` of the other methods: the loss history moves at every
    step.

  References:
    Liu et al., `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  k = contract.check_num_tasks(num_tasks)
  if mode not in ("sliding", "blockwise"):
    raise ValueError(f"mode must be 'sliding' or 'blockwise', got {mode!r}.")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
  window = contract.check_static_int(window, "window", "the loss history's shape", ("num_tasks", "window"))
  factor = 1.0 / k if reduction == "mean" else 1.0

  def init(num_tasks, dtype):
    rows = 2 * window if mode == "sliding" else 3
    return DWAState(jnp.ones((rows, num_tasks), dtype), jnp.zeros([], jnp.int32), jnp.ones((num_tasks,), dtype))

  def softmax_weights(newer, older):
    # A task whose loss averaged exactly 0 over the older window (a float32
    # cross-entropy of confident, correct predictions) has no rate: 0 / 0 made
    # every weight NaN, the step was skipped with the history rolled back, and
    # so was every later step. Such a task counts as unchanged (ratio 1); the
    # clip keeps an overflowing ratio finite and NaN losses NaN.
    ratios = jnp.where(older != 0, newer / jnp.where(older != 0, older, 1.0), 1.0)
    limit = jnp.finfo(ratios.dtype).max
    return k * jax.nn.softmax(jnp.clip(ratios / temperature, -limit, limit))

  def update(gram, state, task_losses):
    del gram
    losses = task_losses.astype(state.history.dtype)
    if mode == "sliding":
      history = jnp.concatenate([state.history[1:], losses[None]], axis=0)
      fresh = softmax_weights(jnp.mean(history[window:], axis=0), jnp.mean(history[:window], axis=0))
      weights = jnp.where(state.steps > window, fresh, state.ratios_weights)
    else:
      position = state.steps % window
      current = state.history[2] * (position > 0) + losses
      boundary = position == window - 1
      older, newer = state.history[0], state.history[1]
      completed = (state.steps + 1) // window  # windows completed after this step
      shifted = jnp.stack([newer, current / window, jnp.zeros_like(current)])
      history = jnp.where(boundary, shifted, jnp.stack([older, newer, current]))
      fresh = softmax_weights(history[1], history[0])
      # This step still belongs to the current window: the fresh weights
      # apply from the next one.
      new_state = DWAState(history, state.steps + 1,
                           jnp.where(boundary & (completed >= 2), fresh, state.ratios_weights))
      return factor * state.ratios_weights, new_state
    new_state = DWAState(history, state.steps + 1, weights)
    return factor * weights, new_state

  return aggregation.ignoring_refresh_weights(aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update, needs_gram=False, needs_task_losses=True),
      shared=shared,
      initial_weights=jnp.full((k,), factor),
      nonfinite=nonfinite,
  ))
