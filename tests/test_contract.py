"""The per-task gradient contract (optax_mtl._src.contract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src import contract


def tree(k=3):
  return {"dense": {"kernel": jnp.zeros((k, 4, 5)), "bias": jnp.zeros((k, 5))}, "scale": jnp.zeros((k,))}


def params():
  return {"dense": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros((5,))}, "scale": jnp.zeros(())}


def test_returns_k_from_leaves_and_from_num_tasks():
  assert optax_mtl.check_task_gradients(tree(3)) == 3
  assert optax_mtl.check_task_gradients(tree(3), 3, params()) == 3
  assert optax_mtl.check_task_gradients(tree(1), 1, params()) == 1


def test_k_different_from_num_tasks_names_leaf_and_shapes():
  with pytest.raises(ValueError, match=r"'dense/bias' has shape \(3, 5\); expected \(4, 5\).*num_tasks"):
    optax_mtl.check_task_gradients(tree(3), 4, params())
  # Without params a leaf may lack its task axis or have the wrong K: the message guesses no shape.
  with pytest.raises(ValueError, match=r"'dense/bias' has shape \(3, 5\).*leading task axis of 4 \(from num_tasks\)"
                     r".*pass params"):
    optax_mtl.check_task_gradients(tree(3), 4)


def test_inconsistent_k_across_leaves():
  bad = tree(3)
  bad["scale"] = jnp.zeros((2,))
  with pytest.raises(ValueError, match=r"'scale' has shape \(2,\).*leading task axis of 3 \(from leaf 'dense/bias'\)"):
    optax_mtl.check_task_gradients(bad)


def test_missing_task_axis_against_params():
  bad = tree(3)
  bad["dense"]["kernel"] = jnp.zeros((4, 5))
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(4, 5\); expected \(3, 4, 5\)"):
    optax_mtl.check_task_gradients(bad, 3, params())
  with pytest.raises(ValueError, match=r"scalar"):
    optax_mtl.check_task_gradients({"a": jnp.zeros(())})


def test_errors_are_raised_at_trace_time():
  bad = tree(3)
  bad["dense"]["kernel"] = jnp.zeros((2, 4, 5))
  traced = jax.jit(lambda t: optax_mtl.check_task_gradients(t, 3) and 0)
  with pytest.raises(ValueError, match="dense/kernel"):
    jax.eval_shape(traced, bad)


def test_structure_mismatch_with_params():
  with pytest.raises(ValueError, match="different tree structures"):
    optax_mtl.check_task_gradients(tree(3), 3, {"other": jnp.zeros(3)})


def test_integer_gradients_are_rejected():
  with pytest.raises(TypeError, match="floating point"):
    optax_mtl.check_task_gradients({"a": jnp.zeros((3, 2), jnp.int32)})


def test_empty_tree_needs_num_tasks():
  assert optax_mtl.check_task_gradients({}, 3) == 3
  with pytest.raises(ValueError, match="no leaves"):
    optax_mtl.check_task_gradients({})


def test_shape_dtype_structs_are_accepted():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree(2))
  assert optax_mtl.check_task_gradients(abstract, 2, params()) == 2


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, np.float32(3), None])
def test_num_tasks_validation(bad):
  with pytest.raises((TypeError, ValueError), match="num_tasks"):
    contract.check_num_tasks(bad)


def test_task_vector():
  assert contract.check_task_vector(None, 3, "task_losses") is None
  with pytest.raises(ValueError, match=r"task_losses must have shape \(3,\).*\(3, 1\)"):
    contract.check_task_vector(jnp.zeros((3, 1)), 3, "task_losses")
