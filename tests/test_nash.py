"""Nash-MTL (optax_mtl._src.nash): fixtures, oracles, degenerate inputs, the transform."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
import problems
import reference
from optax_mtl._src import nash as nash_lib

CASES = reference.cases()
SOLVABLE = [c for c in CASES if np.all(np.isfinite(reference.get(c, "nash_exact_alpha_raw")))]
NO_SOLUTION = [c for c in CASES if c not in SOLVABLE]
# The official CCP converged (relative residual < 1e-3) on these.
OFFICIAL_CONVERGED = [c for c in CASES if reference.get(c, "nash_official_relres_raw") < 1e-3]
nash = jax.jit(optax_mtl.weighting.nash)
SOLVERS = {name: jax.jit(functools.partial(nash_lib.nash_solve, solver=name)) for name in ("newton", "ccp", "jaxopt")}


@functools.lru_cache(maxsize=None)
def solve(prefix, solver="newton"):
  case = next(c for c in CASES if c["prefix"] == prefix)
  gram = jnp.asarray(reference.get(case, "gram"), jnp.float32)
  weights, _, info = SOLVERS[solver](gram)
  return np.asarray(weights, np.float64), info


def residual64(case, a):
  """max_i |a_i (M a)_i - 1| with the float64 reference Gram."""
  gram = reference.get(case, "gram")
  return np.max(np.abs(a * (gram @ a) - 1.0))


@pytest.mark.parametrize("case", reference.params(SOLVABLE))
def test_exact_solution_on_every_solvable_fixture(case):
  a, info = solve(case["prefix"])
  assert residual64(case, a) <= 1e-4
  assert bool(info.solvable) and float(info.residual) <= 1e-4
  exact = reference.get(case, "nash_exact_alpha_raw")
  np.testing.assert_allclose(a, exact, rtol=1e-4)


@pytest.mark.parametrize("case", reference.params(OFFICIAL_CONVERGED))
@pytest.mark.parametrize("solver", ["newton", "ccp"])
def test_matches_the_official_weights_where_the_official_ccp_converged(case, solver):
  a, _ = solve(case["prefix"], solver)
  official = reference.get(case, "nash_official_alpha")
  # Measured: newton <= 5.7e-6, ccp <= 9.0e-6; the official
  # run itself is accurate to its relative residual (<= 9e-7 here).
  np.testing.assert_allclose(a, official, rtol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", reference.params(SOLVABLE[::10]))
def test_jaxopt_cross_check(case):
  a, info = solve(case["prefix"], "jaxopt")
  assert bool(info.solvable)
  np.testing.assert_allclose(a, reference.get(case, "nash_exact_alpha_raw"), rtol=2e-3)


@pytest.mark.parametrize("case", reference.params([c for c in OFFICIAL_CONVERGED if reference.has(c, "G")]))
def test_transform_reproduces_the_official_clipped_directions(case):
  g = reference.get(case, "G").astype(np.float32)
  params = {"p": jnp.zeros(g.shape[1])}
  tx = optax_mtl.nash_mtl(case["K"])
  updates, state = jax.jit(tx.update)({"p": jnp.asarray(g)}, tx.init(params), params)
  official = reference.get(case, "nash_official_dir")
  np.testing.assert_allclose(updates["p"], official, rtol=1e-4, atol=1e-5 * np.linalg.norm(official))
  np.testing.assert_allclose(state.weights, reference.get(case, "nash_official_alpha"), rtol=5e-5)
  # TorchJD rescales to exactly max_norm instead of dividing by norm + 1e-6.
  tjd = reference.get(case, "tjd_nashmtl_w") @ reference.get(case, "G")
  np.testing.assert_allclose(updates["p"], tjd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", reference.params(SOLVABLE))
def test_oracles(case):
  """a_i (M a)_i = 1, so ||J^T a||^2 = K and g_i^T d = 1/a_i > 0."""
  a, _ = solve(case["prefix"])
  gram = reference.get(case, "gram")
  k = case["K"]
  np.testing.assert_allclose(a @ gram @ a, k, rtol=1e-4)
  progress = gram @ a  # g_i^T d
  assert np.all(progress > 0)
  np.testing.assert_allclose(progress, 1.0 / a, rtol=1e-4)


def test_golden_direction():
  """METHODS.md golden value: J = [[-4, 1, 1], [6, 1, 1]], max_norm 1 -> d = [0.0542, 0.7061, 0.7061]."""
  params = {"p": jnp.zeros(3)}
  tx = optax_mtl.nash_mtl(2)
  updates, _ = tx.update({"p": jnp.array([[-4.0, 1, 1], [6, 1, 1]])}, tx.init(params), params)
  np.testing.assert_allclose(updates["p"], [0.0542, 0.7061, 0.7061], atol=5e-5)


def test_permutation_equivariance():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(6, 20))
  gram = jnp.asarray(g @ g.T, jnp.float32)
  perm = rng.permutation(6)
  a = nash(gram)
  a_perm = nash(gram[perm][:, perm])
  np.testing.assert_allclose(a_perm, a[perm], rtol=1e-5)


def test_scale_invariance_of_the_direction():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(4, 30))
  scales = np.array([1e-4, 1.0, 30.0, 1e5])
  d = lambda j: np.asarray(nash(jnp.asarray(j @ j.T, jnp.float32)), np.float64) @ j
  np.testing.assert_allclose(d(g * scales[:, None]), d(g), rtol=2e-4, atol=1e-5)


def test_vmap_and_jit():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(5, 3, 12))
  grams = jnp.asarray(np.einsum("bkd,bld->bkl", g, g), jnp.float32)
  batched = jax.vmap(optax_mtl.weighting.nash)(grams)
  for i in range(5):
    np.testing.assert_allclose(batched[i], optax_mtl.weighting.nash(grams[i]), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(optax_mtl.weighting.nash)(grams[0]), optax_mtl.weighting.nash(grams[0]), rtol=1e-6)


DEGENERATE = [(c, "newton") for c in NO_SOLUTION] + [
    (c, solver) for c in NO_SOLUTION[::4] for solver in ("ccp", "jaxopt")]


@pytest.mark.parametrize("case, solver", DEGENERATE, ids=lambda x: x if isinstance(x, str) else reference.case_id(x))
def test_degenerate_fixtures_are_finite_and_increase_no_task(case, solver):
  a, info = solve(case["prefix"], solver)
  gram = reference.get(case, "gram")
  assert np.all(np.isfinite(a)) and np.all(a >= 0)
  # First-order change of every task along d = J^T a is >= 0.
  assert np.all(gram @ a >= -1e-5 * np.sqrt(np.diag(gram)) * np.linalg.norm(a * np.sqrt(np.diag(gram))))
  if case["regime"] == "zero_task":
    zero = int(case["info"]["zero_task"])
    assert a[zero] == 0.0 and bool(info.solvable)
    rest = np.arange(case["K"]) != zero
    reduced = gram[np.ix_(rest, rest)]
    np.testing.assert_allclose(a[rest] * (reduced @ a[rest]), 1.0, atol=1e-4)
  else:  # Pareto-stationary: no positive solution, zero update.
    assert not bool(info.solvable)
    np.testing.assert_array_equal(a, 0.0)


def test_single_task_and_all_zero():
  g = jnp.array([[3.0, 4.0]])
  np.testing.assert_allclose(nash(g @ g.T), [0.2], rtol=1e-6)  # d = g / ||g||
  np.testing.assert_array_equal(nash(jnp.zeros((3, 3))), np.zeros(3))


@pytest.mark.parametrize("scale", [1e-10, 1e-5, 1e3, 1e10])
def test_extreme_scales(scale):
  rng = np.random.default_rng(3)
  g = rng.normal(size=(3, 16)) * scale
  gram = jnp.asarray(g @ g.T, jnp.float32)
  a, info = jax.jit(nash_lib.nash_solve)(gram)[::2]
  a = np.asarray(a, np.float64)
  assert np.all(np.isfinite(a)) and bool(info.solvable)
  np.testing.assert_allclose(a * ((g @ g.T) @ a), 1.0, atol=1e-4)


def test_near_pareto_stationary_is_solved_or_zero_never_nan():
  """g_2 -> -g_1: the solution grows like 1/eps until float32 cannot resolve it (then zero)."""
  verdicts = []
  for eps in [1e-1, 1e-2, 1e-3, 1e-5, 1e-7, 0.0]:
    g = np.array([[1.0, 0.0], [-1.0, eps]])
    a, info = jax.jit(nash_lib.nash_solve)(jnp.asarray(g @ g.T, jnp.float32))[::2]
    a = np.asarray(a, np.float64)
    assert np.all(np.isfinite(a))
    verdicts.append(bool(info.solvable))
    if verdicts[-1]:
      # The float32 Gram knows 1 + cos(g_1, g_2) ~ eps^2 / 2 only to ~1e-7 / eps^2.
      assert float(info.residual) <= 1e-3 and np.all((g @ g.T) @ a > 0)
    else:
      np.testing.assert_array_equal(a, 0.0)
  # Solvable far from stationarity, not at it, and never solvable again once lost.
  assert verdicts[0] and not verdicts[-1]
  assert verdicts == sorted(verdicts, reverse=True)


def test_solver_validation():
  with pytest.raises(ValueError, match="solver"):
    optax_mtl.weighting.nash(jnp.eye(2), solver="cvxpy")
  with pytest.raises(ValueError, match="solver"):
    optax_mtl.nash_mtl(2, solver="ecos")
  with pytest.raises(ValueError, match="task_specific"):
    optax_mtl.nash_mtl(2, task_specific="none")
  with pytest.raises(ValueError, match="regularization"):
    optax_mtl.weighting.nash(jnp.eye(2), regularization=-1e-6)
  with pytest.raises(ValueError, match="regularization"):
    optax_mtl.nash_mtl(2, regularization=-1.0)


# Grams of a digits training run in which the parity task's gradient vanishes (its norm falls from
# 0.2 to 1e-10), every 25th step from 400 to 1000: see tests/data/build_nash_vanishing.py.
VANISHING = np.load(pathlib.Path(__file__).parent / "data" / "nash_vanishing.npz")
RHO = 1e-6
nash_ridge = jax.jit(functools.partial(optax_mtl.weighting.nash, regularization=RHO))


def vanishing_factors():
  """``F`` with ``F F^T`` the recorded Gram, row ``i`` of norm ``n_i`` (a tiny row stays exact in float32)."""
  factors = []
  for gram in VANISHING["grams"].astype(np.float64):
    norms = np.sqrt(np.diag(gram))
    values, vectors = np.linalg.eigh(gram / np.outer(norms, norms))
    factors.append(norms[:, None] * vectors * np.sqrt(np.maximum(values, 0.0)))
  return np.asarray(factors, np.float32)


def test_vanishing_gradient_runs_away_and_regularization_bounds_it():
  """Exact: ``a_i ~ 1/||g_i||`` past 1e9; with the ridge ``||a|| <= sqrt(K / (rho tr M))`` (here < 1e3)."""
  grams = VANISHING["grams"]
  exact = np.asarray(jax.vmap(nash)(jnp.asarray(grams)), np.float64)
  # The run's own (warm-started) weights are the exact solution.
  np.testing.assert_allclose(exact, VANISHING["weights"], rtol=1e-5)
  assert exact.max() > 1e9 and exact.max() / np.median(exact) > 1e8
  ridged = np.asarray(jax.vmap(nash_ridge)(jnp.asarray(grams)), np.float64)
  gram64 = grams.astype(np.float64)
  trace = np.trace(gram64, axis1=1, axis2=2)
  assert np.all(np.linalg.norm(ridged, axis=1) <= np.sqrt(5 / (RHO * trace)) * (1 + 1e-5))
  assert ridged.max() < 1e3 and np.all(ridged > 0)
  # It solves the regularised system, and where every gradient norm^2 >> rho tr(M) (the first
  # recorded step: parity at 0.2, tr(M) = 31) the weights barely move.
  regularised = gram64 + RHO * trace[:, None, None] * np.eye(5)
  np.testing.assert_allclose(ridged * np.einsum("tij,tj->ti", regularised, ridged), 1.0, atol=1e-4)
  np.testing.assert_allclose(ridged[0], exact[0], rtol=1e-3)
  # A vanished task's share of the update goes to 0 instead of staying O(1): ||a_i g_i|| = a_i n_i.
  norms = np.sqrt(np.einsum("tii->ti", gram64))
  assert np.max(ridged[-5:, 1] * norms[-5:, 1]) < 1e-5 < np.min(exact[-5:, 1] * norms[-5:, 1])


def test_regularization_in_the_transform_along_the_recorded_run():
  """Stepping the transform (warm starts) through the run: exact state weights past 1e9, ridged below 1e3."""
  params = {"p": jnp.zeros(5)}
  runs = {}
  for name, tx in (("exact", optax_mtl.nash_mtl(5)), ("ridge", optax_mtl.nash_mtl(5, regularization=RHO))):
    update = jax.jit(tx.update)
    state, weights = tx.init(params), []
    for factor in vanishing_factors():
      updates, state = update({"p": jnp.asarray(factor)}, state, params)
      weights.append(np.asarray(state.weights))
      assert np.isfinite(float(optax.tree.norm(updates))) and float(optax.tree.norm(updates)) <= 1.0 + 1e-5
    runs[name] = np.asarray(weights, np.float64)
  assert runs["exact"].max() > 1e9
  assert runs["ridge"].max() < 1e3
  np.testing.assert_allclose(runs["ridge"], np.asarray(jax.vmap(nash_ridge)(jnp.asarray(VANISHING["grams"]))),
                             rtol=2e-3)


def test_regularization_keeps_zero_gradients_at_zero_and_solves_pareto_stationary_input():
  g = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  a = np.asarray(nash_ridge(jnp.asarray(g @ g.T, jnp.float32)))
  assert a[1] == 0.0 and np.all(a[[0, 2]] > 0)
  # g_2 = -g_1: no exact solution (zero weights); the ridge has one, whose update is zero.
  g = np.array([[1.0, 2.0], [-1.0, -2.0]])
  a = np.asarray(jax.jit(functools.partial(optax_mtl.weighting.nash, regularization=1e-2))(
      jnp.asarray(g @ g.T, jnp.float32)))
  assert np.all(a > 0) and np.all(np.abs(a @ g) < 1e-5)
  np.testing.assert_array_equal(nash(jnp.asarray(g @ g.T, jnp.float32)), 0.0)


@pytest.mark.parametrize("solver", ["ccp", pytest.param("jaxopt", marks=pytest.mark.slow)])
def test_regularization_with_the_other_solvers(solver):
  gram = jnp.asarray(VANISHING["grams"][0])
  expected = nash_ridge(gram)
  a = jax.jit(functools.partial(optax_mtl.weighting.nash, regularization=RHO, solver=solver))(gram)
  np.testing.assert_allclose(a, expected, rtol=2e-3)


def setup():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  return params, jac, losses


def test_transform_state_carries_weights_warm_start_and_diagnostics():
  params, jac, losses = setup()
  tx = optax_mtl.nash_mtl(problems.NUM_TASKS, shared=problems.is_shared)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  gram = optax_mtl.gram(jac, mask={"trunk": True, "heads": False})
  a = nash(gram)
  np.testing.assert_allclose(state.weights, a, rtol=1e-5)
  info = state.weighting_state.info
  assert bool(info.solvable) and float(info.residual) <= 1e-5 and int(info.iterations) >= 1
  cos = np.asarray(gram) / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
  np.testing.assert_allclose(info.min_cosine, np.min(cos[~np.eye(3, dtype=bool)]), rtol=1e-5)
  np.testing.assert_allclose(state.weighting_state.scaled, a * np.sqrt(np.diag(gram)), rtol=1e-5)
  # Shared update clipped to norm 1; heads a-weighted and unclipped.
  assert abs(float(optax.tree.norm(updates["trunk"])) - 1.0) < 1e-5
  np.testing.assert_allclose(updates["heads"]["task2"], a[2] * jac["heads"]["task2"][2], rtol=1e-5)


def test_max_norm_and_task_specific_options():
  params, jac, _ = setup()
  k = problems.NUM_TASKS
  tx = optax_mtl.nash_mtl(k, max_norm=0.0, shared=problems.is_shared, task_specific="unweighted")
  updates, state = tx.update(jac, tx.init(params), params)
  # Unclipped: ||J_shared^T a||^2 = K.
  np.testing.assert_allclose(float(optax.tree.norm(updates["trunk"])) ** 2, k, rtol=1e-4)
  np.testing.assert_allclose(updates["heads"]["task1"], jac["heads"]["task1"][1], rtol=1e-6)


def test_update_weights_every_with_lazy_gradients():
  params, _, _ = setup()
  tx = optax.chain(optax_mtl.nash_mtl(problems.NUM_TASKS, update_weights_every=4), optax.sgd(0.1))

  @jax.jit
  def step(params, state, x, y):
    grads = optax_mtl.task_gradients(problems.task_losses)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  history = []
  for t in range(5):
    params, state = step(params, state, *problems.make_batch(seed=t))
    history.append(np.asarray(state[0].weights))
  np.testing.assert_array_equal(history[1], history[0])
  np.testing.assert_array_equal(history[3], history[0])
  assert not np.allclose(history[4], history[0])
  assert step._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["ccp", "jaxopt"])
def test_alternative_solvers_in_the_transform(solver):
  params, jac, _ = setup()
  tx = optax_mtl.nash_mtl(problems.NUM_TASKS, solver=solver)
  reference_tx = optax_mtl.nash_mtl(problems.NUM_TASKS)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  expected, expected_state = reference_tx.update(jac, reference_tx.init(params), params)
  np.testing.assert_allclose(state.weights, expected_state.weights, rtol=2e-3)
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(u, e, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(e))))
  assert bool(state.weighting_state.info.solvable)


def test_zero_initialised_heads_still_train():
  """Zero heads make every shared gradient zero, so a = 0; the heads keep their plain gradients."""
  params = problems.init_params()
  params = dict(params, heads=jax.tree.map(jnp.zeros_like, params["heads"]))
  x, y = problems.make_batch()
  tx = optax.chain(optax_mtl.nash_mtl(problems.NUM_TASKS, shared=problems.is_shared), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
    updates, state = tx.update(jac, state, params, task_losses=losses)
    return optax.apply_updates(params, updates), state, losses

  params, state, first = step(params, state)
  np.testing.assert_array_equal(state[0].weights, 0.0)
  assert all(float(jnp.abs(h).max()) > 0 for h in jax.tree.leaves(params["heads"]))
  for _ in range(30):
    params, state, losses = step(params, state)
  assert float(jnp.sum(losses)) < 0.9 * float(jnp.sum(first))
  assert np.all(np.asarray(state[0].weights) > 0)
