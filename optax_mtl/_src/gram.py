"""The first and last stages of every Gram-based method: ``gram`` and ``combine``.

``gram`` contracts every non-task axis of every leaf and sums the ``K x K``
results, so the per-task gradients are never concatenated (nor, under a
mesh, reshaped to ``(K, -1)``). On sharded parameters each device contracts its own shard and
one all-reduce of ``K x K`` numbers finishes the job: the gradients are never
gathered.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_mtl._src import contract
from optax_mtl._src import shared as shared_lib

PyTree = Any
_UNROLL_LIMIT = 16


def accumulation_dtype(*dtypes) -> jnp.dtype:
  """float32, or float64 when a leaf is float64 (only under ``jax_enable_x64``)."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes)) if dtypes else jnp.dtype(jnp.float32)


def _replicated_out_sharding(leaf):
  """``P()`` on the leaf's mesh when that mesh has Explicit axes, else ``None``.

  With Explicit axes JAX refuses to guess the sharding of a contraction over a
  sharded dimension; the Gram is tiny and every device needs it, so it is
  replicated. With Auto axes (or no mesh) the partitioner decides on its own.
  """
  mesh = jax.typeof(leaf).sharding.mesh
  if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return NamedSharding(mesh, PartitionSpec())
  return None


def _plain_cpu(leaf) -> bool:
  """Whether ``leaf`` lives unsharded on XLA:CPU, where its Gram takes the matrix paths below.

  Merging the non-task axes is a free bitcast for an unsharded row-major
  leaf, but it could make the partitioner move a leaf sharded on a minor
  axis, so leaves under a mesh keep their axes (accelerators merge
  contiguous contracting axes themselves).
  """
  return (jax.default_backend() == "cpu" and jax.typeof(leaf).sharding.mesh.empty
          and not isinstance(getattr(leaf, "sharding", None), NamedSharding))


# Columns per block of the blocked CPU Gram: a (K, 16384) float32 block is
# 640 KiB at K = 10, so each block's products run from cache.
_CPU_GRAM_BLOCK = 16384


def _cpu_gram_tile(k: int) -> int:
  """Rows per tile of the blocked CPU Gram: row pairs up to ``K = 10``, then 8-row panels.

  XLA:CPU's matrix product of a ``(K, 16384)`` block with itself is fast for
  some ``K`` and several times slower for others; the products of row
  pairs, or of 8-row panels, are not. For one ``(K, 3.2M)`` leaf (median ms,
  the whole product, the pairs, the panels): ``K = 2`` 16.9, 5.5, 15.8;
  ``K = 6`` 29.1, 20.5, 36.8; ``K = 8`` 24.9, 26.9, 24.8; ``K = 10`` 132.9,
  42.6, 78.8; ``K = 12`` 153.1, 69.2, 55.7; ``K = 16`` 112.1, 96.1, 75.2;
  ``K = 40`` 377.9, -, 321.5.
  """
  return 1 if k <= 10 else 8


def _tiled_gram(block: jax.Array, dtype) -> jax.Array:
  """``block @ block.T`` assembled from the products of its row tiles, each pair once (it is symmetric)."""
  k = block.shape[0]
  tile = _cpu_gram_tile(k)
  starts = range(0, k, tile)
  products = {(p, q): lax.dot_general(block[p:p + tile], block[q:q + tile], (((1,), (1,)), ((), ())),
                                      precision=lax.Precision.HIGHEST, preferred_element_type=dtype)
              for p in starts for q in starts if q >= p}
  return jnp.block([[products[p, q] if q >= p else products[q, p].T for q in starts] for p in starts])


def _cpu_blocked_gram(rows: list, dtype) -> jax.Array:
  """The ``(K, K)`` Gram of ``K`` unsharded CPU rows: one ``(K, n)`` matrix, or a list of ``K`` arrays of ``n``.

  XLA:CPU contracts a short-and-wide ``(K, n)`` matrix with itself at a few
  GFLOP/s (226 ms for ``K = 10``, ``n = 3.2M``, where OpenBLAS takes 23 to
  45 ms) and a contraction over several axes 2.7 times slower still (39 vs
  14.5 ms for four ``(10, 512, 512)`` leaves). The products of 16384-column
  blocks are summed in a loop, each block's from its row tiles
  (``_cpu_gram_tile``): 42 ms for that matrix (``K = 2``: 38.9 -> 5.2 ms,
  ``K = 40``: 461 -> 243 ms). A list of wide rows (two blocks or more) is
  never stacked whole, only block by block (narrower ones are, in one
  product): the feature level's ``K`` representation gradients
  (``benchmarks/results/train_step_malloc_*``: its step at K = 40 went from
  2.2x to 1.4x that of linear scalarization).
  """
  if isinstance(rows, jax.Array):
    k, n = rows.shape
    columns = lambda start, size: lax.dynamic_slice_in_dim(rows, start, size, axis=1)
  else:
    rows = [row.reshape(-1) for row in rows]
    k, n = len(rows), rows[0].shape[0]
    columns = lambda start, size: jnp.stack([lax.dynamic_slice_in_dim(row, start, size) for row in rows])
  dot = lambda a: lax.dot_general(a, a, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                                  preferred_element_type=dtype)
  blocks = n // _CPU_GRAM_BLOCK
  # Narrow leaves and the remainder take one product: the tiles' (up to K(K+1)/2)
  # operations pay off only in the loop body, compiled once for every block.
  if blocks < 2:
    return dot(columns(0, n))

  def add_block(i, total):
    return total + _tiled_gram(columns(i * _CPU_GRAM_BLOCK, _CPU_GRAM_BLOCK), dtype)

  total = lax.fori_loop(0, blocks, add_block, jnp.zeros((k, k), dtype))
  if n > blocks * _CPU_GRAM_BLOCK:
    total = total + dot(columns(blocks * _CPU_GRAM_BLOCK, n - blocks * _CPU_GRAM_BLOCK))
  return total


def _leaf_gram(leaf: jax.Array, dtype) -> jax.Array:
  if leaf.ndim > 1 and _plain_cpu(leaf):
    return _cpu_blocked_gram(leaf.reshape(leaf.shape[0], -1), dtype)
  axes = tuple(range(1, leaf.ndim))
  # HIGHEST: accelerators would otherwise round float32 inputs to TF32/bf16.
  return lax.dot_general(
      leaf,
      leaf,
      dimension_numbers=((axes, axes), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=dtype,
      out_sharding=_replicated_out_sharding(leaf),
  )


def gram(per_task_grads: PyTree, mask: PyTree | None = None) -> jax.Array:
  r"""The Gram matrix of the per-task gradients, :math:`M = J J^\top`.

  .. math::
    M_{ij} = \sum_{\ell \in \text{leaves}} \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle

  Each leaf ``(K, *shape)`` is contracted over all of its non-task axes with
  :func:`jax.lax.dot_general` at ``Precision.HIGHEST``, accumulating in
  float32 (float64 for float64 leaves) also for bf16/f16 gradients, and the
  ``K x K`` results are summed over leaves. On parameters sharded over a mesh (Explicit
  or Auto axes) this lowers to local contractions plus one all-reduce. On XLA:CPU an unsharded
  leaf is contracted as a ``(K, n)`` matrix, in blocks of 16384 columns when it
  is wide (5.4x faster for a ``(10, 3.2M)`` leaf: 42 vs 226 ms).

  Args:
    per_task_grads: pytree of per-task gradients, every leaf ``(K, ...)``.
    mask: optional pytree of bools (or a prefix of the tree) selecting the
      leaves that enter the Gram, e.g. the shared parameters.

  Returns:
    The ``(K, K)`` Gram matrix, float32 (float64 if a selected leaf is).

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = {"w": jnp.array([[1., 0.], [1., 1.]]), "b": jnp.array([0., 2.])}
    >>> optax_mtl.gram(jac)
    Array([[1., 1.],
           [1., 6.]], dtype=float32)
  """
  k = contract.check_task_gradients(per_task_grads)
  flags = None if mask is None else shared_lib.broadcast_mask(mask, per_task_grads)
  return gram_of_leaves(shared_lib.selected_leaves(per_task_grads, flags), k)


def gram_of_leaves(leaves: list, num_tasks: int) -> jax.Array:
  """Sum of the per-leaf Grams of already validated ``(K, ...)`` leaves."""
  dtype = accumulation_dtype(*(contract.dtype_of(x) for x in leaves))
  total = jnp.zeros((num_tasks, num_tasks), dtype)
  for leaf in leaves:
    total = total + _leaf_gram(jnp.asarray(leaf), dtype)
  return total


def gram_of_task_trees(trees: list) -> jax.Array:
  """The Gram of ``K`` per-task gradient trees given as a list (tree ``i`` is task ``i``'s gradient).

  Equal to :func:`gram` of the trees stacked leaf by leaf. On XLA:CPU the
  unsharded leaves are contracted without forming the stack.
  """
  per_leaf = [jax.tree.leaves(tree) for tree in trees]
  dtype = accumulation_dtype(*(contract.dtype_of(x) for x in per_leaf[0]))
  total = jnp.zeros((len(trees), len(trees)), dtype)
  for rows in zip(*per_leaf):
    rows = [jnp.asarray(row) for row in rows]
    if rows[0].ndim > 0 and _plain_cpu(rows[0]):
      total = total + _cpu_blocked_gram(rows, dtype)
    else:
      total = total + _leaf_gram(jnp.stack(rows), dtype)
  return total


def combine_task_trees(weights: jax.Array, trees: list) -> PyTree:
  """:math:`\\sum_i w_i g_i` of ``K`` per-task gradient trees given as a list, one fused sum per leaf.

  Accumulated like :func:`combine` (float32, float64 for float64 leaves) and
  cast back to each leaf's dtype.
  """

  def leaf_combine(*rows):
    # Unrolled for every K: the K rows are separate arrays, and a dot would stack them first.
    dtype = accumulation_dtype(jnp.result_type(rows[0]), weights.dtype)
    return _unrolled_sum(weights.astype(dtype), rows, dtype).astype(jnp.result_type(rows[0]))

  return jax.tree.map(leaf_combine, *trees)


def task_sum(x: jax.Array, weights: jax.Array | None = None, *, dtype=None) -> jax.Array:
  """:math:`\\sum_i w_i x_i` over the leading task axis of one ``(K, ...)`` array.

  Accumulated in ``dtype`` (default: float32, float64 for float64 ``x``);
  ``weights=None`` sums with unit weights. For small K the sum is unrolled:
  XLA fuses it into one elementwise pass reading the K slices, where XLA:CPU
  reduces a short leading axis some 40x slower (13 ms against 0.3 ms for
  ``f32[10, 512, 512]``). Unrolling grows the program with K, so from
  ``K > 16`` it is a dot with the weights instead.
  """
  dtype = accumulation_dtype(x.dtype) if dtype is None else dtype
  k = x.shape[0]
  w = jnp.ones((k,), dtype) if weights is None else weights.astype(dtype)
  if k > _UNROLL_LIMIT:
    return lax.dot_general(w, x.astype(dtype), (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=dtype)
  return _unrolled_sum(w, [x[i] for i in range(k)], dtype)


def _unrolled_sum(w: jax.Array, rows, dtype) -> jax.Array:
  """``sum_i w[i] * rows[i]`` as one chain of adds, which XLA fuses into a single pass."""
  total = w[0] * rows[0].astype(dtype)  # XLA folds the products by a constant 1
  for i in range(1, len(rows)):
    total = total + w[i] * rows[i].astype(dtype)
  return total


def combine(weights: jax.Array, per_task_grads: PyTree) -> PyTree:
  r"""The weighted sum over the task axis, :math:`d = J^\top w = \sum_i w_i g_i`.

  Computed leaf by leaf in float32 (float64 for float64 leaves), in one fused
  pass over the gradients; the result is cast back to each leaf's dtype.

  Args:
    weights: ``(K,)`` task weights.
    per_task_grads: pytree of per-task gradients, every leaf ``(K, ...)``.

  Returns:
    A pytree shaped like the parameters.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> jac = {"w": jnp.array([[1., 0.], [1., 1.]])}
    >>> optax_mtl.combine(jnp.array([0.5, 2.0]), jac)
    {'w': Array([2.5, 2. ], dtype=float32)}
  """
  # A tree with no leaves (optax.masked) takes K from the weights.
  k = contract.check_task_gradients(per_task_grads, None if jax.tree.leaves(per_task_grads) else jnp.size(weights))
  weights = contract.check_task_vector(weights, k, "weights")

  def leaf_combine(g):
    g = jnp.asarray(g)
    dtype = accumulation_dtype(g.dtype, weights.dtype)
    return task_sum(g, weights.astype(dtype), dtype=dtype).astype(g.dtype)

  return jax.tree.map(leaf_combine, per_task_grads)
