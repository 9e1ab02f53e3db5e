"""Precision of every transform of the registry (transforms.py): float64, bfloat16, float16.

Each case runs ``STEPS`` updates (state threaded, another batch's per-task
gradients at every step) on the problem of problems.py inside one
``lax.scan``: in float32, in float64 (under ``jax.enable_x64``, scoped to the
test) and with the params and the whole Jacobian in bfloat16 or float16 (the
losses stay float32, as a mixed-precision loss is). An error is the largest
absolute difference on an update leaf (or the weights) at one step, relative
to that leaf's largest magnitude; the largest value measured on this CPU over
all steps and cases is given in brackets.

- **float64 against float32**: updates within ``F64_RTOL`` = 5e-6 [1.2e-6,
  GradNorm], weights within ``F64_WEIGHTS_RTOL`` = 5e-6 [9.7e-7]. Exceptions
  (``*_BY_CASE``): MGDA, whose min-norm update is a cancellation of the task
  gradients (much shorter than they are), 2e-5 [1.8e-6; 6.5e-6 for one step
  on problems.make_batch()'s default batch]; MGDA with the official PGD loop, which stops once an iteration moves
  the weights by less than 1e-5 (L1), so the weights are defined to about that
  and a head whose task has a small weight inherits it as a relative error:
  updates 2e-3 [6.6e-4], weights 5e-5 [6.5e-6]. The random methods draw the
  same float32 numbers in both precisions (before this test, RLW and GradDrop
  drew float64 numbers under x64: another experiment from the same key).
- **bfloat16/float16 against float32 on the same gradient values** (the low
  precision gradients upcast): the weights agree to float32 rounding
  (``rtol=1e-6``) [bitwise], which holds because the Gram matrix and every
  weighting run in float32; each update leaf is the float32 update rounded to
  the leaf's dtype within ``ROUNDING_EPS`` = 2 epsilons of the dtype [mostly
  bitwise; 0.47 eps where the two float32 sums differ in their last bit and
  round to neighbouring values; 0.96 eps for Nash-MTL, whose clipping rescales
  the already rounded update]. Low-precision gradients lose nothing beyond
  their own rounding.
- **bfloat16/float16 against float32 on the unrounded gradients**: within
  ``LOW_RTOL_EPS`` = 4 epsilons of the dtype (bfloat16 eps 7.8e-3, float16
  9.8e-4) [1.13 eps]: the rounding of the gradients, propagated through the
  weighting. MGDA with the PGD loop (stopping rule above): 0.25 [0.11].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax_mtl
import pytest
from jax import lax

import problems
from transforms import CASES, case_params

K = problems.NUM_TASKS
STEPS = 5
F64_RTOL = 5e-6
F64_RTOL_BY_CASE = {"mgda": 2e-5, "mgda_loss_plus_pgd": 2e-3}
F64_WEIGHTS_RTOL = 5e-6
F64_WEIGHTS_RTOL_BY_CASE = {"mgda_loss_plus_pgd": 5e-5}
ROUNDING_EPS = 2
LOW_RTOL_EPS = 4
LOW_RTOL_BY_CASE = {"mgda_loss_plus_pgd": 0.25}  # not in epsilons: the solver's own stopping rule
LOW_DTYPES = [jnp.bfloat16, jnp.float16]
# The comparisons here are of numbers, not speed: LLVM optimisation level 0 cuts
# XLA:CPU compile time (which dominates these tests) by about a third and
# leaves the HLO passes (fusion, sharding) and the float semantics unchanged.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
CASE_BY_NAME = {case.name: case for case in CASES}  # Case holds dicts: not hashable itself


@functools.lru_cache(maxsize=None)
def trajectory_inputs():
  """Params and ``STEPS`` batches' per-task gradients and losses, float32 NumPy."""
  params = problems.init_params()
  jacs, losses = [], []
  for step in range(STEPS):
    step_losses, jac = problems.per_task_gradients(params, *problems.make_batch(seed=10 + step))
    jacs.append(jac)
    losses.append(step_losses)
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *jacs)
  return jax.tree.map(np.asarray, params), stacked, np.stack([np.asarray(x) for x in losses])


@functools.lru_cache(maxsize=None)
def compiled_run(name):
  """``(params, jacs, losses) -> (updates per step, weights per step, final nonfinite_count)``."""
  case = CASE_BY_NAME[name]
  tx = case.factory(K, **case.kwargs)

  def run(params, jacs, losses):
    def body(state, inputs):
      jac, step_losses = inputs
      updates, state = tx.update(jac, state, params, task_losses=step_losses)
      return state, (updates, state.weights)

    state, (updates, weights) = lax.scan(body, tx.init(params), (jacs, losses))
    return updates, weights, state.nonfinite_count

  return jax.jit(run, compiler_options=COMPILER_OPTIONS)


def run_case(case, grad_dtype, *, jacs=None):
  """The case's trajectory with params and Jacobian in ``grad_dtype``; float64 NumPy outputs."""
  params, default_jacs, losses = trajectory_inputs()
  jacs = default_jacs if jacs is None else jacs
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, grad_dtype), tree)
  loss_dtype = jnp.float64 if grad_dtype == jnp.float64 else jnp.float32
  updates, weights, nonfinite = compiled_run(case.name)(cast(params), cast(jacs), jnp.asarray(losses, loss_dtype))
  dtypes = [u.dtype for u in jax.tree.leaves(updates)]
  as_f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  return as_f64(updates), dtypes, as_f64(weights), weights.dtype, int(nonfinite)


def relative_errors(actual, expected):
  """Per leaf and step: ``max |actual - expected| / max |expected|`` (0 where both vanish)."""
  errors = []
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    for a_t, e_t in zip(a, e):  # steps
      scale = np.max(np.abs(e_t))
      diff = np.max(np.abs(a_t - e_t)) if a_t.size else 0.0
      errors.append(diff / scale if scale > 0 else diff)
  return np.asarray(errors)


@functools.lru_cache(maxsize=None)
def float32_run(name):
  return run_case(CASE_BY_NAME[name], jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", case_params())
def test_float64_agrees_with_float32(case):
  updates32, _, weights32, _, _ = float32_run(case.name)
  with jax.enable_x64(True):
    updates64, dtypes64, weights64, weights_dtype64, nonfinite = run_case(case, jnp.float64)
  assert all(dtype == jnp.float64 for dtype in dtypes64)
  assert weights_dtype64 == jnp.float64  # the weighting itself runs in float64
  assert nonfinite == 0
  assert relative_errors(updates32, updates64).max() <= F64_RTOL_BY_CASE.get(case.name, F64_RTOL)
  weights_rtol = F64_WEIGHTS_RTOL_BY_CASE.get(case.name, F64_WEIGHTS_RTOL)
  assert relative_errors(weights32[:, None], weights64[:, None]).max() <= weights_rtol


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", case_params())
def test_low_precision_gradients(case, dtype):
  params, jacs, _ = trajectory_inputs()
  updates, dtypes, weights, weights_dtype, nonfinite = run_case(case, dtype)
  assert dtypes == [jnp.dtype(dtype)] * len(jax.tree.leaves(params))
  assert [u.shape[1:] for u in jax.tree.leaves(updates)] == [p.shape for p in jax.tree.leaves(params)]
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  assert weights_dtype == jnp.float32 and nonfinite == 0
  eps = float(jnp.finfo(dtype).eps)

  # The same gradient values in float32: identical weights, updates within one rounding.
  rounded_jacs = jax.tree.map(lambda g: np.asarray(jnp.asarray(g, dtype), np.float32), jacs)
  upcast_updates, _, upcast_weights, _, _ = run_case(case, jnp.float32, jacs=rounded_jacs)
  np.testing.assert_allclose(weights, upcast_weights, rtol=1e-6, atol=0)
  rounded = jax.tree.map(lambda u: np.asarray(jnp.asarray(u, jnp.float32).astype(dtype), np.float64),
                         upcast_updates)
  assert relative_errors(updates, rounded).max() <= ROUNDING_EPS * eps

  # Against the unrounded float32 gradients: their rounding, propagated.
  updates32, _, _, _, _ = float32_run(case.name)
  assert relative_errors(updates, updates32).max() <= LOW_RTOL_BY_CASE.get(case.name, LOW_RTOL_EPS * eps)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gram_of_low_precision_gradients_accumulates_in_float32(dtype):
  _, jacs, _ = trajectory_inputs()
  low = jax.tree.map(lambda g: jnp.asarray(g[0], dtype), jacs)
  upcast = jax.tree.map(lambda g: g.astype(jnp.float32), low)
  gram = jax.jit(optax_mtl.gram)(low)
  assert gram.dtype == jnp.float32
  np.testing.assert_allclose(gram, jax.jit(optax_mtl.gram)(upcast), rtol=1e-6, atol=0)
  # A float16 or bfloat16 accumulator would be off by about its epsilon on the
  # random gradients above (rtol 1e-6 rules that out), and a float16 one would
  # overflow here: every entry of M (up to 262144) exceeds float16's 65504.
  big = {"w": jnp.full((2, 64, 64), 8.0, dtype).at[1].multiply(-0.5)}
  expected = 64.0 * 4096 * np.array([[1.0, -0.5], [-0.5, 0.25]])
  np.testing.assert_array_equal(jax.jit(optax_mtl.gram)(big), expected)
