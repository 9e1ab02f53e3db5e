"""Properties of every transform of the registry (transforms.py) on random inputs, and input validation.

Hypothesis draws a problem structure: ``K`` in 1..8, one to four parameter
leaves of random shapes (rank 0 to 3) and a dtype per leaf (float32 or
bfloat16). For that structure it draws ``VARIANTS`` gradient sets: Gaussian
gradients with a scale per task in 1e-6..1e6 and a random mask that zeroes a
task's gradient on some leaves (or on all of them), plus one all-zero set.
Each set runs two updates from ``tx.init`` (the losses also random, in
1e-3..1e3), all of them in one compiled ``lax.map``: one compilation per
structure. For every case and every set:

- the updates are finite, with the params' shapes and dtypes;
- ``nonfinite_count`` stays 0 (no input here is non-finite, so no step may be
  skipped) and the weights are finite;
- zero gradients give an exactly zero update.

``derandomize=True`` (a seed per parametrized case) makes every run test the
same examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import problems
from transforms import case_params

EXAMPLES_PER_CASE = 3
VARIANTS = 3  # random gradient sets per structure, plus one all-zero set
STEPS = 2
# Cases whose weighting needs the task losses (Weighting.needs_task_losses).
NEEDS_TASK_LOSSES = {"scale_invariant", "dwa", "dwa_blockwise_sum", "uncertainty_weighting", "gradnorm",
                     "mgda_loss_plus_pgd"}
# As in test_precision.py: LLVM optimisation level 0 compiles a third faster.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@st.composite
def random_problems(draw):
  k = draw(st.integers(1, 8), label="K")
  shapes = draw(st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=4),
                label="shapes")
  dtypes = draw(st.lists(st.sampled_from(["float32", "bfloat16"]), min_size=len(shapes), max_size=len(shapes)),
                label="dtypes")
  log_scales = draw(st.lists(st.lists(st.floats(-6.0, 6.0), min_size=k, max_size=k),
                             min_size=VARIANTS, max_size=VARIANTS), label="log10 task scales")
  masks = draw(st.lists(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                                 min_size=k, max_size=k), min_size=VARIANTS, max_size=VARIANTS),
               label="masks (variant, task, leaf)")
  seed = draw(st.integers(0, 2**32 - 1), label="seed")
  return k, shapes, dtypes, np.asarray(log_scales), np.asarray(masks, bool).reshape(VARIANTS, k, len(shapes)), seed


def build(problem):
  """Params, stacked gradient sets ``(VARIANTS + 1, STEPS, K, *shape)`` and losses ``(VARIANTS + 1, STEPS, K)``."""
  k, shapes, dtypes, log_scales, masks, seed = problem
  rng = np.random.default_rng(seed)
  params = {f"p{i}": jnp.asarray(rng.normal(size=shape), dtype) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))}
  scales = np.concatenate([10.0 ** log_scales, np.ones((1, k))])  # the last set is zeroed below
  keep = np.concatenate([masks, np.zeros((1, k, len(shapes)), bool)])
  jac = {}
  for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
    g = rng.normal(size=(VARIANTS + 1, STEPS, k, *shape))
    factor = (scales * keep[:, :, i]).reshape(VARIANTS + 1, 1, k, *([1] * len(shape)))
    jac[f"p{i}"] = jnp.asarray(g * factor, dtype)
  losses = jnp.asarray(10.0 ** rng.uniform(-3.0, 3.0, size=(VARIANTS + 1, STEPS, k)), jnp.float32)
  return params, jac, losses


@pytest.mark.slow
@pytest.mark.parametrize("case", case_params())
@settings(max_examples=EXAMPLES_PER_CASE, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=random_problems())
def test_random_problems(case, problem):
  k = problem[0]
  params, jac, losses = build(problem)
  tx = case.factory(k, **case.kwargs)

  def run_set(inputs):
    def body(state, step_inputs):
      step_jac, step_losses = step_inputs
      updates, state = tx.update(step_jac, state, params, task_losses=step_losses)
      return state, updates

    state, updates = lax.scan(body, tx.init(params), inputs)
    return updates, state.weights, state.nonfinite_count

  run = jax.jit(lambda jac, losses: lax.map(run_set, (jac, losses)), compiler_options=COMPILER_OPTIONS)
  updates, weights, nonfinite = run(jac, losses)

  for name, param in params.items():
    u = updates[name]  # (VARIANTS + 1, STEPS, *param.shape)
    assert u.dtype == param.dtype and u.shape == (VARIANTS + 1, STEPS, *param.shape)
    assert np.isfinite(np.asarray(u, np.float32)).all(), name
    assert not np.asarray(u[-1], np.float32).any(), f"zero gradients, nonzero update at {name}"
  assert weights.shape == (VARIANTS + 1, k) and np.isfinite(np.asarray(weights)).all()
  np.testing.assert_array_equal(nonfinite, 0)


@functools.lru_cache(maxsize=None)
def small_problem():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  return params, jac, losses


@pytest.mark.parametrize("case", case_params())
def test_update_without_task_losses(case):
  """Loss-based weightings reject a missing ``task_losses`` at trace time, jitted or not; the others do not need it."""
  params, jac, _ = small_problem()
  tx = case.factory(problems.NUM_TASKS, **case.kwargs)
  state = tx.init(params)
  if case.name in NEEDS_TASK_LOSSES:
    message = r"needs the per-task losses: call tx.update\(.*task_losses=losses\) with losses of shape \(3,\)"
    with pytest.raises(ValueError, match=message):
      tx.update(jac, state, params)
    with pytest.raises(ValueError, match=message):
      jax.jit(tx.update)(jac, state, params)
    with pytest.raises(ValueError, match=message):
      jax.jit(tx.update)(jac, state, params, task_losses=None)
  else:
    updates, _ = jax.eval_shape(tx.update, jac, state, params)  # traces without losses
    assert jax.tree.map(lambda u: (u.shape, u.dtype), updates) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
