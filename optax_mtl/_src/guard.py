"""Guards against the silent-broadcast trap.

``optax.apply_updates(params, per_task_grads)`` does not fail: NumPy
broadcasting turns every parameter into a stack of ``K`` copies, and most
optax optimizers broadcast their moments the same way. These guards make it a
trace-time error.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_mtl._src import contract

PyTree = Any


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
  """:func:`optax.apply_updates` that first checks every update's shape.

  Example:
    >>> import jax.numpy as jnp, optax_mtl
    >>> params = {"w": jnp.zeros(2)}
    >>> optax_mtl.apply_updates(params, {"w": jnp.ones((3, 2))})
    Traceback (most recent call last):
    ...
    ValueError: Update at 'w' has shape (3, 2) but its parameter has shape (2,). It has an extra leading axis of 3: ...
  """
  contract.check_updates(updates, params)
  return optax.apply_updates(params, updates)


def checked(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps a whole optimizer so that its updates must match the params' shapes.

  Use it around the optimizer given to code that calls
  :func:`optax.apply_updates` itself (``flax.nnx.Optimizer``, Flax's
  ``TrainState``): a chain without an aggregator then fails at trace time
  instead of broadcasting the params to ``(K, ...)``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_mtl.checked(optax.sgd(1e-3))  # forgot the aggregator
    >>> tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params)
    Traceback (most recent call last):
    ...
    ValueError: Update at 'w' has shape (3, 2) but its parameter has shape (2,). It has an extra leading axis of 3: ...
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("optax_mtl.checked needs the params: call tx.update(updates, state, params).")
    updates, state = tx.update(updates, state, params, **extra_args)
    contract.check_updates(updates, params)
    return updates, state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
