"""Checkpoints (orbax) and determinism, for every transform of the registry (transforms.py).

Every case trains ``optax.chain(method, optax.adam)`` on the problem of
problems.py, one batch per step, with one jitted step per case.

- Checkpoint: trained ``SAVE_AT`` steps, the params and the whole optimizer
  state (the method's state, its counts and key, Adam's moments) are saved
  with ``orbax.checkpoint.StandardCheckpointer`` and restored into the
  abstract structure of a fresh ``tx.init``; continued to ``STEPS`` they equal
  the uninterrupted run bit for bit. ``SAVE_AT`` is odd, so Nash-MTL with
  ``update_weights_every=2`` resumes between two weight refreshes, and DWA's
  windows straddle the interruption.
- Determinism: rerunning a step from the same state gives bitwise the same
  result; for the random methods, the transform built again with the same key
  has the same state and gives bitwise the same updates, and another key gives
  other updates (the key lives in the state, so it is saved and restored).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import problems
from transforms import CASES

K = problems.NUM_TASKS
STEPS = 7
SAVE_AT = 3
RANDOM_CASES = [case for case in CASES if "key" in case.kwargs]
OTHER_KEY = 1234
pytestmark = pytest.mark.slow  # trains every case for STEPS steps, twice
CASE_BY_NAME = {case.name: case for case in CASES}  # Case holds dicts: not hashable itself
# As in test_precision.py: LLVM optimisation level 0 compiles a third faster;
# both runs compared here go through the same compiled step.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def make_tx(case, **overrides):
  return optax.chain(case.factory(K, **{**case.kwargs, **overrides}), optax.adam(1e-2))


@functools.lru_cache(maxsize=None)
def compiled_step(name):
  tx = make_tx(CASE_BY_NAME[name])

  def step(params, opt_state, x, y):
    losses, jac = problems.per_task_gradients(params, x, y)
    updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, updates

  return jax.jit(step, compiler_options=COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def batches():
  return [problems.make_batch(seed=100 + t) for t in range(STEPS)]


def run(name, params, opt_state, start, stop):
  """Steps ``start..stop-1``; returns the params, the state and every step's updates."""
  updates = []
  for x, y in batches()[start:stop]:
    params, opt_state, step_updates = compiled_step(name)(params, opt_state, x, y)
    updates.append(step_updates)
  return params, opt_state, updates


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@functools.lru_cache(maxsize=None)
def uninterrupted(name):
  params = problems.init_params()
  return run(name, params, make_tx(CASE_BY_NAME[name]).init(params), 0, STEPS)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_restored_checkpoint_continues_bit_for_bit(case, tmp_path):
  params = problems.init_params()
  tx = make_tx(case)
  params, opt_state, _ = run(case.name, params, tx.init(params), 0, SAVE_AT)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": opt_state})

  fresh = problems.init_params()
  target = {"params": fresh, "opt_state": tx.init(fresh)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  # The restored state has the NamedTuple structure of tx.init, its dtypes (int32
  # counts, uint32 key data) and the saved values.
  assert_bitwise_equal(restored, {"params": params, "opt_state": opt_state})
  assert int(restored["opt_state"][0].count) == SAVE_AT  # the method's own step count

  resumed = run(case.name, restored["params"], restored["opt_state"], SAVE_AT, STEPS)
  expected_params, expected_state, expected_updates = uninterrupted(case.name)
  assert_bitwise_equal(resumed[:2], (expected_params, expected_state))
  assert_bitwise_equal(resumed[2], expected_updates[SAVE_AT:])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_step_is_a_pure_function_of_its_inputs(case):
  params, opt_state, _ = uninterrupted(case.name)
  x, y = batches()[0]
  first = compiled_step(case.name)(params, opt_state, x, y)
  assert_bitwise_equal(first, compiled_step(case.name)(params, opt_state, x, y))


@pytest.mark.parametrize("case", RANDOM_CASES, ids=str)
def test_same_key_same_updates_other_key_other_updates(case):
  params = problems.init_params()
  _, _, expected_updates = uninterrupted(case.name)
  # Built again with the same key: the same initial state, hence the same steps.
  same_state = make_tx(case).init(params)
  assert_bitwise_equal(same_state, make_tx(case).init(params))
  _, _, same_updates = run(case.name, params, same_state, 0, STEPS)
  assert_bitwise_equal(same_updates, expected_updates)
  # Another key: the step reads the key from the state, and the draws differ.
  other_state = make_tx(case, key=OTHER_KEY).init(params)
  _, _, other_updates = run(case.name, params, other_state, 0, STEPS)
  differs = [not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
             for a, b in zip(other_updates, expected_updates)]
  assert sum(differs) >= STEPS // 2, differs
