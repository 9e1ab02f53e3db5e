"""Linear scalarization (LS): fixed task weights, the baseline of every paper."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib


def linear_scalarization(
    num_tasks: int,
    weights: jax.Array | None = None,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Linear scalarization: the gradient of a fixed weighted sum of the losses.

  .. math::
    d = \sum_i c\, w_i\, g_i, \qquad c = 1 \text{ (sum) or } 1/K \text{ (mean)}

  i.e. the gradient of :math:`c \sum_i w_i L_i`. With the default ``weights``
  (ones) and ``reduction="sum"`` this is the ``LS`` baseline of Nash-MTL's
  tables (AvivNavon/nash-mtl ``LinearScalarization``); ``reduction="mean"``
  is TorchJD's ``Mean``. No Gram matrix is computed.

  Args:
    num_tasks: number of tasks ``K``.
    weights: ``(K,)`` task weights, default ones. Numeric, so it can be
      scheduled or changed through :func:`optax.inject_hyperparams` (with
      ``static_args=("num_tasks",)``).
    reduction: ``"sum"`` (default) or ``"mean"`` (divide by ``K``).
    shared: mask of the shared parameters; every leaf gets the same weighted
      sum, so it only matters for composition with other transforms.
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state's
    ``weights`` field holds ``c w``. Its ``update`` ignores the extra arg
    ``refresh_weights`` of the other methods: the weights apply at every step.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_mtl
    >>> params = {"w": jnp.zeros(2)}
    >>> loss_fn = lambda p: jnp.stack([(p["w"][0] - 1) ** 2, (p["w"][1] + 1) ** 2])
    >>> tx = optax.chain(optax_mtl.linear_scalarization(2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> jac = jax.jacrev(loss_fn)(params)
    >>> updates, state = tx.update(jac, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([ 0.2, -0.2], dtype=float32)
  """
  k = contract.check_num_tasks(num_tasks)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
  if weights is None:
    task_weights = jnp.ones((k,), jnp.float32)
  else:
    task_weights = contract.check_task_vector(weights, k, "weights")
  if reduction == "mean":
    task_weights = task_weights / k

  def constant(gram):
    del gram
    return task_weights

  return aggregation.ignoring_refresh_weights(aggregation.weighted_aggregation(
      k,
      aggregation.stateless(constant, needs_gram=False),
      shared=shared,
      initial_weights=task_weights,
      nonfinite=nonfinite,
  ))
