"""Gradient paths: per-task Jacobians, and gradients the transform evaluates lazily.

Because a Gram-based update is ``J^T w``, the transform does not always need
the ``K`` per-task gradients: once ``w`` is known, one backward pass of
``sum_i w_i L_i`` gives the update. This module offers three ways to hand the
gradients to a transform:

- :func:`value_and_jacobian`: the explicit per-task gradient tree (every leaf
  ``(K, ...)``), vectorised over the ``K`` cotangents or in chunks;
- :func:`task_gradients`: one forward pass, kept as a VJP. The transform runs
  the ``K`` backward passes only on the steps where it recomputes the weights
  (``update_weights_every``) and a single weighted backward pass otherwise;
  with ``store_jacobian=False`` the Gram matrix is built column by column from
  VJPs and JVPs, so the ``K x params`` Jacobian is never stored;
- :func:`feature_task_gradients`: the Gram of the gradients with respect to a
  shared representation ``z`` (MGDA-UB, Aligned-MTL-UB), then one backward
  pass through the encoder; or, with ``level="parameters"``, the exact
  per-task gradients of the parameters formed through ``z``, so that separate
  heads are not traversed ``K`` times each.

All three are consumed by every ``optax_mtl`` transform through the same
:class:`TaskGradients` interface.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from jax import lax

from optax_mtl._src import contract
from optax_mtl._src import gram as gram_lib
from optax_mtl._src import shared as shared_lib

PyTree = Any
Solve = Callable[[jax.Array], tuple[jax.Array, Any]]
OtherWeights = Callable[[jax.Array], jax.Array] | None
Level = Literal["representation", "parameters"]


def _map_tasks(fn: Callable, xs: PyTree, batch_size: int | None) -> Any:
  """``fn`` over the leading (task) axis of ``xs``: vectorised, or ``batch_size`` at a time."""
  num_tasks = jax.tree.leaves(xs)[0].shape[0]
  if batch_size is None or batch_size >= num_tasks:
    return jax.vmap(fn)(xs)
  return lax.map(fn, xs, batch_size=batch_size)


def _map_cotangents(fn: Callable, num_tasks: int, batch_size: int | None, dtype) -> Any:
  """``fn`` applied to the ``K`` unit cotangents, stacked on a leading axis."""
  return _map_tasks(fn, jnp.eye(num_tasks, dtype=dtype), batch_size)


def _weighted_pass(backward: Callable, weights: jax.Array, dtype) -> PyTree:
  """``backward(w)``, the VJP of ``sum_i w_i L_i``, with the cotangent in the losses' ``dtype``.

  In float16 or bfloat16 the weights themselves could overflow (float16 ends at
  65504, below Nash-MTL's ``1/||g_i||`` for small gradients) or flush to zero, so
  the pass runs on ``w / max|w|`` and its result is scaled back in float32 (then
  cast to each leaf's dtype, as ``combine`` does). The cotangent still carries
  the losses' precision: 8 bits in bfloat16.
  """
  if jnp.finfo(dtype).bits >= 32:
    return backward(weights.astype(dtype))
  scale = jnp.max(jnp.abs(weights)).astype(jnp.float32)
  scale = jnp.where(scale > 0, scale, 1.0)
  grads = backward((weights / scale).astype(dtype))
  return jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), grads)


def _check_batch_size(batch_size):
  if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
    raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}.")


def _check_loss_vector(losses, has_aux: bool) -> None:
  if jnp.ndim(losses) != 1:
    raise ValueError(
        "The loss function must return the (K,) vector of task losses"
        f"{' (and aux)' if has_aux else ''}; got shape {jnp.shape(losses)}."
    )


def _select(tree: PyTree, flags: list[bool], keep: bool) -> list:
  return [leaf for leaf, f in zip(jax.tree.leaves(tree), flags, strict=True) if f == keep]


def _merge(treedef, flags: list[bool], shared_leaves: list, other_leaves: list) -> PyTree:
  shared_iter, other_iter = iter(shared_leaves), iter(other_leaves)
  return treedef.unflatten([next(shared_iter) if f else next(other_iter) for f in flags])


class TaskGradients(abc.ABC):
  """Per-task gradients that an ``optax_mtl`` transform evaluates lazily.

  Pass an instance to ``tx.update`` in place of the per-task gradient tree;
  ``task_losses`` then default to :attr:`losses`. The transform must come
  first in an ``optax.chain`` (nothing before it can transform a lazy
  object). An instance holds the closures of one forward pass: create and
  consume it inside the same traced step function (it is not a pytree and
  does not cross a ``jax.jit`` boundary).

  In the methods below, ``flags`` holds one bool per parameter leaf (true for
  shared leaves, ``None``: all shared) and ``other_weights``, when given, maps
  ``w`` to the weights applied to the task-specific (non-shared) leaves.

  Attributes:
    losses: the ``(K,)`` task losses of the forward pass.
    aux: the auxiliary output of the loss function (``None`` without
      ``has_aux``).
  """

  losses: jax.Array
  aux: Any

  @property
  def num_tasks(self) -> int:
    return self.losses.shape[0]

  @abc.abstractmethod
  def check(self, num_tasks: int, params: PyTree | None) -> None:
    """Validates ``K`` and the parameter structure at trace time."""

  @abc.abstractmethod
  def param_tree(self) -> PyTree:
    """A tree with the structure of the differentiated params."""

  @abc.abstractmethod
  def jacobian(self) -> PyTree:
    """The explicit per-task gradients, every leaf ``(K, ...)``."""

  def representation(self) -> tuple[PyTree, PyTree | None]:
    """``(per-task gradients, signs)`` of the space a non-Gram method edits.

    The parameters' per-task gradients (signs ``None``) for the parameter
    paths; for the feature level, the gradients of the representation and
    the signs of the representation (GradDrop's ``sign(z)``).
    """
    return self.jacobian(), None

  def backprop(self, combined: PyTree) -> PyTree:
    """The parameter update from an edited combination in :meth:`representation`'s space."""
    return combined

  @abc.abstractmethod
  def full_update(self, weights: jax.Array) -> PyTree:
    """``J^T w`` on every leaf: with a lazy object, one backward pass of ``sum_i w_i L_i``."""

  @abc.abstractmethod
  def gram(self, flags: list[bool] | None) -> jax.Array:
    """The ``(K, K)`` Gram ``M`` of the shared part, without an update.

    What a step that only refreshes weights needs; :meth:`gram_and_update`
    builds the same ``M`` and reuses its gradients for the update.
    """

  @abc.abstractmethod
  def gram_and_update(
      self, flags: list[bool] | None, solve: Solve, other_weights: OtherWeights = None
  ) -> tuple[PyTree, Any]:
    """Builds the Gram ``M`` of the shared part, ``w, out = solve(M)``, and the update.

    Returns:
      ``(updates, (w, out))``.
    """

  def weighted_update(
      self, weights: jax.Array, flags: list[bool] | None = None, other_weights: OtherWeights = None
  ) -> PyTree:
    """``J^T w`` (``J^T other_weights(w)`` on the task-specific leaves)."""
    full = self.full_update(weights)
    if flags is None or other_weights is None or all(flags):
      return full
    other = self.full_update(other_weights(weights))
    return _merge(jax.tree.structure(full), flags, _select(full, flags, True), _select(other, flags, False))


class JacobianTree(TaskGradients):
  """An explicit per-task gradient tree (what ``jax.jacrev`` gives)."""

  def __init__(self, jac: PyTree, losses: jax.Array | None = None):
    self.jac = jac
    self.losses = losses
    self.aux = None
    self._num_tasks = None

  @property
  def num_tasks(self) -> int:
    if self._num_tasks is None:
      return contract.check_task_gradients(self.jac)
    return self._num_tasks

  def check(self, num_tasks, params):
    # Kept: a tree with no leaves (optax.masked, or a partition label with no
    # parameters) carries no K of its own.
    self._num_tasks = contract.check_task_gradients(self.jac, num_tasks, params)

  def param_tree(self):
    return self.jac

  def jacobian(self):
    return self.jac

  def full_update(self, weights):
    return gram_lib.combine(weights, self.jac)

  def weighted_update(self, weights, flags=None, other_weights=None):
    if flags is None or other_weights is None:
      return gram_lib.combine(weights, self.jac)
    other = other_weights(weights)
    leaves = [
        gram_lib.combine(weights if f else other, leaf)
        for leaf, f in zip(jax.tree.leaves(self.jac), flags, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(self.jac), leaves)

  def gram(self, flags):
    return gram_lib.gram_of_leaves(shared_lib.selected_leaves(self.jac, flags), self.num_tasks)

  def gram_and_update(self, flags, solve, other_weights=None):
    weights, out = solve(self.gram(flags))
    return self.weighted_update(weights, flags, other_weights), (weights, out)


def as_task_gradients(updates: PyTree | TaskGradients) -> TaskGradients:
  return updates if isinstance(updates, TaskGradients) else JacobianTree(updates)


class _ParamSpace:
  """Shapes of the differentiated params, to validate ``update``'s params."""

  def __init__(self, params: PyTree):
    self.treedef = jax.tree.structure(params)
    self.abstract = [jax.ShapeDtypeStruct(contract.shape_of(x), contract.dtype_of(x))
                     for x in jax.tree.leaves(params)]
    self.shapes = [x.shape for x in self.abstract]

  def tree(self) -> PyTree:
    return self.treedef.unflatten(self.abstract)

  def check(self, params: PyTree | None) -> None:
    if params is None:
      return
    if jax.tree.structure(params) != self.treedef:
      raise ValueError(
          "The params given to update() do not have the structure of the params"
          f" the task gradients were taken at.\n  gradients: {self.treedef}\n"
          f"  params: {jax.tree.structure(params)}"
      )
    for (path, leaf), shape in zip(jax.tree_util.tree_flatten_with_path(params)[0], self.shapes):
      if contract.shape_of(leaf) != shape:
        raise ValueError(
            f"Parameter '{contract.leaf_path(path)}' has shape {contract.shape_of(leaf)}"
            f" but the task gradients were taken at shape {shape}."
        )


def _check_losses(losses: jax.Array, num_tasks: int) -> None:
  if losses.shape != (num_tasks,):
    raise ValueError(
        f"The loss function returned losses of shape {losses.shape}; expected"
        f" ({num_tasks},) (num_tasks)."
    )


class _LazyTaskGradients(TaskGradients):
  """Common part of the lazy kinds: losses, parameter space, batching of cotangents."""

  def __init__(self, losses, aux, params, batch_size):
    self.losses, self.aux = losses, aux
    self._space = _ParamSpace(params)
    self._batch_size = batch_size

  def check(self, num_tasks, params):
    _check_losses(self.losses, num_tasks)
    self._space.check(params)

  def param_tree(self):
    return self._space.tree()

  def _map_cotangents(self, fn):
    return _map_cotangents(fn, self.num_tasks, self._batch_size, self.losses.dtype)


class VJPTaskGradients(_LazyTaskGradients):
  """Per-task gradients kept as the VJP of one forward pass."""

  def __init__(self, losses, aux, vjp_fn, jvp_fn, params, batch_size, store_jacobian):
    super().__init__(losses, aux, params, batch_size)
    self._vjp, self._jvp = vjp_fn, jvp_fn
    self._store_jacobian = store_jacobian

  def jacobian(self):
    if not self._store_jacobian:
      raise ValueError(
          "This method needs the explicit per-task gradients, which"
          " task_gradients(..., store_jacobian=False) never forms; use"
          " store_jacobian=True."
      )
    return self._map_cotangents(self._vjp)

  def full_update(self, weights):
    return _weighted_pass(self._vjp, weights, self.losses.dtype)

  def _shared_jacobian(self, flags):
    # Only the shared leaves' Jacobian is formed; XLA prunes the rest of the
    # vmapped backward pass.
    return self._map_cotangents(lambda c: _select(self._vjp(c), flags, True))

  def gram(self, flags):
    if not self._store_jacobian:
      return self._streamed_gram(flags)
    leaves = jax.tree.leaves(self.jacobian()) if flags is None else self._shared_jacobian(flags)
    return gram_lib.gram_of_leaves(leaves, self.num_tasks)

  def gram_and_update(self, flags, solve, other_weights=None):
    if not self._store_jacobian:
      weights, out = solve(self.gram(flags))
      return self.weighted_update(weights, flags, other_weights), (weights, out)
    k = self.num_tasks
    if flags is None:
      jac = self.jacobian()
      weights, out = solve(gram_lib.gram_of_leaves(jax.tree.leaves(jac), k))
      return gram_lib.combine(weights, jac), (weights, out)
    # The task-specific leaves come from one weighted backward pass that
    # never enters the shared trunk.
    shared_jac = self._shared_jacobian(flags)
    weights, out = solve(gram_lib.gram_of_leaves(shared_jac, k))
    shared_updates = [gram_lib.combine(weights, g) for g in shared_jac]
    other_updates = []
    if not all(flags):
      other = weights if other_weights is None else other_weights(weights)
      other_updates = _select(self.full_update(other), flags, False)
    return _merge(self._space.treedef, flags, shared_updates, other_updates), (weights, out)

  def _streamed_gram(self, flags):
    """``M`` column by column: ``M e_j = J (J^T e_j)``, one VJP and one JVP each.

    The columns run ``batch_size`` at a time, one at a time by default: a
    vectorised map would hold all ``K`` gradients at once, which is the
    Jacobian this mode exists to avoid. So ``batch_size`` parameter-sized
    vectors are live, never the ``K x params`` Jacobian.
    """

    def column(cotangent):
      g = self._vjp(cotangent)
      if flags is not None:
        leaves = [x if f else jnp.zeros_like(x) for x, f in zip(jax.tree.leaves(g), flags)]
        g = jax.tree.unflatten(jax.tree.structure(g), leaves)
      return self._jvp(g)

    cols = _map_cotangents(column, self.num_tasks, self._batch_size or 1, self.losses.dtype)
    cols = cols.astype(gram_lib.accumulation_dtype(cols.dtype))
    return 0.5 * (cols + cols.T)


class FeatureTaskGradients(_LazyTaskGradients):
  """Per-task gradients with respect to a shared representation ``z``."""

  def __init__(self, losses, aux, encoder_vjp, heads_vjp, params, batch_size, representation, per_task_heads):
    super().__init__(losses, aux, params, batch_size)
    self._encoder_vjp, self._heads_vjp = encoder_vjp, heads_vjp
    self._z = representation
    self._per_task_heads = per_task_heads

  def representation(self):
    return self.jacobian(), jax.tree.map(jnp.sign, self._z)

  def backprop(self, combined):
    # Task-specific parameters get their plain gradients; the encoder the
    # edited representation gradient.
    head_grads, _ = self._heads_vjp(jnp.ones_like(self.losses))
    (encoder_grads,) = self._encoder_vjp(combined)
    return jax.tree.map(jnp.add, head_grads, encoder_grads)

  def _task_copies(self):
    # Loss i reads only copy i of z, so the gradient of the summed losses
    # with respect to the K copies holds every task's gradient: one backward
    # pass of the heads, not K. They stay a list of K trees: on XLA:CPU the
    # Gram reads wide ones block by block and the combination in one fused sum.
    return _representation_gradients(self._heads_vjp, self.losses)

  def jacobian(self):
    """The per-task gradients of the representation, every leaf ``(K, *z.shape)``."""
    if self._per_task_heads:
      return jax.tree.map(lambda *leaves: jnp.stack(leaves), *self._task_copies())
    return self._map_cotangents(lambda c: self._heads_vjp(c)[1])

  def _gram_and_combination(self):
    """The Gram of the representation gradients, and ``w -> sum_i w_i dL_i/dz``."""
    if self._per_task_heads:
      copies = self._task_copies()
      return gram_lib.gram_of_task_trees(copies), lambda w: gram_lib.combine_task_trees(w, copies)
    jac_z = self.jacobian()
    return gram_lib.gram_of_leaves(jax.tree.leaves(jac_z), self.num_tasks), lambda w: gram_lib.combine(w, jac_z)

  def gram(self, flags):
    # The Gram of the representation gradients replaces that of the shared
    # parameters; the shared mask only tells which leaves take other_weights.
    del flags
    return self._gram_and_combination()[0]

  def gram_and_update(self, flags, solve, other_weights=None):
    gram, combination = self._gram_and_combination()
    weights, out = solve(gram)
    if flags is None or other_weights is None or all(flags):
      # The encoder's cotangent from the representation gradients at hand:
      # one contraction instead of a weighted pass back through the heads.
      return self._update(weights, combination), (weights, out)
    return self.weighted_update(weights, flags, other_weights), (weights, out)

  def full_update(self, weights):
    return self._update(weights)

  def _update(self, weights, combination=None):
    def backward(cotangent):
      z_cotangent = None if combination is None else combination(cotangent)
      return _backward_through_heads(self._encoder_vjp, self._heads_vjp, self._per_task_heads, cotangent,
                                     z_cotangent)

    return _weighted_pass(backward, weights, self.losses.dtype)


def _representation_gradients(heads_vjp, losses):
  """The ``K`` gradients ``dL_i/dz`` of separate heads: one backward pass of their summed losses."""
  return heads_vjp(jnp.ones_like(losses))[1]


def _backward_through_heads(encoder_vjp, heads_vjp, per_task_heads, cotangent, z_cotangent=None):
  """The VJP of ``heads(params, encoder(params))``; ``z_cotangent`` replaces the heads' one."""
  head_grads, heads_z_cotangent = heads_vjp(cotangent)
  if z_cotangent is None:
    z_cotangent = heads_z_cotangent
    if per_task_heads:
      z_cotangent = jax.tree.map(lambda *leaves: functools.reduce(jnp.add, leaves), *z_cotangent)
  (encoder_grads,) = encoder_vjp(z_cotangent)
  return jax.tree.map(jnp.add, head_grads, encoder_grads)


class EncoderTaskGradients(VJPTaskGradients):
  """Per-task parameter gradients formed through a representation read by separate heads.

  One backward pass of the heads gives the ``K`` representation gradients
  (loss ``i`` reads only copy ``i``); task ``i``'s gradient is then one
  backward pass of ``dL_i/dz`` through the encoder plus what the heads read of
  the parameters directly. The heads are never traversed ``K`` times for the
  shared leaves, whose direct part is zero unless the heads read them.
  """

  def __init__(self, losses, aux, encoder_vjp, heads_vjp, params, batch_size):
    vjp = lambda c: _backward_through_heads(encoder_vjp, heads_vjp, True, c)
    super().__init__(losses, aux, vjp, None, params, batch_size, store_jacobian=True)
    self._encoder_vjp, self._heads_vjp = encoder_vjp, heads_vjp

  def _per_task(self, select):
    copies = _representation_gradients(self._heads_vjp, self.losses)
    representation_grads = jax.tree.map(lambda *leaves: jnp.stack(leaves), *copies)
    cotangents = jnp.eye(self.num_tasks, dtype=self.losses.dtype)

    def task(cotangent_and_grad):
      cotangent, z_grad = cotangent_and_grad
      # The heads' VJP of the unit cotangent adds what they read of the params
      # directly; for selected leaves they do not read, XLA prunes it to zeros.
      return select(_backward_through_heads(self._encoder_vjp, self._heads_vjp, True, cotangent, z_grad))

    return _map_tasks(task, (cotangents, representation_grads), self._batch_size)

  def jacobian(self):
    return self._per_task(lambda tree: tree)

  def _shared_jacobian(self, flags):
    return self._per_task(lambda tree: _select(tree, flags, True))


def _vjp_of_losses(fun, params, args, has_aux):
  closed = lambda p: fun(p, *args)
  if has_aux:
    losses, vjp_fn, aux = jax.vjp(closed, params, has_aux=True)
  else:
    (losses, vjp_fn), aux = jax.vjp(closed, params), None
  _check_loss_vector(losses, has_aux)
  return losses, aux, lambda c: vjp_fn(c)[0]


def value_and_jacobian(
    fun: Callable[..., Any],
    *,
    has_aux: bool = False,
    batch_size: int | None = None,
) -> Callable[..., tuple[Any, PyTree]]:
  """The task losses and the per-task gradient tree of ``fun``.

  Like :func:`jax.value_and_grad` for a ``(K,)``-valued loss: one forward
  pass, then the ``K`` backward passes of its VJP.

  Args:
    fun: ``fun(params, *args) -> losses`` with ``losses`` of shape ``(K,)``,
      or ``(losses, aux)`` with ``has_aux=True``. Differentiated with respect
      to ``params`` only.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    batch_size: how many of the ``K`` backward passes run at once. ``None``
      (default) or ``>= K``: all of them, vectorised with :func:`jax.vmap`.
      An int runs them with :func:`jax.lax.map` that many at a time (``1``:
      sequentially), which bounds the memory of the backward pass to
      ``batch_size`` copies of its intermediates. Every choice gives the same
      result. Speed depends on the model and backend: on XLA:CPU an MLP's
      sequential backward passes ran about twice as fast as vectorised ones,
      while a conv net's ran 18 times slower (convolutions inside a loop body
      lose XLA:CPU's fast path), hence the vectorised default.

  Returns:
    A function ``(params, *args) -> (value, jac)`` where ``value`` is what
    ``fun`` returns and every leaf of ``jac`` is ``(K, *param.shape)``.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> fun = lambda p, x: jnp.stack([jnp.sum(p * x), jnp.sum(p ** 2)])
    >>> losses, jac = optax_mtl.value_and_jacobian(fun)(jnp.array([1., 2.]), jnp.array([3., 4.]))
    >>> jac
    Array([[3., 4.],
           [2., 4.]], dtype=float32)
  """
  _check_batch_size(batch_size)

  def wrapped(params, *args):
    losses, aux, vjp_fn = _vjp_of_losses(fun, params, args, has_aux)
    jac = _map_cotangents(vjp_fn, losses.shape[0], batch_size, losses.dtype)
    return ((losses, aux) if has_aux else losses), jac

  return wrapped


def task_gradients(
    fun: Callable[..., Any],
    *,
    has_aux: bool = False,
    batch_size: int | None = None,
    store_jacobian: bool = True,
) -> Callable[..., TaskGradients]:
  r"""Per-task gradients that the transform evaluates only as far as it needs.

  Runs the forward pass once and keeps its VJP. Given to an ``optax_mtl``
  transform, the result costs:

  - on steps where the weights are recomputed: ``K`` backward passes (the
    Jacobian of the shared leaves only, with ``shared=``; the task-specific
    leaves come from one weighted backward pass). With the ``lax.cond`` of
    ``update_weights_every > 1`` the update on these steps is the one
    weighted backward pass of all leaves, as on the other steps: the cond
    chooses only the weights, so that no backward pass runs in a
    conditional branch (XLA:CPU compiles a conv net's gradient there 8x
    slower, jax#12868). The ``K`` backward passes of a refresh still run in
    the branch, so on XLA:CPU a conv net's refresh steps are that much
    slower, unless the caller chooses statically (below). With
    ``update_weights_every=1`` or the caller's ``refresh_weights=True`` the
    update is combined from the Jacobian instead;
  - on steps that reuse the last weights (``update_weights_every > 1``) and
    for methods that ignore the Gram (linear scalarization): one backward pass
    of :math:`\sum_i w_i L_i`.

  The choice is made inside the jitted step by the transform's own state
  (a :func:`jax.lax.cond`), so one compiled step serves both; or by the
  training loop, with the extra arg ``refresh_weights=True``/``False`` of
  the transform's ``update`` as a static argument of the jitted step: two
  compiled steps, no conditional (see :func:`weighted_aggregation`).

  Args:
    fun: ``fun(params, *args) -> losses`` (``(K,)``) or ``(losses, aux)``.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    batch_size: as in :func:`value_and_jacobian`.
    store_jacobian: when ``False`` the Gram matrix is built one column at a
      time, :math:`M e_j = J (J^\top e_j)` (one VJP and one JVP per task),
      and the update is one more backward pass: the ``K x params`` Jacobian
      is never stored, at about twice the compute. The columns run
      ``batch_size`` at a time (``None`` means one at a time here). For models whose Jacobian
      does not fit in memory. Methods that need the explicit per-task
      gradients (GradDrop) reject it. The JVP runs in the model's precision
      (a float16 Gram entry overflows beyond 65504, and the refresh is then
      skipped as non-finite), and it needs forward-mode derivatives
      throughout: a model with a ``jax.custom_vjp`` (fused attention kernels)
      must keep the Jacobian.

  Returns:
    A function ``(params, *args) -> TaskGradients``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_mtl
    >>> fun = lambda p, x: jnp.stack([jnp.sum(p * x), jnp.sum(p ** 2)])
    >>> params, x = jnp.array([1., 2.]), jnp.array([3., 4.])
    >>> tx = optax_mtl.linear_scalarization(2)
    >>> grads = optax_mtl.task_gradients(fun)(params, x)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates
    Array([5., 8.], dtype=float32)
  """
  _check_batch_size(batch_size)

  def wrapped(params, *args):
    if store_jacobian:
      losses, aux, vjp_fn = _vjp_of_losses(fun, params, args, has_aux)
      jvp_fn = None
    else:
      closed = lambda p: fun(p, *args)
      if has_aux:
        losses, jvp_fn, aux = jax.linearize(closed, params, has_aux=True)
      else:
        (losses, jvp_fn), aux = jax.linearize(closed, params), None
      _check_loss_vector(losses, has_aux)
      transposed = jax.linear_transpose(jvp_fn, params)
      vjp_fn = lambda c: transposed(c)[0]
    return VJPTaskGradients(losses, aux, vjp_fn, jvp_fn, params, batch_size, store_jacobian)

  return wrapped


def feature_task_gradients(
    encoder: Callable[..., PyTree],
    heads: Callable[..., Any],
    *,
    has_aux: bool = False,
    batch_size: int | None = None,
    per_task_heads: int | None = None,
    level: Level = "representation",
) -> Callable[..., TaskGradients]:
  r"""Feature-level task gradients: the Gram of :math:`\partial L_i / \partial z`.

  For a model ``z = encoder(params, *args)`` followed by
  ``losses = heads(params, z, *args)``, the transform builds the Gram matrix
  of the representation gradients :math:`\partial L_i/\partial z` (flattened
  together with the batch axis), computes its weights from it, and runs one
  backward pass of :math:`\sum_i w_i L_i` through the heads and the encoder.
  The ``K`` backward passes stop at ``z``: this is the upper-bound
  approximation of MGDA-UB (Sener & Koltun, 2018) and Aligned-MTL-UB
  (Senushkin et al., 2023), available to every Gram-based method. The
  ``shared=`` mask of the transform does not enter: ``z`` is what is shared.
  With ``level="parameters"`` the same split serves the exact per-task path
  instead (see below).

  When ``encoder`` is the identity on the shared parameters, the result equals
  the full per-task path with ``shared=`` set to those parameters.

  Args:
    encoder: ``encoder(params, *args) -> z`` (any pytree of arrays).
    heads: ``heads(params, z, *args) -> losses`` (``(K,)``), or
      ``(losses, aux)`` with ``has_aux=True``.
    has_aux: whether ``heads`` returns ``(losses, aux)``.
    batch_size: as in :func:`value_and_jacobian`, for the ``K`` backward
      passes through the heads.
    per_task_heads: ``None`` (default), or ``K`` for heads that are separate
      per task. Reverse mode cannot know that head ``i`` reads only what task
      ``i`` needs, so each of the ``K`` backward passes through ``heads``
      runs through all ``K`` heads: ``K^2`` head backward passes, which
      dominate the step when ``K`` is large (40 linear heads on a 0.92M MLP
      trunk: 6.0 to 6.3x the step of linear scalarization). With
      ``per_task_heads=K``, ``heads`` is called as ``heads(params, zs, *args)``
      where ``zs`` is a list of ``K`` copies of ``z``, and loss ``i`` must
      read the representation only through ``zs[i]``: a list comprehension
      over separate heads, or ``jax.vmap`` of one head over stacked head
      parameters and ``jnp.stack(zs)``. Then one backward pass of the heads
      gives all ``K`` representation gradients, and ``batch_size`` does not
      enter. They stay ``K`` separate arrays: on XLA:CPU the Gram reads them
      in column blocks (it stacks copies under 32768 numbers, and other
      backends stack them all) and the combination in one fused sum,
      without stacking them first (at ``K = 40`` on that MLP: 1.4x the step of
      linear scalarization, against 2.2x with the stack). A loss that reads
      another task's copy is not detected and makes the Gram wrong.
    level: ``"representation"`` (default): the Gram of the representation
      gradients, the upper-bound approximation above. ``"parameters"``: the
      exact per-task gradients of the parameters, as
      :func:`value_and_jacobian` of ``heads(params, encoder(params, *args),
      *args)`` gives them (every method then acts as on the full per-task
      path, ``shared=`` included), formed as TorchJD's ``mtl_backward``
      forms them: with ``per_task_heads``, one backward pass of the heads
      gives the ``K`` representation gradients and each task's gradient of
      the shared leaves is one backward pass of its representation gradient
      through the encoder only, ``batch_size`` at a time. The full path
      instead runs each of its ``K`` backward passes through all ``K``
      heads. Set ``shared=`` on the transform to the encoder's parameters:
      without it the heads' own per-task gradients enter the Gram, and
      forming them takes ``K`` backward passes through all the heads.
      Shared leaves that the heads also read directly stay exact, at that
      cost. Without ``per_task_heads`` this is the full path.

  Returns:
    A function ``(params, *args) -> TaskGradients``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_mtl
    >>> encoder = lambda p, x, y: jnp.tanh(x @ p["trunk"])
    >>> head = lambda w, z, y: jnp.mean((z @ w - y) ** 2)
    >>> heads = lambda p, zs, x, y: jax.vmap(head)(p["heads"], jnp.stack(zs), y)
    >>> params = {"trunk": jnp.ones((3, 4)) / 3, "heads": jnp.ones((2, 4))}
    >>> x, y = jnp.ones((5, 3)), jnp.stack([jnp.zeros(5), jnp.ones(5)])
    >>> grads = optax_mtl.feature_task_gradients(encoder, heads, per_task_heads=2)(params, x, y)
    >>> tx = optax_mtl.mgda(2)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> jax.tree.map(jnp.shape, updates)
    {'heads': (2, 4), 'trunk': (3, 4)}

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.

    Senushkin et al., `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
  """
  _check_batch_size(batch_size)
  if per_task_heads is not None and (
      isinstance(per_task_heads, bool) or not isinstance(per_task_heads, int) or per_task_heads < 1
  ):
    raise ValueError(f"per_task_heads must be None or a positive int (the number of tasks), got {per_task_heads!r}.")
  if level not in ("representation", "parameters"):
    raise ValueError(f"level must be 'representation' or 'parameters', got {level!r}.")

  def wrapped(params, *args):
    z, encoder_vjp = jax.vjp(lambda p: encoder(p, *args), params)
    heads_input = z
    if per_task_heads is not None:
      # A list, not a stacked array: the transpose of indexing a stacked
      # array is a zero-padded full-size array per task, K^2 memory traffic.
      heads_input = [z] * per_task_heads
    closed = lambda p, rep: heads(p, rep, *args)
    if has_aux:
      losses, heads_vjp, aux = jax.vjp(closed, params, heads_input, has_aux=True)
    else:
      (losses, heads_vjp), aux = jax.vjp(closed, params, heads_input), None
    _check_loss_vector(losses, has_aux)
    if per_task_heads is not None and losses.shape != (per_task_heads,):
      raise ValueError(
          f"heads returned losses of shape {losses.shape} but per_task_heads={per_task_heads}:"
          " the heads must give one loss per copy of the representation."
      )
    if level == "parameters":
      if per_task_heads is not None:
        return EncoderTaskGradients(losses, aux, encoder_vjp, heads_vjp, params, batch_size)
      vjp = lambda c: _backward_through_heads(encoder_vjp, heads_vjp, False, c)
      return VJPTaskGradients(losses, aux, vjp, None, params, batch_size, store_jacobian=True)
    return FeatureTaskGradients(
        losses, aux, encoder_vjp, heads_vjp, params, batch_size, z, per_task_heads is not None
    )

  return wrapped
