"""Guards against the silent broadcast of per-task trees (optax_mtl._src.guard)."""

import jax
import numpy as np
import optax
import pytest

import optax_mtl
import problems

K = problems.NUM_TASKS


def setup():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  return params, jac, losses


def test_the_trap_exists_in_plain_optax():
  """What the guards are for: without an aggregator nothing fails, params grow a K axis."""
  params, jac, _ = setup()
  tx = optax.adam(1e-3)
  with jax.numpy_rank_promotion("allow"):
    updates, _ = tx.update(jac, tx.init(params), params)
    broadcast = optax.apply_updates(params, updates)
  assert broadcast["trunk"]["w"].shape == (K, *params["trunk"]["w"].shape)


def test_apply_updates_rejects_per_task_trees():
  params, jac, _ = setup()
  with pytest.raises(ValueError, match=r"extra leading axis of 3.*not aggregated"):
    optax_mtl.apply_updates(params, jac)
  with pytest.raises(ValueError, match="different tree structures"):
    optax_mtl.apply_updates(params, {"trunk": jac["trunk"]})


def test_apply_updates_equals_optax_on_aggregated_updates():
  params, jac, losses = setup()
  tx = optax.chain(optax_mtl.linear_scalarization(K), optax.sgd(0.1))
  updates, _ = tx.update(jac, tx.init(params), params, task_losses=losses)
  for a, b in zip(jax.tree.leaves(optax_mtl.apply_updates(params, updates)),
                  jax.tree.leaves(optax.apply_updates(params, updates))):
    np.testing.assert_array_equal(a, b)


def test_checked_optimizer_fails_at_trace_time_without_aggregator():
  params, jac, losses = setup()
  bare = optax_mtl.checked(optax.adam(1e-3))
  with jax.numpy_rank_promotion("allow"), pytest.raises(ValueError, match="heads/task0.*not aggregated"):
    jax.jit(bare.update)(jac, bare.init(params), params)
  good = optax_mtl.checked(optax.chain(optax_mtl.linear_scalarization(K), optax.adam(1e-3)))
  updates, state = jax.jit(good.update)(jac, good.init(params), params, task_losses=losses)
  optax_mtl.check_updates(updates, params)
  assert optax.tree.get(state, "weights").shape == (K,)
  with pytest.raises(ValueError, match="needs the params"):
    good.update(jac, good.init(params))
