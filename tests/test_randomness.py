"""PRNG keys carried in transform states (optax_mtl._src.randomness)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from optax_mtl._src import randomness

RANDOM = [optax_mtl.pcgrad, optax_mtl.random_weighting, optax_mtl.gradvac, optax_mtl.graddrop]


def step(tx, key_for_jac=0):
  params = {"w": jnp.zeros(4)}
  jac = {"w": jax.random.normal(jax.random.key(key_for_jac), (3, 4))}
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  return np.asarray(updates["w"]), state


@pytest.mark.parametrize("seed", [7, np.int64(7), np.array(7), jnp.array(7, jnp.int32)], ids=type)
def test_seeds_of_every_integer_kind_give_the_same_key(seed):
  data, impl = randomness.key_data(seed)
  np.testing.assert_array_equal(np.asarray(data), np.asarray(jax.random.key_data(jax.random.key(7))))
  assert impl is None


@pytest.mark.parametrize("factory", RANDOM)
def test_seed_typed_key_and_raw_data_draw_the_same(factory):
  expected, _ = step(factory(3, key=5))
  for key in (jax.random.key(5), jax.random.PRNGKey(5), jnp.array(5)):
    np.testing.assert_array_equal(step(factory(3, key=key))[0], expected)


@pytest.mark.parametrize("factory", RANDOM)
def test_key_is_injectable_as_a_hyperparameter(factory):
  # inject_hyperparams turns the int key into a 0-d array, traced under jit.
  tx = optax.inject_hyperparams(factory, static_args=("num_tasks",))(3, key=5)
  np.testing.assert_array_equal(step(tx)[0], step(factory(3, key=5))[0])


@pytest.mark.parametrize("factory", RANDOM)
def test_other_key_implementations_are_kept(factory):
  tx = factory(3, key=jax.random.key(5, impl="rbg"))
  first, state = step(tx)
  assert np.all(np.isfinite(first))
  keys = [leaf for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.uint32]
  assert keys and keys[0].shape == jax.random.key_data(jax.random.key(0, impl="rbg")).shape


@pytest.mark.parametrize("key", [jax.random.split(jax.random.key(0), 2), jnp.zeros(2), jnp.zeros(3, jnp.uint32),
                                 True, "0"], ids=["batched", "float", "short_raw", "bool", "str"])
def test_bad_keys_fail_at_construction(key):
  with pytest.raises(ValueError, match="key"):
    optax_mtl.pcgrad(3, key=key)
