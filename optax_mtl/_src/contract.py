"""The per-task gradient contract.

Per-task gradients are a pytree shaped like the parameters whose every leaf
carries a leading task axis of length ``K``: what :func:`jax.jacrev` of a
``(K,)``-valued loss returns. Everything here runs at trace time on shapes
only, so a malformed tree fails before any computation is staged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def leaf_path(path) -> str:
  """A readable name for a pytree path, e.g. ``params/dense/kernel``."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def shape_of(x) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  return tuple(shape) if shape is not None else tuple(np.shape(x))


def dtype_of(x):
  dtype = getattr(x, "dtype", None)
  return jnp.dtype(dtype) if dtype is not None else jnp.result_type(x)


def check_static_int(value, name: str, fixes: str, static_args: tuple[str, ...]) -> int:
  """Validates a factory argument that shapes the state: a Python int >= 1.

  ``optax.inject_hyperparams`` turns numbers into arrays unless they are listed
  in ``static_args``, which the error message names.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{name} must be a Python int (it fixes {fixes} at init); got"
        f" {value!r} of type {type(value).__name__}. Under"
        f" optax.inject_hyperparams pass static_args={static_args!r}."
    )
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return int(value)


def check_num_tasks(num_tasks) -> int:
  """Validates the static ``num_tasks`` argument of every factory."""
  return check_static_int(num_tasks, "num_tasks", "the state shapes", ("num_tasks",))


def check_task_gradients(
    per_task_grads: PyTree,
    num_tasks: int | None = None,
    params: PyTree | None = None,
) -> int:
  """Checks that every leaf carries the same leading task axis; returns ``K``.

  Args:
    per_task_grads: a pytree whose leaves have shape ``(K, *param_shape)``.
    num_tasks: the expected ``K``; when ``None`` it is read from the first leaf
      and only consistency across leaves is checked.
    params: when given, each leaf must have exactly the shape
      ``(K, *param.shape)`` of its parameter.

  Returns:
    The number of tasks ``K``.

  Raises:
    ValueError: naming the offending leaf, its shape and the expected shape.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(per_task_grads)
  if not flat:
    if num_tasks is None:
      raise ValueError("The per-task gradients have no leaves: cannot infer K.")
    return num_tasks

  param_leaves = None
  if params is not None:
    try:
      param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
      raise ValueError(
          "The per-task gradients and the params have different tree"
          f" structures.\n  gradients: {treedef}\n  params: "
          f"{jax.tree.structure(params)}"
      ) from err

  k = num_tasks
  source = "num_tasks"
  for i, (path, leaf) in enumerate(flat):
    shape = shape_of(leaf)
    name = leaf_path(path)
    if param_leaves is not None:
      param_shape = shape_of(param_leaves[i])
      if k is None:
        if len(shape) != len(param_shape) + 1:
          raise ValueError(
              f"Per-task gradient at '{name}' has shape {shape} but its"
              f" parameter has shape {param_shape}: expected (K, *{param_shape})"
              " with a leading task axis."
          )
        k, source = shape[0], f"leaf '{name}'"
      expected = (k, *param_shape)
      if shape != expected:
        raise ValueError(
            f"Per-task gradient at '{name}' has shape {shape}; expected"
            f" {expected}: a leading task axis of {k} (from {source}) before"
            f" the parameter's shape {param_shape}."
        )
    else:
      if not shape:
        raise ValueError(
            f"Per-task gradient at '{name}' is a scalar (shape ()); every leaf"
            " needs a leading task axis of length K."
        )
      if k is None:
        k, source = shape[0], f"leaf '{name}'"
      elif shape[0] != k:
        raise ValueError(
            f"Per-task gradient at '{name}' has shape {shape}, whose leading"
            f" axis is {shape[0]}; expected a leading task axis of {k} (from"
            f" {source}). Without params this check reads only the leading"
            " axes: pass params to tx.update to check every leaf against its"
            " parameter's shape."
        )
    dtype = dtype_of(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"Per-task gradient at '{name}' has dtype {dtype}; real floating"
          " point gradients are required."
      )
  return k


def check_task_vector(x, num_tasks: int, name: str):
  """Checks a ``(K,)`` vector such as ``task_losses`` or user weights."""
  if x is None:
    return None
  shape = shape_of(x)
  if shape != (num_tasks,):
    raise ValueError(
        f"{name} must have shape ({num_tasks},) (one entry per task); got shape"
        f" {shape}."
    )
  return jnp.asarray(x)


def check_updates(updates: PyTree, params: PyTree) -> None:
  """Checks that every update leaf has exactly its parameter's shape.

  A per-task gradient tree that reaches :func:`optax.apply_updates` without
  an aggregator is silently broadcast: ``params + updates`` turns every
  ``(n,)`` parameter into ``(K, n)``. This check, run at trace time, turns
  that into an error naming the leaf.

  Raises:
    ValueError: naming the first leaf whose shape differs.
  """
  try:
    param_leaves = jax.tree.structure(updates).flatten_up_to(params)
  except (ValueError, TypeError) as err:
    raise ValueError(
        "The updates and the params have different tree structures.\n  updates:"
        f" {jax.tree.structure(updates)}\n  params: {jax.tree.structure(params)}"
    ) from err
  for (path, update), param in zip(jax.tree_util.tree_flatten_with_path(updates)[0], param_leaves):
    if shape_of(update) != shape_of(param):
      hint = ""
      if shape_of(update)[1:] == shape_of(param):
        hint = (
            " It has an extra leading axis of"
            f" {shape_of(update)[0]}: per-task gradients that were not aggregated"
            " (put an optax_mtl transform first in the chain)."
        )
      raise ValueError(
          f"Update at '{leaf_path(path)}' has shape {shape_of(update)} but its"
          f" parameter has shape {shape_of(param)}.{hint}"
      )
