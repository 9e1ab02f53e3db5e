"""Scale-invariant scalarization (optax_mtl._src.scale_invariant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems

K = problems.NUM_TASKS


def test_equals_the_gradient_of_the_sum_of_log_losses():
  params = problems.init_params()
  x, y = problems.make_batch()
  losses, jac = problems.per_task_gradients(params, x, y)
  tx = optax_mtl.scale_invariant(K)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params, task_losses=losses)
  expected = jax.grad(lambda p: jnp.sum(jnp.log(problems.task_losses(p, x, y))))(params)
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(u, e, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(state.weights, 1.0 / losses, rtol=1e-6)


def test_invariant_to_rescaling_a_loss():
  params = problems.init_params()
  x, y = problems.make_batch()
  losses, jac = problems.per_task_gradients(params, x, y)
  scale = jnp.array([1.0, 100.0, 0.01])
  tx = optax_mtl.scale_invariant(K)
  a, _ = tx.update(jac, tx.init(params), params, task_losses=losses)
  scaled_jac = jax.tree.map(lambda g: g * scale.reshape((K,) + (1,) * (g.ndim - 1)), jac)
  b, _ = tx.update(scaled_jac, tx.init(params), params, task_losses=losses * scale)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_non_positive_losses_skip_the_step_and_missing_losses_raise():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  tx = optax_mtl.scale_invariant(K)
  updates, state = tx.update(jac, tx.init(params), params, task_losses=losses.at[1].set(0.0))
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(state.nonfinite_count) == 1
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update(jac, tx.init(params), params)
