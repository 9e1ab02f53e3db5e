"""The generic builder: a Gram weighting becomes an optax transformation.

Every Gram-based method is three stages (see DESIGN.md):

1. ``gram``: per-task gradients -> ``M = J J^T`` over the shared leaves;
2. ``weighting``: ``M`` (+ state, losses) -> ``w``, tiny ``K x K`` math;
3. ``combine``: ``w`` -> ``J^T w``.

A method is therefore a :class:`Weighting` plus a call to
:func:`weighted_aggregation`, which owns validation, the ``shared=`` mask, the
``update_weights_every`` schedule and the state.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_mtl._src import contract
from optax_mtl._src import gram as gram_lib
from optax_mtl._src import shared as shared_lib
from optax_mtl._src import task_gradients as task_gradients_lib

PyTree = Any


class Weighting(NamedTuple):
  """The middle stage of a method: Gram matrix (+ state, losses) -> weights.

  Attributes:
    init: ``(num_tasks, dtype) -> state``, the method's own state (``()`` for
      stateless weightings).
    update: ``(gram, state, task_losses) -> (weights, state)``. ``gram`` is
      ``None`` when ``needs_gram`` is false, ``task_losses`` is ``None`` when
      the caller passed none. Must be pure and jittable, return ``(K,)``
      weights and a state with the structure, shapes and dtypes of
      ``init``'s (checked at trace time).
    needs_gram: whether the Gram matrix is used (skipped otherwise).
    needs_task_losses: whether ``task_losses`` is required.
  """

  init: Callable[[int, Any], PyTree]
  update: Callable[[jax.Array | None, PyTree, jax.Array | None], tuple[jax.Array, PyTree]]
  needs_gram: bool = True
  needs_task_losses: bool = False


def stateless(fn: Callable[[jax.Array], jax.Array], *, needs_gram: bool = True) -> Weighting:
  """Wraps a pure ``gram -> weights`` function as a :class:`Weighting`."""

  def update(gram, state, task_losses):
    del task_losses
    return fn(gram), state

  return Weighting(init=lambda num_tasks, dtype: (), update=update, needs_gram=needs_gram)


class AggregationState(NamedTuple):
  """State of every aggregation transform.

  Attributes:
    count: number of updates performed (int32); skipped non-finite steps do
      not count.
    weights: ``(K,)`` weights used in the last update (the initial weights
      before the first one).
    weighting_state: the method's own state (warm starts, EMAs, keys, ...).
    nonfinite_count: number of steps skipped for non-finite input.
  """

  count: jax.Array
  weights: jax.Array
  weighting_state: PyTree
  nonfinite_count: jax.Array


def weights_dtype(params: PyTree) -> jnp.dtype:
  """float32, or float64 when the params contain float64 leaves."""
  dtypes = [
      contract.dtype_of(x)
      for x in jax.tree.leaves(params)
      if jnp.issubdtype(contract.dtype_of(x), jnp.floating)
  ]
  return gram_lib.accumulation_dtype(*dtypes)


def _check_every(update_weights_every):
  """``update_weights_every``: a positive integer, or a traced integer array."""
  if isinstance(update_weights_every, jax.core.Tracer):
    return None
  value = np.asarray(update_weights_every)
  if value.shape != () or not np.issubdtype(value.dtype, np.integer) or isinstance(update_weights_every, bool):
    raise TypeError(f"update_weights_every must be an integer, got {update_weights_every!r}.")
  if int(value) < 1:
    raise ValueError(f"update_weights_every must be >= 1, got {int(value)}.")
  return int(value)


def _check_refresh_weights(refresh_weights):
  """The ``refresh_weights`` extra arg: ``None``, a static bool, or a traced boolean scalar.

  Python and NumPy bools (0-d NumPy arrays included) are static; a
  ``jax.Array`` (concrete or traced) becomes the cond's predicate.
  """
  if refresh_weights is None:
    return None
  shape, dtype = getattr(refresh_weights, "shape", None), getattr(refresh_weights, "dtype", None)
  if isinstance(refresh_weights, bool) or (isinstance(refresh_weights, (np.ndarray, np.bool_))
                                           and shape == () and dtype == np.bool_):
    return bool(refresh_weights)
  if shape != () or dtype != jnp.bool_:
    got = f"{dtype}{list(shape)}" if shape is not None else repr(refresh_weights)
    raise TypeError(
        "refresh_weights must be None, a Python bool (static: the step compiles without a"
        f" conditional) or a boolean scalar array, got {got}."
    )
  return refresh_weights


def ignoring_refresh_weights(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
  """``tx`` with the extra arg ``refresh_weights`` dropped.

  For the methods without ``update_weights_every``, whose weights follow
  every step (linear scalarization's, injected hyperparameters included,
  DWA's loss history, GradDrop's draws): there is nothing for the loop to
  schedule. The value is still checked, as every transform checks it.
  """

  def update_fn(updates, state, params=None, *, refresh_weights=None, **extra_args):
    _check_refresh_weights(refresh_weights)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def all_finite(tree) -> jax.Array:
  """Whether every element of ``tree`` is finite: a boolean scalar, materialised once.

  XLA folds the per-leaf flags into a chain of ``and``s and, every op in it
  being cheap, copies the whole chain into each fusion that reads the result.
  The non-finite policy reads it once per leaf of the update and of the
  optimizer's moments, so the program grew with leaves**2 (Nash-MTL on a
  200-leaf MLP: 83,000 ``and``s, 49 s to trace and compile instead of 12.5 s;
  ``benchmarks/compile_time.py``). A square root is an op XLA's fusion does
  not duplicate into several consumers, so passing the count of non-finite
  leaves through one computes the flag once.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones([], bool)
  nonfinite = jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves]).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(nonfinite)) == 0


NonFinite = Literal["skip", "propagate"]


def check_nonfinite(nonfinite) -> None:
  if nonfinite not in ("skip", "propagate"):
    raise ValueError(f"nonfinite must be 'skip' or 'propagate', got {nonfinite!r}.")


def finish_update(
    state: AggregationState,
    new_updates: PyTree,
    weights: jax.Array,
    weighting_state: PyTree,
    task_losses: jax.Array | None,
    nonfinite: NonFinite,
) -> tuple[PyTree, AggregationState]:
  """Applies the non-finite policy and advances the state (shared by every transform)."""
  finite = all_finite((new_updates, weights, task_losses))
  fill = 0.0 if nonfinite == "skip" else jnp.nan
  new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.full_like(u, fill)), new_updates)
  weights = jnp.where(finite, weights, state.weights)
  weighting_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), weighting_state, state.weighting_state)
  return new_updates, AggregationState(
      count=jnp.where(finite, optax.safe_increment(state.count), state.count),
      weights=weights,
      weighting_state=weighting_state,
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
  )


def check_losses(task_losses, grads, num_tasks: int, required: bool):
  """``task_losses`` (defaulting to the lazy gradients' own), validated."""
  if task_losses is None:
    task_losses = grads.losses
  task_losses = contract.check_task_vector(task_losses, num_tasks, "task_losses")
  if required and task_losses is None:
    raise ValueError(
        "This method needs the per-task losses: call"
        " tx.update(per_task_grads, state, params, task_losses=losses) with"
        f" losses of shape ({num_tasks},)."
    )
  return task_losses


def check_weighting_output(weights, new_state, old_state, k: int) -> None:
  """Trace-time check of a weighting's ``(weights, state)`` against its input state.

  The state is carried from step to step (and through the ``lax.cond`` of
  ``update_weights_every``), so it must keep its structure, shapes and dtypes;
  a float64 intermediate leaking into a float32 state would otherwise fail
  inside ``lax.cond`` with an unrelated message, or recompile the step.
  """
  if contract.shape_of(weights) != (k,):
    raise ValueError(f"The weighting returned weights of shape {contract.shape_of(weights)}; expected ({k},).")
  old_leaves, old_tree = jax.tree_util.tree_flatten_with_path(old_state)
  new_leaves, new_tree = jax.tree_util.tree_flatten_with_path(new_state)
  if old_tree != new_tree:
    raise TypeError(f"The weighting's update returned a state of structure {new_tree}; its init gave {old_tree}.")
  for (path, old), (_, new) in zip(old_leaves, new_leaves):
    if (contract.shape_of(old), contract.dtype_of(old)) != (contract.shape_of(new), contract.dtype_of(new)):
      raise TypeError(
          f"The weighting's update changed state leaf {contract.leaf_path(path)} from"
          f" {contract.dtype_of(old).name}{list(contract.shape_of(old))} to"
          f" {contract.dtype_of(new).name}{list(contract.shape_of(new))}; the state must keep the"
          " shapes and dtypes of its init (cast with .astype)."
      )


def weighted_aggregation(
    num_tasks: int,
    weighting: Weighting | Callable[[jax.Array], jax.Array],
    *,
    shared: shared_lib.SharedMask = None,
    update_weights_every: int | jax.Array = 1,
    initial_weights: jax.Array | None = None,
    task_specific_weights: jax.Array | Callable[[jax.Array], jax.Array] | None = None,
    postprocess: Callable[[PyTree, list[bool] | None], PyTree] | None = None,
    nonfinite: NonFinite = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Turns a Gram weighting into a multi-task gradient transformation.

  The transformation takes per-task gradients (every leaf ``(K, ...)``) and
  returns :math:`J^\top w`, with ``w`` computed from the Gram matrix of the
  shared leaves:

  .. math::
    M = \sum_{\text{shared leaves}} g^{(\ell)} {g^{(\ell)}}^\top, \qquad
    w = \mathrm{weighting}(M), \qquad
    d^{(\ell)} = \sum_i w_i\, g_i^{(\ell)} \text{ for every leaf.}

  Task-specific leaves (``shared`` false) stay out of ``M`` and receive their
  ``w``-weighted gradients, or ``task_specific_weights``-weighted ones when
  given.

  **Non-finite input** (a NaN or inf in the gradients, the task losses or
  the weights, including a Gram matrix that overflows float32 for gradient
  norms beyond about 1e19): the weights and the method's state are kept,
  ``count`` does not advance (a due weight refresh is retried on the next
  step), ``nonfinite_count`` is incremented, and the update is zero
  (``nonfinite="skip"``, default) or NaN (``nonfinite="propagate"``), the
  latter for ``optax.chain(tx, optax.apply_if_finite(optimizer))`` so that
  the optimizer skips its step as well (its moments untouched).

  **Refreshing the weights from the caller** (the extra arg
  ``refresh_weights``): ``True`` recomputes the weights on this update and
  ``False`` reuses the last ones, whatever ``update_weights_every`` and
  ``count`` say (``count`` still advances; leave ``update_weights_every`` at
  1). A Python bool (or a NumPy bool scalar) is static: with
  ``jax.jit(step, static_argnames="refresh_weights")`` and
  ``refresh_weights=(i % k == 0)`` from the training loop's own step index,
  the step compiles twice, once per kind, with no conditional in either. The
  ``lax.cond`` of the default schedule runs a refresh's ``K`` backward passes
  in a nested computation, where XLA:CPU does not rewrite convolutions into
  the form of its fast path (it rewrites top-level ones only): a conv net's
  refresh step took 11 to 19x as long there as at top level (10 tasks,
  ``benchmarks/train_step.py``). On a GPU the static choice also drops the
  cond's predicate round trip to the host, and under :func:`jax.vmap` the
  select the cond becomes, which runs both branches. A ``jax.Array``
  boolean scalar is used as the cond's predicate instead of the schedule.
  The loop's schedule does not retry a refresh skipped for non-finite input
  (the cond's does, from ``count``): the last finite weights, or the initial
  ones before the first refresh, stay until the loop's next ``True``; a loop
  that must retry compares ``nonfinite_count`` across the step (a read on
  the host). Inside :func:`jax.lax.scan`, scan over cycles: one refreshing
  step, then a scan of ``k - 1`` reusing ones.

  Args:
    num_tasks: the number of tasks ``K`` (static: it fixes the state shapes).
    weighting: a :class:`Weighting`, or a pure function ``gram -> weights``.
    shared: ``None`` (every leaf shared), a pytree of bools (or a prefix) or a
      callable ``params -> pytree of bools`` marking the shared parameters.
    update_weights_every: recompute the weights every this many updates and
      reuse the last ones in between (Nash-MTL's ``update_weights_every``).
      The Gram and the weighting are skipped on the steps in between. A
      traced value (``optax.inject_hyperparams``) below 1 counts as 1. The
      choice is a :func:`jax.lax.cond` on ``count`` inside the step, unless
      the caller makes it with the extra arg ``refresh_weights`` (below).
    initial_weights: ``(K,)`` weights held in the state before the first
      update (default ones).
    task_specific_weights: ``(K,)`` weights for the task-specific leaves
      instead of ``w`` (e.g. ones: every head gets its plain gradient), or a
      function ``w -> (K,) weights``.
    postprocess: ``(updates, shared_flags) -> updates`` applied after
      combining, e.g. clipping the shared part (``shared_flags`` holds one
      bool per leaf, ``None`` when every leaf is shared).
    nonfinite: ``"skip"`` (default) or ``"propagate"``, see above.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``task_losses`` and ``refresh_weights`` as extra arguments and ignores
    other extra arguments.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl
    >>> mean = lambda gram: jnp.full(gram.shape[:1], 1.0 / gram.shape[0])
    >>> tx = optax_mtl.weighted_aggregation(2, mean)
    >>> params = {"w": jnp.zeros(3)}
    >>> jac = {"w": jnp.array([[1., 2., 3.], [3., 2., 1.]])}
    >>> updates, state = tx.update(jac, tx.init(params), params)
    >>> updates["w"]
    Array([2., 2., 2.], dtype=float32)
  """
  k = contract.check_num_tasks(num_tasks)
  if not isinstance(weighting, Weighting):
    weighting = stateless(weighting)
  static_every = _check_every(update_weights_every)
  check_nonfinite(nonfinite)
  if task_specific_weights is None or callable(task_specific_weights):
    other_weights = task_specific_weights
  else:
    constant = contract.check_task_vector(task_specific_weights, k, "task_specific_weights")
    other_weights = lambda weights: constant.astype(weights.dtype)

  def init_fn(params):
    dtype = weights_dtype(params)
    if initial_weights is None:
      weights = jnp.ones((k,), dtype)
    else:
      weights = contract.check_task_vector(initial_weights, k, "initial_weights").astype(dtype)
    return AggregationState(
        count=jnp.zeros([], jnp.int32),
        weights=weights,
        weighting_state=weighting.init(k, dtype),
        nonfinite_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, task_losses=None, refresh_weights=None, **extra_args):
    del extra_args
    refresh_choice = _check_refresh_weights(refresh_weights)
    grads = task_gradients_lib.as_task_gradients(updates)
    grads.check(k, params)
    task_losses = check_losses(task_losses, grads, k, weighting.needs_task_losses)
    flags = shared_lib.resolve(shared, params, grads.param_tree())
    dtype = state.weights.dtype

    def solve(m, weighting_state):
      weights, new_state = weighting.update(m, weighting_state, task_losses)
      check_weighting_output(weights, new_state, weighting_state, k)
      weighting_state = new_state
      if m is not None:
        # A non-finite Gram (NaN/inf gradients, float32 overflow) poisons the
        # weights even where the weighting happens to return finite numbers.
        weights = jnp.where(jnp.all(jnp.isfinite(m)), weights, jnp.nan)
      return weights.astype(dtype), weighting_state

    def refresh(weighting_state):
      if weighting.needs_gram:
        new_updates, (weights, weighting_state) = grads.gram_and_update(
            flags, lambda m: solve(m, weighting_state), other_weights)
      else:
        weights, weighting_state = solve(None, weighting_state)
        new_updates = grads.weighted_update(weights, flags, other_weights)
      return new_updates, weights, weighting_state

    if refresh_choice is True or (refresh_choice is None and static_every == 1):
      new_updates, weights, weighting_state = refresh(state.weighting_state)
    else:
      if refresh_choice is False:
        weights, weighting_state = state.weights, state.weighting_state
      else:
        # Only the weights are chosen under the cond; the weighted backward pass
        # runs after it, in the step's own computation. XLA:CPU leaves the
        # gradient convolutions inside a conditional branch in a layout its
        # fast convolution path does not take (a conv net's backward pass ran
        # 8x slower there), which made the cached steps cost a refresh.
        # A traced period below 1 (inject_hyperparams) cannot raise; it refreshes every step.
        if refresh_choice is None:
          due = state.count % jnp.maximum(update_weights_every, 1) == 0
        else:
          due = refresh_choice

        def solve_weights(weighting_state):
          return solve(grads.gram(flags) if weighting.needs_gram else None, weighting_state)

        weights, weighting_state = lax.cond(
            due, solve_weights, lambda ws: (state.weights, ws), state.weighting_state)
      new_updates = grads.weighted_update(weights, flags, other_weights)

    if postprocess is not None:
      new_updates = postprocess(new_updates, flags)
    return finish_update(state, new_updates, weights, weighting_state, task_losses, nonfinite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
