r"""Aligned-MTL and Aligned-MTL-UB: align the principal components of the gradient system.

Senushkin et al., `Independent Component Alignment for Multi-Task Learning
<https://arxiv.org/abs/2305.19000>`_, CVPR 2023.

With :math:`M = V \Lambda V^\top` (kept eigenpairs only), the balance matrix

.. math::
  B = \sqrt{s}\, V \Lambda^{-1/2} V^\top

makes the aligned gradients :math:`\hat J = B J` orthogonal with equal norms
:math:`\sqrt{s}` (condition number 1), and the update is
:math:`d = \hat J^\top \omega = J^\top (B \omega)`: the weights are
:math:`w = B \omega`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib

ScaleMode = Literal["min", "median", "rmse"]

# The official rank tolerance uses torch.finfo().eps of the default dtype,
# float32 in the original training runs.
FLOAT32_EPS = float(np.finfo(np.float32).eps)


class AlignedInfo(NamedTuple):
  """Diagnostics of the gradient system (computed on the unaligned Gram).

  Attributes:
    singular_values: ``(K,)`` singular values of ``J`` (square roots of the
      eigenvalues of ``M``), descending, 0 beyond the numerical rank.
    rank: numerical rank (eigenvalues above ``max(lambda) * K * eps``).
    condition_number: ``sigma_max / sigma_min`` over the kept singular values:
      the paper's stability criterion (1 for an aligned system; 0 when rank 0).
    cosines: ``(K, K)`` pairwise cosines of the task gradients.
    magnitude_similarity: ``(K, K)`` gradient magnitude similarity
      ``2 n_i n_j / (n_i^2 + n_j^2)``.
  """

  singular_values: jax.Array
  rank: jax.Array
  condition_number: jax.Array
  cosines: jax.Array
  magnitude_similarity: jax.Array


def balance_matrix(gram: jax.Array, *, scale_mode: ScaleMode = "min", eps: float = FLOAT32_EPS):
  """``B``, the ascending eigenvalues and the mask of the kept ones."""
  if scale_mode not in ("min", "median", "rmse"):
    raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
  k = gram.shape[0]
  eigenvalues, basis = numerics.graded_eigh(gram)  # ascending
  tol = jnp.max(eigenvalues) * k * eps
  kept = eigenvalues > tol
  rank = jnp.sum(kept)
  safe = jnp.where(kept, eigenvalues, 1.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
  elif scale_mode == "median":
    # torch.median: the lower median of the kept eigenvalues, which are the
    # last `rank` entries of the ascending order.
    scale = eigenvalues[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
  else:
    scale = jnp.sum(jnp.where(kept, eigenvalues, 0.0)) / jnp.maximum(rank, 1)
  scale = jnp.where(rank > 0, scale, 0.0)
  factors = jnp.where(kept, jnp.sqrt(jnp.where(rank > 0, scale, 0.0) / safe), 0.0)
  return (basis * factors[None, :]) @ basis.T, eigenvalues, kept


def _info(gram, eigenvalues, kept):
  k = gram.shape[0]
  singular = jnp.sqrt(jnp.where(kept, eigenvalues, 0.0))[::-1]
  smallest = jnp.min(jnp.where(kept, jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), jnp.inf))
  condition = jnp.where(jnp.any(kept), singular[0] / smallest, 0.0)
  scaling = numerics.cosine_scaling(gram)
  n = scaling.norms
  denominator = n[:, None] ** 2 + n[None, :] ** 2
  similarity = jnp.where(denominator > 0, 2 * n[:, None] * n[None, :] / jnp.where(denominator > 0, denominator, 1.0), 0.0)
  del k
  return AlignedInfo(
      singular_values=singular,
      rank=jnp.sum(kept).astype(jnp.int32),
      condition_number=condition,
      cosines=scaling.cosines,
      magnitude_similarity=similarity,
  )


@numerics.full_precision
def aligned_solve(
    gram: jax.Array,
    *,
    scale_mode: ScaleMode = "min",
    preference: jax.Array | None = None,
    eps: float = FLOAT32_EPS,
) -> tuple[jax.Array, AlignedInfo]:
  """Aligned-MTL weights with :class:`AlignedInfo`; see :func:`aligned`."""
  k = gram.shape[0]
  b, eigenvalues, kept = balance_matrix(gram, scale_mode=scale_mode, eps=eps)
  omega = jnp.ones((k,), gram.dtype) if preference is None else contract.check_task_vector(preference, k, "preference")
  return b @ omega.astype(gram.dtype), _info(gram, eigenvalues, kept)


@numerics.nan_for_nonfinite_gram
def aligned(
    gram: jax.Array,
    *,
    scale_mode: ScaleMode = "min",
    preference: jax.Array | None = None,
    eps: float = FLOAT32_EPS,
) -> jax.Array:
  r"""Aligned-MTL weights :math:`w = B \omega`.

  Eigendecomposes :math:`M = V \Lambda V^\top`, keeps the eigenpairs with
  :math:`\lambda > \max(\lambda) K \epsilon` (the official threshold, with
  float32 :math:`\epsilon` by default), and forms
  :math:`B = \sqrt{s}\, V \Lambda^{-1/2} V^\top` with :math:`s` the smallest
  kept eigenvalue (``"min"``, the paper's choice and the default), their
  lower median (``"median"``, as ``torch.median``) or their mean
  (``"rmse"``). Then :math:`B J` has orthogonal rows of norm :math:`\sqrt{s}`.

  ``preference`` :math:`\omega` weighs the aligned gradients (the paper's
  pre-defined task weights); ``None`` means ones, the sum of the aligned
  gradients of the official SamsungLabs/MTL code (TorchJD's ``AlignedMTL``
  uses the mean, i.e. ``preference = ones / K``). A rank-0 Gram (all
  gradients zero) gives zero weights.

  Args:
    gram: ``(K, K)`` Gram matrix.
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    preference: ``(K,)`` task preferences, default ones.
    eps: relative rank tolerance per task (default: float32 machine epsilon).

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = optax_mtl.weighting.aligned(jac @ jac.T)
    >>> print(*(f"{x:.4f}" for x in w))
    1.1181 0.8165
  """
  return aligned_solve(gram, scale_mode=scale_mode, preference=preference, eps=eps)[0]


def aligned_mtl(
    num_tasks: int,
    *,
    scale_mode: ScaleMode = "min",
    preference: jax.Array | None = None,
    task_specific: Literal["weighted", "unweighted"] = "unweighted",
    eps: float = FLOAT32_EPS,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL / Aligned-MTL-UB (Senushkin et al., 2023).

  .. math::
    w = B \omega, \qquad d_{\text{shared}} = J_{\text{shared}}^\top w

  with the balance matrix :math:`B` of :func:`optax_mtl.weighting.aligned`.
  As in the official code (SamsungLabs/MTL ``AlignedMTLBalancer``), the
  shared parameters get the sum of the aligned gradients and task-specific
  parameters their plain, unweighted gradients (``task_specific=
  "weighted"`` multiplies them by ``w``, the official
  ``scale_decoder_grad=True``).

  **Aligned-MTL-UB**: give the transform
  :func:`optax_mtl.feature_task_gradients`; the alignment is then computed on
  the gradients with respect to the shared representation, and the update
  costs one backward pass through the encoder (paper, Section 5.2).

  Args:
    num_tasks: number of tasks ``K``.
    scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
    preference: ``(K,)`` task preferences :math:`\omega`, default ones.
    task_specific: ``"unweighted"`` (official default) or ``"weighted"``.
    eps: relative rank tolerance (default float32 epsilon, as official).
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``weighting_state``
    holds the :class:`AlignedInfo` diagnostics of the (unaligned) gradient
    system: singular values, rank, condition number, pairwise cosines and
    gradient magnitude similarity.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> params = {"w": jnp.zeros(3)}
    >>> jac = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax_mtl.aligned_mtl(2)
    >>> updates, state = tx.update(jac, tx.init(params), params)
    >>> print(f"{float(state.weighting_state.condition_number):.3f}")
    3.689

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task
    Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
  """
  k = contract.check_num_tasks(num_tasks)
  if task_specific not in ("weighted", "unweighted"):
    raise ValueError(f"task_specific must be 'weighted' or 'unweighted', got {task_specific!r}.")
  if scale_mode not in ("min", "median", "rmse"):
    raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
  if preference is not None:
    contract.check_task_vector(preference, k, "preference")

  def init(num_tasks, dtype):
    zeros = jnp.zeros((num_tasks, num_tasks), dtype)
    return AlignedInfo(
        singular_values=jnp.zeros((num_tasks,), dtype),
        rank=jnp.zeros([], jnp.int32),
        condition_number=jnp.zeros([], dtype),
        cosines=zeros,
        magnitude_similarity=zeros,
    )

  def update(gram, state, task_losses):
    del task_losses
    w, info = aligned_solve(gram, scale_mode=scale_mode, preference=preference, eps=eps)
    return w, jax.tree.map(lambda new, old: new.astype(old.dtype), info, state)

  return aggregation.weighted_aggregation(
      k,
      aggregation.Weighting(init=init, update=update),
      shared=shared,
      update_weights_every=update_weights_every,
      task_specific_weights=jnp.ones((k,), jnp.float32) if task_specific == "unweighted" else None,
      nonfinite=nonfinite,
  )
