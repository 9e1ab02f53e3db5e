"""Dynamic weight average (optax_mtl._src.dwa)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl

K = 3


def weights_over(tx, losses):
  params = {"p": jnp.zeros(2)}
  jac = {"p": jnp.ones((K, 2))}
  state = tx.init(params)
  out = []
  for loss in losses:
    _, state = tx.update(jac, state, params, task_losses=jnp.asarray(loss))
    out.append(np.asarray(state.weights))
  return np.array(out)


LOSSES = np.random.default_rng(0).uniform(0.5, 2.0, size=(40, K)).astype(np.float32)


def test_sliding_window_is_nash_mtl_dynamic_weight_average():
  """A line-by-line transcription of AvivNavon/nash-mtl DynamicWeightAverage (float32 numpy)."""
  window, temperature = 4, 2.0
  costs = np.ones((2 * window, K), np.float32)
  weights = np.ones(K, np.float32)
  expected = []
  for t, loss in enumerate(LOSSES):
    costs[:-1] = costs[1:]
    costs[-1] = loss
    if t > window:
      ratios = costs[window:].mean(0) / costs[:window].mean(0)
      weights = K * np.exp(ratios / temperature) / np.exp(ratios / temperature).sum()
    expected.append(weights / K)  # the official loss is the mean of the weighted losses
  got = weights_over(optax_mtl.dwa(K, window=window), LOSSES)
  np.testing.assert_allclose(got, np.array(expected), rtol=1e-5)


def test_blockwise_is_the_papers_epoch_rule():
  window = 5
  got = weights_over(optax_mtl.dwa(K, window=window, mode="blockwise", reduction="sum"), LOSSES)
  averages = LOSSES.reshape(-1, window, K).mean(axis=1)  # per "epoch"
  for epoch in range(len(averages)):
    block = got[epoch * window:(epoch + 1) * window]
    np.testing.assert_allclose(block, np.broadcast_to(block[0], block.shape))  # constant within an epoch
    if epoch < 2:
      np.testing.assert_allclose(block[0], np.ones(K))
    else:
      ratios = averages[epoch - 1] / averages[epoch - 2]
      np.testing.assert_allclose(block[0], K * np.exp(ratios / 2) / np.exp(ratios / 2).sum(), rtol=1e-5)


def test_options_are_validated():
  for kwargs in ({"mode": "epoch"}, {"reduction": "max"}, {"window": 0}):
    with pytest.raises(ValueError):
      optax_mtl.dwa(K, **kwargs)
  for window in (2.0, True, jnp.array(3)):
    with pytest.raises(TypeError, match="window must be a Python int"):
      optax_mtl.dwa(K, window=window)


def test_under_inject_hyperparams_window_is_static():
  # inject_hyperparams turns numbers into arrays; the window shapes the state.
  with pytest.raises(TypeError, match=r"static_args=\('num_tasks', 'window'\)"):
    optax.inject_hyperparams(optax_mtl.dwa, static_args=("num_tasks",))(K, window=3).init({"w": jnp.zeros(2)})
  tx = optax.inject_hyperparams(optax_mtl.dwa, static_args=("num_tasks", "window"))(K, window=3, temperature=2.0)
  plain = optax_mtl.dwa(K, window=3, temperature=2.0)
  params = {"w": jnp.ones(2)}
  grads = {"w": jnp.stack([jnp.full(2, float(i + 1)) for i in range(K)])}
  state, plain_state = tx.init(params), plain.init(params)
  for step in range(8):
    losses = jnp.asarray(LOSSES[step])
    got, state = tx.update(grads, state, params, task_losses=losses)
    want, plain_state = plain.update(grads, plain_state, params, task_losses=losses)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("mode", ["sliding", "blockwise"])
def test_a_task_loss_of_zero_does_not_stop_training(mode):
  # Task 0's loss is exactly 0 for 10 steps, then 0.5 again. 0 / 0 used to make
  # the weights NaN; the skipped step rolled the history back, so every later
  # step was skipped too (53 of 60 here).
  window = 3
  losses = LOSSES[:60].copy()
  losses[10:20, 0] = 0.0
  losses[20:, 0] = 0.5
  tx = optax_mtl.dwa(K, window=window, mode=mode)
  params = {"p": jnp.zeros(2)}
  jac = {"p": jnp.asarray(np.random.default_rng(1).normal(size=(K, 2)), jnp.float32)}
  state = tx.init(params)
  for loss in losses:
    updates, state = tx.update(jac, state, params, task_losses=jnp.asarray(loss))
    assert np.all(np.isfinite(np.asarray(updates["p"]))) and np.any(np.asarray(updates["p"]) != 0)
  assert int(state.nonfinite_count) == 0 and int(state.count) == len(losses)
  # While both windows average 0, the task counts as unchanged: ratio 1.
  state = tx.init(params)
  for loss in losses[:19]:
    _, state = tx.update(jac, state, params, task_losses=jnp.asarray(loss))
  if mode == "sliding":
    newer = losses[19 - window:19].mean(0)
    older = losses[19 - 2 * window:19 - window].mean(0)
    ratios = np.where(older != 0, newer / np.where(older != 0, older, 1), 1.0)
    assert ratios[0] == 1.0
    np.testing.assert_allclose(np.asarray(state.weights), np.exp(ratios / 2) / np.exp(ratios / 2).sum(), rtol=1e-5)


def test_nan_losses_are_still_skipped():
  tx = optax_mtl.dwa(K, window=2)
  params = {"p": jnp.zeros(2)}
  jac = {"p": jnp.ones((K, 2))}
  state = tx.init(params)
  for loss in LOSSES[:4]:
    _, state = tx.update(jac, state, params, task_losses=jnp.asarray(loss))
  updates, new_state = tx.update(jac, state, params, task_losses=jnp.asarray([np.nan, 1.0, 1.0]))
  assert np.all(np.asarray(updates["p"]) == 0) and int(new_state.nonfinite_count) == 1
  np.testing.assert_array_equal(np.asarray(new_state.weighting_state.history), np.asarray(state.weighting_state.history))
