"""Random loss weighting (optax_mtl._src.random_weighting)."""

import jax
import numpy as np

import optax_mtl
import problems

K = problems.NUM_TASKS


def run(tx, steps=4):
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  state = tx.init(params)
  weights = []
  for _ in range(steps):
    updates, state = jax.jit(tx.update)(jac, state, params)
    weights.append(np.asarray(state.weights))
    np.testing.assert_allclose(updates["trunk"]["w"], optax_mtl.combine(state.weights, jac)["trunk"]["w"], rtol=1e-5,
                               atol=1e-7)
  return np.array(weights)


def test_softmax_of_normal_draws_carried_key():
  weights = run(optax_mtl.random_weighting(K, key=0))
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(weights > 0)
  assert len({tuple(np.round(w, 6)) for w in weights}) == len(weights)  # a fresh draw per step
  # Same key, same sequence (also from a typed key); another key, another one.
  np.testing.assert_array_equal(weights, run(optax_mtl.random_weighting(K, key=jax.random.key(0))))
  assert not np.allclose(weights, run(optax_mtl.random_weighting(K, key=1)))
  expected = jax.nn.softmax(jax.random.normal(jax.random.split(jax.random.key(0))[1], (K,)))
  np.testing.assert_allclose(weights[0], expected, rtol=1e-6)


def test_update_weights_every_keeps_a_draw():
  weights = run(optax_mtl.random_weighting(K, key=0, update_weights_every=2))
  np.testing.assert_array_equal(weights[0], weights[1])
  assert not np.allclose(weights[1], weights[2])
