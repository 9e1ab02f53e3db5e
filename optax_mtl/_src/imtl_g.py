r"""IMTL-G: the update with equal projections on every unit task gradient.

Liu et al., `Towards Impartial Multi-task Learning
<https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import numerics
from optax_mtl._src import shared as shared_lib


@numerics.nan_for_nonfinite_gram
@numerics.full_precision
def imtl_g(gram: jax.Array) -> jax.Array:
  r"""IMTL-G weights: :math:`d = J^\top w` has equal projections on all unit gradients.

  :math:`u_i^\top d` is the same for every task (:math:`u_i = g_i/\|g_i\|`)
  and :math:`\sum_i w_i = 1`. With :math:`M = D C D` (:math:`C` the cosine
  matrix) the condition reads :math:`C (D w) \propto 1`, so

  .. math::
    w \propto D^{-1} C^{+} 1 ,

  the closed form of the official code (AvivNavon/nash-mtl ``IMTLG``) and
  TorchJD's :math:`w \propto M^{+} n` on full-rank input, computed on the
  well-scaled cosine matrix (float32 then resolves norms spanning many
  orders of magnitude). The direction is unique even when ``C`` is singular
  (duplicated tasks, ``K > d``): the pseudo-inverse picks one of the
  equivalent weight vectors. Zero gradients get weight 0 (the official code
  returns NaN). When :math:`C y = 1` has no solution (zero in the convex
  hull of the unit gradients, e.g. a Pareto-stationary set) only
  :math:`d = 0` has equal projections and the weights are zero (the test:
  :math:`C y \propto 1` within 1e-3 relative), as when they cannot be
  normalised (:math:`|\sum w| < 10^{-12}` relative); the references'
  least-squares answers there have unequal projections.

  Args:
    gram: ``(K, K)`` Gram matrix.

  Returns:
    ``(K,)`` weights summing to 1 (or zeros).

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> print(*(f"{x:.4f}" for x in optax_mtl.weighting.imtl_g(jac @ jac.T)))
    0.5923 0.4077
  """
  k = gram.shape[0]
  scaling = numerics.cosine_scaling(gram)
  active = scaling.nonzero
  cosines = jnp.where(active[:, None] & active[None, :], scaling.cosines, 0.0)
  target = active.astype(gram.dtype)
  y = jnp.linalg.pinv(cosines, rtol=k * jnp.finfo(gram.dtype).eps, hermitian=True) @ target
  # C y must be proportional to 1 (equal projections): when 1 is not in the
  # range of C (zero lies in the convex hull of the unit gradients), only
  # d = 0 has equal projections. Proportional, not equal: for highly aligned
  # tasks the pseudo-inverse drops C's tiny eigenvalues and C y falls short
  # of 1 by the same amount in every entry (1e-3 at cosines of 0.9999), which
  # the normalisation below removes.
  projections = cosines @ y
  count = jnp.maximum(jnp.sum(active), 1)
  mean = jnp.sum(jnp.where(active, projections, 0.0)) / count
  spread = jnp.max(jnp.where(active, jnp.abs(projections - mean), 0.0))
  consistent = (mean > 0) & (spread <= 1e-3 * mean)
  w = jnp.where(active, y / jnp.where(active, scaling.norms, 1.0), 0.0)
  total = jnp.sum(w)
  scale = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(gram.dtype).tiny)
  ok = consistent & (jnp.abs(total) > 1e-12 * scale)
  return jnp.where(ok, w / jnp.where(ok, total, 1.0), 0.0)


def imtl_g_transform(
    num_tasks: int,
    *,
    update_weights_every: int | jax.Array = 1,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G (Liu et al., 2021): equal projections of the update on every unit task gradient.

  The weights of :func:`optax_mtl.weighting.imtl_g` (summing to 1, as in
  AvivNavon/nash-mtl ``IMTLG``, not multiplied by ``K``); every leaf,
  task-specific ones included, receives :math:`J^\top w` (the official code
  backpropagates :math:`\sum_i w_i L_i`).

  Args:
    num_tasks: number of tasks ``K``.
    update_weights_every: recompute the weights every this many steps.
    shared: mask of the shared parameters (only they enter the Gram).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> params = {"w": jnp.zeros(3)}
    >>> jac = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> tx = optax_mtl.imtl_g(2)
    >>> updates, _ = tx.update(jac, tx.init(params), params)
    >>> print(*(f"{x:.4f}" for x in updates["w"]))
    0.0767 1.0000 1.0000

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
  """
  k = contract.check_num_tasks(num_tasks)
  return aggregation.weighted_aggregation(
      k, imtl_g, shared=shared, update_weights_every=update_weights_every,
      initial_weights=jnp.full((k,), 1.0 / k),
      nonfinite=nonfinite,
  )
