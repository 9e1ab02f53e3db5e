"""Dynamic weight average (optax_mtl._src.dwa)."""

import jax.numpy as jnp
import numpy as np
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
