"""Uncertainty weighting (optax_mtl._src.uncertainty_weighting)."""

import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

K = 3


def test_weights_and_the_log_variance_step():
  params = {"p": jnp.zeros(2)}
  jac = {"p": jnp.ones((K, 2))}
  losses = jnp.array([0.5, 2.0, 8.0])
  tx = optax_mtl.uncertainty_weighting(K, optimizer=optax.sgd(0.1))
  state = tx.init(params)
  _, state = tx.update(jac, state, params, task_losses=losses)
  np.testing.assert_allclose(state.weights, 0.5 * np.ones(K))  # s starts at 0
  expected_s = -0.1 * 0.5 * (1.0 - np.asarray(losses))  # one SGD step on sum 0.5 (e^-s L + s)
  np.testing.assert_allclose(state.weighting_state.log_variances, expected_s, rtol=1e-6)
  _, state = tx.update(jac, state, params, task_losses=losses)
  np.testing.assert_allclose(state.weights, 0.5 * np.exp(-expected_s), rtol=1e-6)


def test_log_variances_converge_to_log_losses():
  params = {"p": jnp.zeros(2)}
  jac = {"p": jnp.ones((K, 2))}
  losses = jnp.array([0.5, 2.0, 8.0])
  tx = optax_mtl.uncertainty_weighting(K, learning_rate=0.05)
  state = tx.init(params)
  for _ in range(600):
    _, state = tx.update(jac, state, params, task_losses=losses)
  np.testing.assert_allclose(state.weighting_state.log_variances, np.log(losses), atol=5e-2)
  # Then every weighted loss 0.5 e^-s L is 0.5.
  np.testing.assert_allclose(state.weights * losses, 0.5, atol=5e-2)
