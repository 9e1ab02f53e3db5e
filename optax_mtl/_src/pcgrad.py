r"""PCGrad: project away the conflicting components of the task gradients.

Yu et al., `Gradient Surgery for Multi-Task Learning
<https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.

For each task ``i``, visiting the tasks in a random order, the current
projected gradient loses its component along ``g_j`` whenever they conflict:

.. math::
  g_i' \leftarrow g_i' - \frac{\min(0, g_i'^\top g_j)}{\|g_j\|^2} g_j,
  \qquad d = \sum_i g_i' .

Each :math:`g_i'` stays a combination :math:`c^{(i)\top} J` of the original
gradients, and :math:`g_i'^\top g_j = c^{(i)\top} M_{:j}`, so the whole
procedure runs on the Gram matrix and returns :math:`w = \sum_i c^{(i)}`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import randomness
from optax_mtl._src import shared as shared_lib


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """One independent random order of the ``K`` tasks per task: ``(K, K)``."""
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def pcgrad(
    gram: jax.Array,
    key: jax.Array | None = None,
    *,
    permutations: jax.Array | None = None,
    skip_self: bool = False,
) -> jax.Array:
  r"""PCGrad weights: the coefficients of the sum of the projected gradients.

  Row ``i`` of ``permutations`` is the order in which task ``i`` visits the
  tasks (drawn from ``key`` when not given: an independent uniform order per
  task). As AvivNavon/nash-mtl ``PCGrad``, the order includes ``i`` itself
  (a projection on its own original gradient, which only acts when the
  projected gradient came to oppose it); ``skip_self=True`` skips it, as
  TorchJD. A zero gradient is never projected on (its inner products are 0).

  Args:
    gram: ``(K, K)`` Gram matrix.
    key: PRNG key for the orders (ignored when ``permutations`` is given).
    permutations: ``(K, K)`` int array of task orders.
    skip_self: skip ``j = i`` (TorchJD) instead of including it (official).

  Returns:
    ``(K,)`` weights (the sum, not the mean, of the projected gradients).

  Example:
    >>> import jax, jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = optax_mtl.weighting.pcgrad(jac @ jac.T, jax.random.key(0))
    >>> print(*(f"{x:.4f}" for x in w))
    2.2222 1.5789
  """
  k = gram.shape[0]
  if permutations is None:
    if key is None:
      raise ValueError("pcgrad needs a PRNG key or explicit permutations.")
    permutations = task_orders(key, k)
  diagonal = jnp.diagonal(gram)

  def project(i, order):
    def visit(position, c):
      j = order[position]
      inner = c @ gram[:, j]
      conflict = (inner < 0) & (diagonal[j] > 0)
      if skip_self:
        conflict = conflict & (j != i)
      return c.at[j].add(jnp.where(conflict, -inner / jnp.where(conflict, diagonal[j], 1.0), 0.0))

    return lax.fori_loop(0, k, visit, jnp.zeros((k,), gram.dtype).at[i].set(1.0))

  return jnp.sum(jax.vmap(project)(jnp.arange(k), permutations), axis=0)


def pcgrad_transform(
    num_tasks: int,
    key: int | jax.Array = 0,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    skip_self: bool = False,
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad (Yu et al., 2020): gradient surgery on conflicting task gradients.

  The shared update is the sum (``reduction="mean"``: the mean) of the
  projected gradients of :func:`optax_mtl.weighting.pcgrad`, with fresh random
  orders at every step from the ``key`` carried in the state. As
  AvivNavon/nash-mtl ``PCGrad`` (``reduction="sum"``), task-specific
  parameters get the gradient of the sum of the losses, i.e. their plain
  gradients (``task_specific="weighted"``: ``w``-weighted ones).

  Args:
    num_tasks: number of tasks ``K``.
    key: an int seed or a single PRNG key (``jax.random.key`` of any
      implementation, or ``jax.random.PRNGKey`` data); an int also works as
      an injected hyperparameter of :func:`optax.inject_hyperparams`.
    reduction: ``"sum"`` (official) or ``"mean"``.
    skip_self: skip the self-projection (TorchJD) instead of the official order.
    task_specific: ``"unweighted"`` (official) or ``"weighted"``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state``
    holds the key data.

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  k = contract.check_num_tasks(num_tasks)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  initial_key, key_impl = randomness.key_data(key)
  factor = 1.0 if reduction == "sum" else 1.0 / k

  def update(gram, key_data, task_losses):
    del task_losses
    key_data, sub = randomness.next_key(key_data, key_impl)
    return factor * pcgrad(gram, sub, skip_self=skip_self), key_data

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=lambda num_tasks, dtype: initial_key, update=update),
      shared=shared,
      update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), factor),
      task_specific_weights=jnp.ones((k,), jnp.float32) if task_specific == "unweighted" else None,
      nonfinite=nonfinite,
  )
