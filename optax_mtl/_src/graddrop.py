r"""GradDrop: randomly drop the gradient signs that disagree, per coordinate.

Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
Sign Dropout <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.

With :math:`s_i` the task gradients (times the sign of the activations when
applied to a representation), the positive sign purity

.. math::
  P = \tfrac12 \Big(1 + \frac{\sum_i s_i}{\sum_i |s_i|}\Big)

decides, against :math:`U \sim \mathcal U(0, 1)`, which sign survives:
:math:`M_i = 1[P > U] 1[s_i > 0] + 1[P < U] 1[s_i < 0]`, and the update is
:math:`\sum_i (\ell + (1 - \ell) M_i) \circ g_i` with leak :math:`\ell`.
GradDrop needs the per-task gradients themselves, not only their Gram matrix.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from optax_mtl._src import aggregation
from optax_mtl._src import contract
from optax_mtl._src import gram as gram_lib
from optax_mtl._src import randomness
from optax_mtl._src import shared as shared_lib
from optax_mtl._src import task_gradients as task_gradients_lib

Purity = Literal["coordinate", "global"]
# Unrolled up to here, a loop beyond: unrolled, XLA:CPU fuses the K = 10 passes
# of a leaf badly (25 ms against 8 ms looped for 0.92M coordinates).
_UNROLL_TASKS = 4


def _safe_ratio(numerator, denominator, eps):
  ok = denominator + eps > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator + eps, 1.0), 0.0)


def _task_sums(x):
  """``(K,)`` sums over every non-task axis.

  Reduced in place rather than as ``x.reshape(K, -1)``: with Explicit mesh
  axes JAX cannot reshape a leaf sharded on a minor axis (``(K, 8, 32@model)``
  has no sharding as ``(K, 256)``) and raises, where a reduction is local
  sums and an all-reduce.
  """
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def drop(per_task_grads, uniforms, *, leak=0.0, purity: Purity = "coordinate", signs=None, eps=0.0,
         num_tasks=None):
  """The GradDrop combination of per-task gradients for given uniforms.

  Args:
    per_task_grads: pytree, every leaf ``(K, ...)``.
    uniforms: pytree of uniforms shaped like the leaves without the task axis
      (``"coordinate"``), or one scalar (``"global"``).
    leak: fraction :math:`\\ell` of every gradient always kept (scalar or
      ``(K,)``; the paper's leak, SamsungLabs' ``1 - leak``).
    purity: ``"coordinate"`` (paper, TorchJD) or ``"global"`` (SamsungLabs/MTL:
      one purity from the sums over all coordinates, one mask bit per task).
    signs: pytree of the signs of the representation (``None``: ones).
    eps: added to the purity's denominator (SamsungLabs uses 1e-8).
    num_tasks: ``K``, needed only when ``per_task_grads`` has no leaves.

  Returns:
    ``(combined, kept)``: the combined tree and the ``(K,)`` fraction of each
    task's gradient mass (L1) that was kept.
  """
  leaves, treedef = jax.tree.flatten(per_task_grads)
  k = contract.check_task_gradients(per_task_grads, num_tasks)
  sign_leaves = [None] * len(leaves) if signs is None else jax.tree.leaves(signs)
  leak = jnp.broadcast_to(jnp.asarray(leak, jnp.promote_types(jnp.float32, jnp.result_type(leak))), (k,))
  dtypes = [jnp.promote_types(jnp.float32, g.dtype) for g in leaves]

  if purity == "global":
    signed = [g.astype(t) * (1.0 if s is None else s.astype(t)[None]) for g, s, t in zip(leaves, sign_leaves, dtypes)]
    totals = sum(_task_sums(s) for s in signed)  # (K,)
    p = 0.5 * (1.0 + _safe_ratio(jnp.sum(totals), jnp.sum(jnp.abs(totals)), eps))
    mask = ((p > uniforms) & (totals > 0)) | ((p < uniforms) & (totals < 0))
    multipliers = leak + (1.0 - leak) * mask
    combined = [jnp.tensordot(multipliers.astype(t), g.astype(t), axes=1).astype(g.dtype)
                for g, t in zip(leaves, dtypes)]
    return treedef.unflatten(combined), multipliers

  # Task by task over the slices of each leaf, never a (K, ...) temporary:
  # XLA:CPU reduces a short leading axis some 40x slower than it adds K
  # slices, and a materialised (K, n) product costs a fresh buffer per step.
  unroll = k <= _UNROLL_TASKS
  combined, kept, mass = [], jnp.zeros((k,)), jnp.zeros((k,))
  for g, sign, u, t in zip(leaves, sign_leaves, jax.tree.leaves(uniforms), dtypes):
    sign = None if sign is None else sign.astype(t)

    def signed_slice(i, g=g, sign=sign, t=t):
      g_i = g[i].astype(t)
      return g_i, (g_i if sign is None else g_i * sign)

    def purity_sums(i, sums, signed_slice=signed_slice):
      _, s_i = signed_slice(i)
      return sums[0] + s_i, sums[1] + jnp.abs(s_i)

    zeros = jnp.zeros_like(g[0], dtype=t)  # keeps a sharded leaf's sharding (Explicit mesh axes)
    total, total_abs = lax.fori_loop(0, k, purity_sums, (zeros, zeros), unroll=unroll)
    p = 0.5 * (1.0 + _safe_ratio(total, total_abs, eps))

    def drop_task(i, carry, signed_slice=signed_slice, p=p, u=u, t=t):
      out, kept, mass = carry
      g_i, s_i = signed_slice(i)
      mask = ((p > u) & (s_i > 0)) | ((p < u) & (s_i < 0))
      leak_i = leak[i].astype(t)
      multiplier = leak_i + (1.0 - leak_i) * mask.astype(t)
      return (out + multiplier * g_i, kept.at[i].add(jnp.sum(multiplier * jnp.abs(g_i)).astype(kept.dtype)),
              mass.at[i].add(jnp.sum(jnp.abs(g_i)).astype(mass.dtype)))

    out, kept, mass = lax.fori_loop(0, k, drop_task, (zeros, kept, mass), unroll=unroll)
    combined.append(out.astype(g.dtype))
  return treedef.unflatten(combined), jnp.where(mass > 0, kept / jnp.where(mass > 0, mass, 1.0), 1.0)


def draw_uniforms(key, per_task_grads, purity: Purity):
  """Uniforms for :func:`drop`: one per coordinate (one draw for all leaves, sliced), or one in all.

  Always float32 draws, also under ``jax_enable_x64``: a float64 draw consumes
  other random bits, so the same key would drop other signs in a float64 run.
  """
  if purity == "global":
    return jax.random.uniform(key, dtype=jnp.float32)
  leaves, treedef = jax.tree.flatten(per_task_grads)
  # One draw sliced per leaf: a draw per leaf would put one threefry program
  # per leaf into the step (a third of its instructions at 72 leaves).
  shapes = [g.shape[1:] for g in leaves]
  offsets = np.cumsum([0] + [math.prod(shape) for shape in shapes])
  flat = jax.random.uniform(key, (int(offsets[-1]),), jnp.float32)
  return treedef.unflatten([flat[start:stop].reshape(shape)
                            for start, stop, shape in zip(offsets[:-1], offsets[1:], shapes)])


def graddrop(
    num_tasks: int,
    key: int | jax.Array = 0,
    *,
    leak: float | jax.Array = 0.0,
    purity: Purity = "coordinate",
    eps: float | jax.Array = 0.0,
    shared: shared_lib.SharedMask = None,
    nonfinite: aggregation.NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""GradDrop (Chen et al., 2020): gradient sign dropout.

  Per coordinate (default, the paper's Algorithm 1 and TorchJD's
  ``GradDrop``) or with one purity for all coordinates (``purity="global"``,
  SamsungLabs/MTL's balancer, which gives each task a single multiplier).
  Fresh uniforms at every step from the ``key`` carried in the state.

  Applied to parameter gradients (per-task trees, :func:`optax_mtl.value_and_jacobian`
  or :func:`optax_mtl.task_gradients`), the task-specific leaves, which only
  one task touches, keep their gradients; with ``shared=`` they skip the
  dropout. Given :func:`optax_mtl.feature_task_gradients`, it acts as in
  the paper and the official code on the gradients of the shared
  representation, signed by the representation, then backpropagates the
  result through the encoder; the heads get their plain gradients.

  The state's ``weights`` hold the fraction of each task's gradient mass
  (L1) that was kept (the multipliers themselves with ``"global"``).

  Args:
    num_tasks: number of tasks ``K``.
    key: an int seed or a single PRNG key (``jax.random.key`` of any
      implementation, or ``jax.random.PRNGKey`` data); an int also works as
      an injected hyperparameter of :func:`optax.inject_hyperparams`.
    leak: the paper's leak :math:`\ell` (scalar or ``(K,)``), the fraction of
      each gradient always kept (SamsungLabs' ``leak`` is :math:`1 - \ell`;
      both 0.5 in its default).
    purity: ``"coordinate"`` or ``"global"``.
    eps: added to the purity denominator (SamsungLabs: 1e-8).
    shared: mask of the shared parameters (only they are dropped).
    nonfinite: ``"skip"`` (default: a zero update) or ``"propagate"`` (a NaN
      update, for ``optax.apply_if_finite`` on the optimizer after this
      transform) on non-finite input, see :func:`optax_mtl.weighted_aggregation`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with an
    :class:`optax_mtl.AggregationState` (``weighting_state``: the key data).
    Its ``update`` ignores the extra arg ``refresh_weights`` of the other
    methods: every step draws its own mask.

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  k = contract.check_num_tasks(num_tasks)
  if purity not in ("coordinate", "global"):
    raise ValueError(f"purity must be 'coordinate' or 'global', got {purity!r}.")
  aggregation.check_nonfinite(nonfinite)
  initial_key, key_impl = randomness.key_data(key)

  def init_fn(params):
    dtype = aggregation.weights_dtype(params)
    return aggregation.AggregationState(
        count=jnp.zeros([], jnp.int32), weights=jnp.ones((k,), dtype), weighting_state=initial_key,
        nonfinite_count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del extra_args
    grads = task_gradients_lib.as_task_gradients(updates)
    grads.check(k, params)
    task_losses = aggregation.check_losses(task_losses, grads, k, required=False)
    flags = shared_lib.resolve(shared, params, grads.param_tree())
    jac, signs = grads.representation()
    key_data, sub = randomness.next_key(state.weighting_state, key_impl)
    feature_level = signs is not None
    if flags is None or feature_level:
      selected = jac
    else:
      selected = [leaf for leaf, f in zip(jax.tree.leaves(jac), flags) if f]
    uniforms = draw_uniforms(sub, selected, purity)
    dropped, kept = drop(selected, uniforms, leak=leak, purity=purity, signs=signs, eps=eps, num_tasks=k)
    if flags is None or feature_level:
      combined = dropped
    else:
      dropped_iter = iter(dropped)
      leaves = [next(dropped_iter) if f else gram_lib.task_sum(leaf).astype(leaf.dtype) for leaf, f in zip(jax.tree.leaves(jac), flags)]
      combined = jax.tree.unflatten(jax.tree.structure(jac), leaves)
    new_updates = grads.backprop(combined)
    # A non-finite coordinate can be masked out of the combination: check the
    # input itself so that the step is skipped like every other method's.
    kept = jnp.where(aggregation.all_finite(jac), kept, jnp.nan).astype(state.weights.dtype)
    return aggregation.finish_update(state, new_updates, kept, key_data, task_losses, nonfinite)

  return aggregation.ignoring_refresh_weights(optax.GradientTransformationExtraArgs(init_fn, update_fn))
