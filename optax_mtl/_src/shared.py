"""The ``shared=`` option: which parameters are shared by all tasks.

Only shared leaves enter the Gram matrix. The mask is structural: it is
resolved to Python bools at trace time, exactly like the mask of
:func:`optax.masked`, and may be a prefix of the parameter tree.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import numpy as np

from optax_mtl._src import contract

PyTree = Any
SharedMask = Union[None, PyTree, Callable[[PyTree], PyTree]]


def _as_static_bool(value, path) -> bool:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"The shared mask at '{contract.leaf_path(path)}' is a traced array; the"
        " mask must be static (Python or NumPy bools), as in optax.masked."
    )
  array = np.asarray(value)
  if array.shape != () or array.dtype != np.bool_:
    raise TypeError(
        f"The shared mask at '{contract.leaf_path(path)}' must be a bool, got"
        f" {value!r}."
    )
  return bool(array)


def broadcast_mask(mask: PyTree, tree: PyTree) -> list[bool]:
  """Expands a (prefix) bool mask over ``tree``; one bool per leaf of ``tree``."""
  try:
    full = jax.tree.broadcast(mask, tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
        "The shared mask must have the structure of the params (or a prefix"
        f" of it).\n  mask: {jax.tree.structure(mask)}\n  params:"
        f" {jax.tree.structure(tree)}"
    ) from err
  flat = jax.tree_util.tree_flatten_with_path(full)[0]
  return [_as_static_bool(v, p) for p, v in flat]


def resolve(shared: SharedMask, params: PyTree | None, tree: PyTree) -> list[bool] | None:
  """One static bool per leaf of ``tree`` (``None`` when every leaf is shared).

  Args:
    shared: ``None`` (all shared), a pytree of bools (or a prefix), or a
      callable ``params -> pytree of bools``.
    params: the parameters given to ``update`` (needed for a callable).
    tree: the per-task gradients, with the structure of ``params``.
  """
  if shared is None:
    return None
  if callable(shared):
    if params is None:
      raise ValueError(
          "shared= is a callable of the params, but update() was called"
          " without params: pass params to tx.update(updates, state, params)."
      )
    shared = shared(params)
  return broadcast_mask(shared, tree)


def selected_leaves(tree: PyTree, flags: list[bool] | None) -> list:
  """The leaves of ``tree`` whose flag is true (all leaves for ``None``)."""
  leaves = jax.tree.leaves(tree)
  if flags is None:
    return leaves
  return [leaf for leaf, keep in zip(leaves, flags, strict=True) if keep]
