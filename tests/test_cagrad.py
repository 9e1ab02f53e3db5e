"""CAGrad (optax_mtl._src.cagrad)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems
import reference
from optax_mtl._src import cagrad as cagrad_lib

CASES = reference.cases()
DEGENERATE = ("zero_task", "pareto")


@functools.lru_cache(maxsize=None)
def solver(c, rescale):
  return jax.jit(functools.partial(optax_mtl.weighting.cagrad, c=c, rescale=rescale))


def objective(gram, c, w):
  k = len(w)
  b = np.ones(k) / k
  return w @ gram @ b + c * np.sqrt(b @ gram @ b) * np.sqrt(max(w @ gram @ w, 0.0))


@functools.lru_cache(maxsize=None)
def _simplex_solver(c):
  def solve(gram):
    problem = cagrad_lib._scaled(gram, c)
    return cagrad_lib._solve(problem) * problem.equality

  return jax.jit(solve)


def simplex_solution(gram, c, dtype=jnp.float32):
  return np.asarray(_simplex_solver(c)(jnp.asarray(gram, dtype)), np.float64)


@pytest.mark.parametrize("case", reference.params(CASES))
@pytest.mark.parametrize("c", [0.4, 0.5])
def test_solves_the_simplex_problem_to_kkt_1e5(case, c):
  gram = reference.get(case, "gram")
  w = simplex_solution(gram, c)
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  if np.sqrt(max(w @ gram @ w, 0.0)) <= 1e-4 * (w @ np.sqrt(np.diag(gram))):
    # The optimum is the kink g_w = 0 (no KKT point; 0 is in the convex
    # hull and no w does better than F = 0): CAGrad degenerates to zero.
    assert case["regime"] == "pareto"
    official = reference.get(case, f"cagrad_official_c0{int(c * 10)}_w")
    assert objective(gram, c, official) >= -1e-6 * np.max(np.diag(gram))
    weights = np.asarray(solver(c, 1)(jnp.asarray(gram, jnp.float32)), np.float64)
    assert weights @ gram @ weights <= 1e-10 * np.max(np.diag(gram))  # zero update
  else:
    assert float(cagrad_lib.kkt_residual(jnp.asarray(gram, jnp.float32), c, jnp.asarray(w, jnp.float32))) <= 1e-5
  if case["regime"] != "zero_task":  # there we solve the problem of the other tasks, see below
    # Never worse than the official SLSQP solution (it is strictly worse on the scale cases).
    scale = np.max(np.diag(gram))
    official = reference.get(case, f"cagrad_official_c0{int(c * 10)}_w")
    assert objective(gram, c, w) <= objective(gram, c, official) + 1e-6 * scale


@pytest.mark.slow
@pytest.mark.parametrize("case", reference.params([c for c in CASES if c["regime"] == "scale"]))
def test_float32_matches_float64_on_graded_norms(case):
  """Solved in y = n * w, float32 keeps the small tasks; float64 certifies itself by KKT ~ 1e-12."""
  gram = reference.get(case, "gram")
  with jax.enable_x64(True):
    w64 = simplex_solution(gram, 0.5, jnp.float64)
    assert float(cagrad_lib.kkt_residual(jnp.asarray(gram), 0.5, jnp.asarray(w64))) <= 1e-11
    weights64 = np.asarray(optax_mtl.weighting.cagrad(jnp.asarray(gram), c=0.5, rescale=0))
  weights32 = np.asarray(solver(0.5, 0)(jnp.asarray(gram, jnp.float32)), np.float64)
  dw = weights32 - weights64
  assert np.sqrt(dw @ gram @ dw) <= 1e-5 * np.sqrt(weights64 @ gram @ weights64)


def test_zero_gradient_tasks_are_left_out():
  """A zero task cannot improve; CAGrad acts on the others (the mean still counts all K)."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(4, 12))
  g[1] = -0.7 * g[0] + 0.2 * rng.normal(size=12)
  full = np.concatenate([g[:2], np.zeros((1, 12)), g[2:]])
  w_full = np.asarray(solver(0.5, 0)(jnp.asarray(full @ full.T, jnp.float32)), np.float64)
  w_rest = np.asarray(solver(0.5, 0)(jnp.asarray(g @ g.T, jnp.float32)), np.float64)
  np.testing.assert_allclose(w_full @ full, 4 / 5 * (w_rest @ g), rtol=2e-5, atol=1e-6)
  zeros = np.asarray(solver(0.5, 1)(jnp.zeros((3, 3), jnp.float32)))
  assert np.all(np.isfinite(zeros))


@pytest.mark.parametrize("case", reference.params([c for c in CASES if c["regime"] not in DEGENERATE + ("scale",)]))
def test_matches_the_official_update_where_slsqp_converged(case):
  """Official coef = K (1/K + lambda w) / (1 + c^2); both references stop within ~4e-4 of the optimum."""
  gram = reference.get(case, "gram")
  for c in (0.4, 0.5):
    coef = case["K"] * np.asarray(solver(c, 1)(jnp.asarray(gram, jnp.float32)), np.float64)
    ref = reference.get(case, f"cagrad_official_c0{int(c * 10)}_coef")
    dw = coef - ref
    assert np.sqrt(dw @ gram @ dw) / np.sqrt(ref @ gram @ ref) <= 1e-3
  torchjd = reference.get(case, "tjd_cagrad_c05_w")
  ours = np.asarray(solver(0.5, 0)(jnp.asarray(gram, jnp.float32)), np.float64)
  dw = ours - torchjd
  assert np.sqrt(dw @ gram @ dw) / np.sqrt(torchjd @ gram @ torchjd) <= 1e-3


def test_golden_mean_at_c0_and_rescale():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  gram = jac @ jac.T
  np.testing.assert_allclose(optax_mtl.weighting.cagrad(gram, c=0.5, rescale=0), [0.7041, 0.5], atol=1e-4)
  np.testing.assert_allclose(optax_mtl.weighting.cagrad(gram, c=0.0, rescale=0), [0.5, 0.5], atol=1e-6)
  w0 = optax_mtl.weighting.cagrad(gram, c=0.5, rescale=0)
  np.testing.assert_allclose(optax_mtl.weighting.cagrad(gram, c=0.5, rescale=1), w0 / 1.25, rtol=1e-6)
  np.testing.assert_allclose(optax_mtl.weighting.cagrad(gram, c=0.5, rescale=2), w0 / 1.5, rtol=1e-6)
  for bad in (3, 1.5, True):  # 1.5 used to pass as int(1.5) = 1, then act as 2
    with pytest.raises(ValueError, match="rescale"):
      optax_mtl.weighting.cagrad(gram, rescale=bad)
    with pytest.raises(ValueError, match="rescale"):
      optax_mtl.cagrad(2, rescale=bad)


def test_worst_task_improvement_beats_the_mean_gradient():
  """CAGrad maximises min_i g_i^T d over the ball around g0: at least as good as g0 itself."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=(4, 10))
  g[1] = -0.8 * g[0] + 0.3 * rng.normal(size=10)
  gram = g @ g.T
  c = 0.5
  w = np.asarray(solver(c, 0)(jnp.asarray(gram, jnp.float32)), np.float64)
  d = w @ g
  g0 = g.mean(0)
  assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)
  assert np.min(g @ d) >= np.min(g @ g0) - 1e-5


def test_transform_reduction_and_heads():
  params = problems.init_params()
  _, jac = problems.per_task_gradients(params, *problems.make_batch())
  total = optax_mtl.cagrad(3, shared=problems.is_shared)
  mean = optax_mtl.cagrad(3, shared=problems.is_shared, reduction="mean")
  u_sum, s_sum = total.update(jac, total.init(params), params)
  _, s_mean = mean.update(jac, mean.init(params), params)
  np.testing.assert_allclose(s_sum.weights, 3 * s_mean.weights, rtol=1e-5)
  np.testing.assert_allclose(u_sum["heads"]["task0"], jac["heads"]["task0"][0], rtol=1e-6)


def test_two_tasks_closed_form_is_the_barrier_optimum():
  """K = 2 uses the closed form; the general solver on the same problem agrees."""
  rng = np.random.default_rng(1)
  pair, general = jax.jit(cagrad_lib._solve_pair), jax.jit(cagrad_lib._solve)
  scaled = jax.jit(cagrad_lib._scaled, static_argnums=1)
  for i in range(60):
    g = rng.normal(size=(2, 5))
    if i % 3 == 0:  # nearly opposite: the optimum near or at the kink
      g[1] = -rng.uniform(0.1, 3) * g[0] + 1e-3 * (i % 2) * rng.normal(size=5)
    if i % 5 == 0:
      g *= np.array([[1e-3], [1e3]])
    p = scaled(jnp.asarray(g @ g.T, jnp.float32), 0.5)
    objective_of = lambda y: float(p.linear @ y + p.radius * jnp.sqrt(jnp.maximum(y @ p.cosines @ y, 0.0)))
    closed, barrier = objective_of(pair(p)), objective_of(general(p))
    assert closed <= barrier + 1e-5 * max(abs(barrier), 1e-12)
    assert abs(float(p.equality @ pair(p)) - 1) <= 1e-6
