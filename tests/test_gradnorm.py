"""GradNorm (optax_mtl._src.gradnorm)."""

import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

K = 3


def test_one_step_of_the_l1_balancing_objective():
  g = np.diag([1.0, 2.0, 4.0])  # orthogonal gradients of norms 1, 2, 4
  params = {"p": jnp.zeros(3)}
  jac = {"p": jnp.asarray(g, jnp.float32)}
  tx = optax_mtl.gradnorm(K, alpha=1.5, optimizer=optax.sgd(0.1))
  state = tx.init(params)
  losses0 = jnp.array([1.0, 1.0, 1.0])
  updates, state = tx.update(jac, state, params, task_losses=losses0)
  np.testing.assert_allclose(state.weights, np.ones(K))  # the first update uses ones
  np.testing.assert_allclose(updates["p"], [1.0, 2.0, 4.0])
  # Step: target = mean(w n) r^alpha with r = 1; grad = sign(w n - target) n.
  norms = np.array([1.0, 2.0, 4.0])
  target = norms.mean()
  w = 1.0 - 0.1 * np.sign(norms - target) * norms
  w = K * w / w.sum()
  np.testing.assert_allclose(state.weighting_state.task_weights, w, rtol=1e-6)
  np.testing.assert_allclose(state.weighting_state.initial_losses, losses0)


def test_weighted_norms_balance_over_steps():
  g = np.diag([1.0, 3.0, 10.0])
  params = {"p": jnp.zeros(3)}
  jac = {"p": jnp.asarray(g, jnp.float32)}
  tx = optax_mtl.gradnorm(K, learning_rate=0.02)
  state = tx.init(params)
  for _ in range(400):
    _, state = tx.update(jac, state, params, task_losses=jnp.ones(K))
  weighted = np.asarray(state.weighting_state.task_weights) * np.diag(g)
  np.testing.assert_allclose(weighted / weighted.mean(), 1.0, atol=0.05)  # equal training rates -> equal norms
  np.testing.assert_allclose(np.sum(state.weighting_state.task_weights), K, rtol=1e-5)


def test_second_step_reads_the_training_rates_and_alpha():
  # Losses that moved unevenly since L(0): rates r_i = (L_i / L_i(0)) / mean(L / L(0)) enter the
  # target as r^alpha, so alpha and the rate formula change the step (constant losses hide both).
  g = np.diag([1.0, 2.0, 4.0])
  params = {"p": jnp.zeros(3)}
  jac = {"p": jnp.asarray(g, jnp.float32)}
  losses0, losses1 = np.array([1.0, 2.0, 4.0]), np.array([0.9, 0.5, 4.0])
  norms = np.array([1.0, 2.0, 4.0])
  for alpha in (0.5, 3.0):
    tx = optax_mtl.gradnorm(K, alpha=alpha, optimizer=optax.sgd(0.1))
    state = tx.init(params)
    _, state = tx.update(jac, state, params, task_losses=jnp.asarray(losses0, jnp.float32))
    w = np.asarray(state.weighting_state.task_weights, np.float64)
    updates, state = tx.update(jac, state, params, task_losses=jnp.asarray(losses1, jnp.float32))
    np.testing.assert_allclose(updates["p"], w * norms, rtol=1e-6)  # this step's update uses the weights in force
    relative = losses1 / losses0
    rates = relative / relative.mean()
    target = np.mean(w * norms) * rates**alpha
    new_w = np.maximum(w - 0.1 * np.sign(w * norms - target) * norms, 1e-3)
    np.testing.assert_allclose(state.weighting_state.task_weights, K * new_w / new_w.sum(), rtol=1e-6)
    np.testing.assert_allclose(state.weighting_state.initial_losses, losses0)  # L(0) stays the first losses
