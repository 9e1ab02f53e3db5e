r"""GradVac: gradient vaccine, aligning task gradients to adaptive cosine targets.

Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models
<https://arxiv.org/abs/2010.05874>`_, ICLR 2021.

Like PCGrad, but a pair is corrected whenever its cosine falls below a target
:math:`\hat\phi_{ij}` tracked by an exponential moving average, and the
correction brings the cosine exactly to the target:

.. math::
  g_i' \leftarrow g_i' + \frac{\|g_i'\| (\hat\phi \sqrt{1-\phi^2} - \phi \sqrt{1-\hat\phi^2})}
  {\|g_j\| \sqrt{1-\hat\phi^2}} g_j, \qquad
  \hat\phi_{ij} \leftarrow (1-\beta) \hat\phi_{ij} + \beta \phi_{ij} .
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
from optax_mtl._src import pcgrad as pcgrad_lib
from optax_mtl._src import randomness
from optax_mtl._src import shared as shared_lib

Ema = Literal["always", "on_correction"]


def _check_ema(ema):
  if ema not in ("always", "on_correction"):
    raise ValueError(f"ema must be 'always' or 'on_correction', got {ema!r}.")


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def gradvac(
    gram: jax.Array,
    targets: jax.Array | None = None,
    key: jax.Array | None = None,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    ema: Ema = "always",
    permutations: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""GradVac weights and updated cosine targets.

  For each task ``i`` the other tasks are visited in a random order (row
  ``i`` of ``permutations``, or drawn from ``key``; entries equal to ``i`` are
  skipped, so TorchJD's ``K-1``-long orders can be given padded). The
  computation runs on the cosine matrix: it is invariant to the scale of
  each task's gradient, and ``eps`` (added, as in TorchJD, to the two
  denominators) is relative to unit norms.

  A correction aims at :math:`\min(\hat\phi, 1 - 16\,\epsilon)` (the
  dtype's machine epsilon): a target of exactly 1, which the EMA of
  duplicated tasks reaches in float32, is unreachable, and the references'
  step towards it divides by ``eps`` (SamsungLabs: by 0) as soon as the
  cosine rounds below 1. The stored targets are the plain EMA.

  Args:
    gram: ``(K, K)`` Gram matrix.
    targets: ``(K, K)`` cosine targets :math:`\hat\phi` (zeros at the start).
    key: PRNG key for the orders.
    beta: EMA rate of the targets (paper: 0.5 in the official setting).
    eps: stabiliser of the cosine and of the correction (0: SamsungLabs/MTL).
    ema: ``"always"``: every visited pair's target moves towards its cosine
      (paper, TorchJD); ``"on_correction"``: only corrected pairs
      (SamsungLabs/MTL, LibMTL), so targets can only decrease.
    permutations: ``(K, K)`` or ``(K, K-1)`` int array of orders.

  Returns:
    ``(weights, targets)``: ``(K,)`` weights (the sum of the corrected
    gradients) and the ``(K, K)`` updated targets.
  """
  _check_ema(ema)
  k = gram.shape[0]
  if targets is None:
    targets = jnp.zeros((k, k), gram.dtype)
  if permutations is None:
    if key is None:
      raise ValueError("gradvac needs a PRNG key or explicit permutations.")
    permutations = pcgrad_lib.task_orders(key, k)
  scaling = numerics.cosine_scaling(gram)
  cos = jnp.where(scaling.nonzero[:, None] & scaling.nonzero[None, :], scaling.cosines, 0.0)
  unit = scaling.nonzero.astype(gram.dtype)  # ||g_j|| in cosine scale (0 for zero gradients)
  target_margin = 16 * jnp.finfo(gram.dtype).eps

  def vaccinate(i, order, row_targets):
    def visit(position, carry):
      c, row = carry
      j = order[position]
      inner = c @ cos[:, j]
      norm_i = jnp.sqrt(jnp.maximum(c @ (cos @ c), 0.0))
      # A cosine, kept in [-1, 1]: once corrections cancel g_i' (collinear
      # tasks), its norm is float32 rounding noise and, with eps = 0, the ratio
      # is far outside (or 0/0), which drove the targets to -inf and the
      # weights to NaN. A zero vector conflicts with nothing: cosine 0.
      denominator = norm_i * unit[j] + eps
      phi = jnp.where(denominator > 0, jnp.clip(inner / jnp.where(denominator > 0, denominator, 1.0), -1.0, 1.0),
                      0.0)
      target = row[j]
      # The correction's size grows as 1 / sqrt(1 - target^2): a target at 1
      # (duplicated tasks, whose EMA reaches 1.0 in float32) cannot be reached
      # and, with a cosine rounded just below it, the step was divided by eps
      # (an update 1e7 times the gradients'). Capped a few ulps below 1, the
      # duplicates' own cosine is no longer below the target.
      reachable = jnp.minimum(target, 1.0 - target_margin)
      visit_pair = (j != i) & (unit[j] > 0)
      correct = visit_pair & (phi < reachable)
      root_target = jnp.sqrt(1.0 - reachable**2)
      step = norm_i * (reachable * jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0)) - phi * root_target) / (
          unit[j] * root_target + eps)
      c = c.at[j].add(jnp.where(correct, step, 0.0))
      moves = correct if ema == "on_correction" else visit_pair
      row = row.at[j].set(jnp.where(moves, (1.0 - beta) * target + beta * phi, target))
      return c, row

    start = jnp.zeros((k,), gram.dtype).at[i].set(scaling.nonzero[i].astype(gram.dtype))
    return lax.fori_loop(0, permutations.shape[1], visit, (start, row_targets))

  coefficients, targets = jax.vmap(vaccinate)(jnp.arange(k), permutations, targets.astype(gram.dtype))
  # Back from cosine scale: g_i' = sum_j c_ij u_j = sum_j (c_ij / n_j) g_j, scaled by n_i.
  norms = jnp.where(scaling.nonzero, scaling.norms, 0.0)
  inverse = jnp.where(scaling.nonzero, 1.0 / jnp.where(scaling.nonzero, scaling.norms, 1.0), 0.0)
  weights = jnp.sum(norms[:, None] * coefficients * inverse[None, :], axis=0)
  return weights, targets


class GradVacState(NamedTuple):
  """Method state of :func:`optax_mtl.gradvac`: cosine targets and the key."""

  targets: jax.Array
  key: jax.Array


def gradvac_transform(
    num_tasks: int,
    key: int | jax.Array = 0,
    *,
    beta: float | jax.Array = 0.5,
    eps: float | jax.Array = 1e-8,
    ema: Ema = "always",
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""GradVac (Wang et al., 2021): gradient vaccine with EMA cosine targets.

  The weights of :func:`optax_mtl.weighting.gradvac`; the ``(K, K)`` targets
  (zeros at the start) and the key live in the state. The default follows
  the paper and TorchJD (every visited pair's target is updated, ``eps =
  1e-8``, task-specific parameters get their plain gradients);
  ``ema="on_correction", eps=0`` is SamsungLabs/MTL's balancer.

  Args:
    num_tasks: number of tasks ``K``.
    key: an int seed or a single PRNG key (``jax.random.key`` of any
      implementation, or ``jax.random.PRNGKey`` data); an int also works as
      an injected hyperparameter of :func:`optax.inject_hyperparams`.
    beta: EMA rate of the targets.
    eps: stabiliser (relative to unit gradient norms).
    ema: ``"always"`` (paper, TorchJD) or ``"on_correction"`` (SamsungLabs).
    task_specific: ``"unweighted"`` or ``"weighted"``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state`` is
    a :class:`GradVacState`.

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
  """
  k = contract.check_num_tasks(num_tasks)
  _check_ema(ema)
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  initial_key, key_impl = randomness.key_data(key)

  def init(num_tasks, dtype):
    return GradVacState(targets=jnp.zeros((num_tasks, num_tasks), dtype), key=initial_key)

  def update(gram, state, task_losses):
    del task_losses
    key_data, sub = randomness.next_key(state.key, key_impl)
    weights, targets = gradvac(gram, state.targets, sub, beta=beta, eps=eps, ema=ema)
    return weights, GradVacState(targets=targets.astype(state.targets.dtype), key=key_data)

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update),
      shared=shared,
      update_weights_every=update_weights_every,
      task_specific_weights=jnp.ones((k,), jnp.float32) if task_specific == "unweighted" else None,
      nonfinite=nonfinite,
  )
