"""The shared= mask (optax_mtl._src.shared)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_mtl._src import shared

TREE = {"trunk": {"w": jnp.zeros((2, 3)), "b": jnp.zeros((2,))}, "heads": [jnp.zeros((2, 1)), jnp.zeros((2, 1))]}
PARAMS = jax.tree.map(lambda x: x[0], TREE)


def test_none_means_everything_shared():
  assert shared.resolve(None, PARAMS, TREE) is None
  assert len(shared.selected_leaves(TREE, None)) == 4


def test_full_and_prefix_masks():
  full = {"trunk": {"w": True, "b": False}, "heads": [False, True]}
  flags = shared.resolve(full, PARAMS, TREE)
  assert flags == [False, True, False, True]  # leaf order: heads/0, heads/1, trunk/b, trunk/w
  prefix = {"trunk": True, "heads": False}
  assert shared.resolve(prefix, PARAMS, TREE) == [False, False, True, True]
  assert shared.resolve(np.bool_(False), PARAMS, TREE) == [False] * 4


def test_callable_receives_params():
  seen = []

  def mask(params):
    seen.append(jax.tree.map(jnp.shape, params))
    return {"trunk": True, "heads": False}

  assert shared.resolve(mask, PARAMS, TREE) == [False, False, True, True]
  assert seen[0]["trunk"]["w"] == (3,)


def test_callable_without_params_is_an_error():
  with pytest.raises(ValueError, match="without params"):
    shared.resolve(lambda p: True, None, TREE)


def test_traced_mask_is_an_error():
  def f(flag):
    return shared.resolve({"trunk": flag, "heads": False}, PARAMS, TREE)

  with pytest.raises(TypeError, match="static"):
    jax.jit(f)(True)


def test_non_bool_mask_is_an_error():
  with pytest.raises(TypeError, match="must be a bool"):
    shared.resolve({"trunk": 1, "heads": False}, PARAMS, TREE)


def test_mismatched_structure_is_an_error():
  with pytest.raises(ValueError, match="structure of the params"):
    shared.resolve({"encoder": True}, PARAMS, TREE)


def test_a_callable_mask_under_inject_hyperparams_is_a_static_arg():
  # inject_hyperparams calls every non-static callable with the step count (a
  # schedule); the README says to list a callable shared= in static_args.
  import optax

  import optax_mtl

  mask = lambda params: jax.tree.map(lambda x: x.ndim == 1, params)  # reads the params
  params = {"w": jnp.ones(3), "heads": jnp.ones((2, 2))}
  jac = {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), "heads": jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])}
  tx = optax.inject_hyperparams(optax_mtl.mgda, static_args=("num_tasks", "shared"))(2, shared=mask)
  plain = optax_mtl.mgda(2, shared=mask)
  got, _ = tx.update(jac, tx.init(params), params)
  want, _ = plain.update(jac, plain.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  unmasked = optax_mtl.mgda(2)
  other, _ = unmasked.update(jac, unmasked.init(params), params)
  assert not np.allclose(got["w"], other["w"])  # the mask changes the answer here
