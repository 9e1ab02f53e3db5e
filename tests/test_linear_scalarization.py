"""Linear scalarization (optax_mtl._src.linear_scalarization)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems

K = problems.NUM_TASKS


@pytest.mark.parametrize("reduction, scale", [("sum", 1.0), ("mean", 1.0 / K)])
@pytest.mark.parametrize("weights", [None, (0.5, 2.0, 1.0)])
def test_equals_gradient_of_the_weighted_sum(reduction, scale, weights):
  params = problems.init_params()
  x, y = problems.make_batch()
  w = np.ones(K) if weights is None else np.asarray(weights)
  tx = optax_mtl.linear_scalarization(K, None if weights is None else jnp.asarray(w), reduction=reduction)
  _, jac = problems.per_task_gradients(params, x, y)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  expected = jax.grad(lambda p: scale * jnp.dot(jnp.asarray(w, jnp.float32), problems.task_losses(p, x, y)))(params)
  for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(state.weights, scale * w, rtol=1e-7)
  np.testing.assert_allclose(tx.init(params).weights, scale * w, rtol=1e-7)


def test_options_are_validated():
  with pytest.raises(ValueError, match="reduction"):
    optax_mtl.linear_scalarization(2, reduction="avg")
  with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
    optax_mtl.linear_scalarization(2, jnp.ones(3))
  with pytest.raises(TypeError, match="num_tasks"):
    optax_mtl.linear_scalarization(2.0)


def test_single_task_is_plain_gradient_descent():
  params = {"w": jnp.array([1.0, -2.0])}
  jac = {"w": jnp.array([[0.5, 0.25]])}
  tx = optax_mtl.linear_scalarization(1)
  updates, _ = tx.update(jac, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], [0.5, 0.25])
