"""MGDA / MGDA-UB (optax_mtl._src.mgda): exact solver, official solvers, transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
import problems
import reference
from optax_mtl._src import mgda as mgda_lib

CASES = reference.cases()
exact = jax.jit(mgda_lib.mgda_solve)


@functools.lru_cache(maxsize=None)
def official_solver(normalization, solver):
  """Jitted solver; ``max_iter`` (official solvers) is traced so one compilation serves every cap."""
  return jax.jit(lambda gram, max_iter: mgda_lib.mgda_solve(
      gram, normalization=normalization, solver=solver, max_iter=max_iter))


def direction_error(gram, w, w_ref):
  """``||J^T (w - w_ref)||``: weights are not unique when gradients are affinely dependent."""
  dw = np.asarray(w, np.float64) - w_ref
  return np.sqrt(max(dw @ gram @ dw, 0.0))


@pytest.mark.parametrize("case", reference.params(CASES))
def test_exact_min_norm_point_on_every_fixture(case):
  gram = reference.get(case, "gram")
  w, info = exact(jnp.asarray(gram, jnp.float32))
  w = np.asarray(w, np.float64)
  scale = np.max(np.diag(gram))
  cost = w @ gram @ w
  # The criterion: cost within 1e-5 of max_i ||g_i||^2 of the exact reference.
  assert abs(cost - float(reference.get(case, "mgda_exact_cost"))) <= 1e-5 * scale
  # Feasible and KKT: (M w)_i >= w^T M w, with complementarity w_i ((M w)_i - w^T M w) = 0.
  assert np.all(w >= 0) and abs(w.sum() - 1.0) <= 1e-6
  progress = gram @ w
  assert np.all(progress >= cost - 1e-5 * scale)
  assert np.all(np.abs(w * (progress - cost)) <= 1e-6 * scale)
  assert float(info.kkt_residual) <= 1e-5
  assert direction_error(gram, w, reference.get(case, "mgda_exact_w")) <= 1e-3 * np.sqrt(scale)


OFFICIAL = [
    (case, source, norm)
    for case in CASES
    for source in ("official_pgd", "official_fw", "nashmtl_pgd")
    for norm in ("none", "l2")
    if case["methods"][f"mgda_{source}_{norm}"]["status"] == "ok"
    and np.all(np.isfinite(reference.get(case, f"mgda_{source}_{norm}_w")))
]


@pytest.mark.parametrize(
    "case, source, norm", OFFICIAL,
    ids=[f"{reference.case_id(c)}-{s}-{n}" for c, s, n in OFFICIAL])
def test_official_solvers_reproduce_the_official_runs_in_float64(case, source, norm):
  """Same algorithm, same float64 arithmetic: same directions, costs and iteration counts."""
  key = f"mgda_{source}_{norm}"
  iters = int(reference.get(case, f"{key}_iters"))
  solver = "fw" if "fw" in source else "pgd"
  with jax.enable_x64(True):
    gram = jnp.asarray(reference.get(case, "gram"), jnp.float64)
    w, info = official_solver(norm, solver)(gram, max(250, iters + 1))
    w = np.asarray(w)
  gram = reference.get(case, "gram")
  normalizers = np.sqrt(np.diag(gram)) if norm == "l2" else np.ones(case["K"])
  normalized = gram / np.outer(normalizers, normalizers)
  assert direction_error(normalized, w, reference.get(case, f"{key}_w")) <= 1e-9 * np.sqrt(np.max(np.diag(normalized)))
  np.testing.assert_allclose(float(info.cost), float(reference.get(case, f"{key}_cost")), rtol=1e-9,
                             atol=1e-12 * np.max(np.diag(normalized)))
  # Ties between duplicated tasks may be visited in another order; the
  # recorded Frank-Wolfe counts disagree with the returned iterates in 3 cases.
  if case["regime"] != "duplicate" and solver == "pgd":
    assert int(info.iterations) == iters


def test_official_solvers_in_float32_on_well_conditioned_cases():
  for case in CASES:
    if case["regime"] not in ("gaussian", "conflicting") or case["K"] == 11:
      continue
    for source, solver in (("nashmtl_pgd", "pgd"), ("official_fw", "fw")):
      key = f"mgda_{source}_none"
      if int(reference.get(case, f"{key}_iters")) > 250:
        continue
      gram = reference.get(case, "gram")
      w, _ = official_solver("none", solver)(jnp.asarray(gram, jnp.float32), 250)
      assert direction_error(gram, w, reference.get(case, f"{key}_w")) <= 1e-4 * np.sqrt(np.max(np.diag(gram)))


def test_official_iteration_cap_is_enforced():
  case = next(c for c in CASES if int(reference.get(c, "mgda_official_fw_none_iters")) > 10_000)
  gram = jnp.asarray(reference.get(case, "gram"), jnp.float32)
  _, info = mgda_lib.mgda_solve(gram, solver="fw")
  assert int(info.iterations) == 250
  _, info = mgda_lib.mgda_solve(gram, solver="fw", max_iter=7)
  assert int(info.iterations) == 7


def test_two_point_boundary_rule():
  """With norms 1e-3 and 1e3 the official pair rule returns 0.999 / 0.001, the exact solver 1 / 0."""
  g = np.array([[1e-3, 0.0], [1e3, 1.0]])  # <g_1, g_2> >= ||g_1||^2: the optimum is the vertex g_1
  gram = jnp.asarray(g @ g.T, jnp.float32)
  np.testing.assert_allclose(mgda_lib.mgda(gram, solver="pgd"), [0.999, 0.001], atol=1e-7)
  np.testing.assert_allclose(mgda_lib.mgda(gram, solver="fw"), [0.999, 0.001], atol=1e-7)
  np.testing.assert_allclose(mgda_lib.mgda(gram), [1.0, 0.0], atol=1e-6)


def test_golden_values_and_closed_form():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  w = optax_mtl.weighting.mgda(jac @ jac.T)
  np.testing.assert_allclose(w, [0.6, 0.4], rtol=1e-6)
  np.testing.assert_allclose(w @ jac, [0.0, 1.0, 1.0], atol=1e-6)
  # K = 2 closed form agrees with the QP on random pairs.
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = rng.normal(size=(2, 7))
    gram = jnp.asarray(g @ g.T, jnp.float32)
    qp = optax_mtl.weighting.mgda(jnp.pad(gram, ((0, 1), (0, 1)), constant_values=0.0) + jnp.diag(jnp.array([0, 0, 1e6])))
    np.testing.assert_allclose(optax_mtl.weighting.mgda(gram), qp[:2], atol=1e-5)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_normalizations(normalization):
  rng = np.random.default_rng(1)
  g = rng.normal(size=(4, 9)) * np.array([[0.1], [1.0], [10.0], [3.0]])
  losses = np.array([0.5, 2.0, 1.0, 4.0])
  gram = jnp.asarray(g @ g.T, jnp.float32)
  w = mgda_lib.mgda(gram, normalization=normalization, task_losses=jnp.asarray(losses, jnp.float32))
  c = {"none": np.ones(4), "l2": np.linalg.norm(g, axis=1), "loss": losses,
       "loss+": losses * np.linalg.norm(g, axis=1)}[normalization]
  normalized = (g / c[:, None]) @ (g / c[:, None]).T
  expected = mgda_lib.mgda(jnp.asarray(normalized, jnp.float32))
  np.testing.assert_allclose(w, expected, atol=2e-5)
  if normalization.startswith("loss"):
    with pytest.raises(ValueError, match="needs task_losses"):
      mgda_lib.mgda(gram, normalization=normalization)


@pytest.mark.slow
def test_permutation_equivariance_and_vmap():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(6, 5))  # K > d: the min-norm point has a sparse support
  gram = jnp.asarray(g @ g.T, jnp.float32)
  perm = rng.permutation(6)
  mgda = jax.jit(optax_mtl.weighting.mgda)
  w = mgda(gram)
  w_perm = mgda(gram[perm][:, perm])
  assert direction_error(g @ g.T, np.asarray(w_perm)[np.argsort(perm)], np.asarray(w)) <= 1e-5
  batched = jax.vmap(optax_mtl.weighting.mgda)(jnp.stack([gram, 2 * gram]))
  np.testing.assert_allclose(batched[1], w, atol=1e-5)


@pytest.mark.parametrize("solver", ["exact", "pgd", "fw"])
def test_degenerate_inputs_are_finite(solver):
  rng = np.random.default_rng(3)
  g = rng.normal(size=(4, 6))
  families = {
      "zero row": np.vstack([g[:3], np.zeros((1, 6))]),
      "all zero": np.zeros((4, 6)),
      "opposite": np.vstack([g[:1], -g[:1]]),
      "duplicate": np.vstack([g[:2], g[:2]]),
      "single": g[:1],
      "huge": g * 1e15,
      "tiny": g * 1e-10,
  }
  for name, j in families.items():
    for norm in ("none", "l2"):
      w, info = official_solver(norm, solver)(jnp.asarray(j @ j.T, jnp.float32), 250)
      w = np.asarray(w)
      assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-5, (name, norm)
      if name in ("zero row", "all zero", "opposite"):
        assert float(info.cost) <= 1e-6 * max(1.0, float(np.max(np.diag(j @ j.T)))), (name, norm)


def setup():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  return params, jac, losses


def test_transform_weights_sum_and_state():
  params, jac, losses = setup()
  k = problems.NUM_TASKS
  one = optax_mtl.mgda(k, shared=problems.is_shared)
  many = optax_mtl.mgda(k, shared=problems.is_shared, weights_sum="num_tasks")
  u1, s1 = jax.jit(one.update)(jac, one.init(params), params)
  uk, sk = jax.jit(many.update)(jac, many.init(params), params)
  np.testing.assert_allclose(float(jnp.sum(s1.weights)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sk.weights, k * s1.weights, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(uk), jax.tree.leaves(u1)):
    np.testing.assert_allclose(a, k * b, rtol=1e-5, atol=1e-7)
  gram = optax_mtl.gram(jac, mask={"trunk": True, "heads": False})
  np.testing.assert_allclose(float(s1.weighting_state.cost), float(s1.weights @ gram @ s1.weights), rtol=1e-4)
  # Every task decreases to first order: g_i^T d >= ||d||^2 on the shared part.
  d = optax_mtl.combine(s1.weights, {"trunk": jac["trunk"]})
  progress = jax.vmap(lambda i: sum(jnp.vdot(jac["trunk"][n][i], d["trunk"][n]) for n in d["trunk"]))(jnp.arange(k))
  assert np.all(np.asarray(progress) >= float(s1.weighting_state.cost) * (1 - 1e-4))
  with pytest.raises(ValueError, match="needs the per-task losses"):
    optax_mtl.mgda(k, normalization="loss").update(jac, one.init(params), params)
  with pytest.raises(ValueError, match="weights_sum"):
    optax_mtl.mgda(k, weights_sum="two")


def test_mgda_ub_equals_full_path_with_identity_encoder():
  params = problems.init_params()
  x, y = problems.make_batch()
  identity = lambda p, x, y: p["trunk"]
  heads = lambda p, trunk, x, y: problems.task_losses(dict(p, trunk=trunk), x, y)
  tx = optax_mtl.mgda(problems.NUM_TASKS, shared=problems.is_shared)
  ub, ub_state = tx.update(optax_mtl.feature_task_gradients(identity, heads)(params, x, y), tx.init(params), params)
  losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
  full, full_state = tx.update(jac, tx.init(params), params, task_losses=losses)
  np.testing.assert_allclose(ub_state.weights, full_state.weights, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ub), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mgda_ub_on_a_real_encoder_uses_representation_gradients():
  params = problems.init_params()
  x, y = problems.make_batch()

  def encoder(p, x, y):
    return jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"][None, :])

  def heads(p, z, x, y):
    preds = jnp.stack([z @ p["heads"][f"task{i}"] for i in range(problems.NUM_TASKS)], axis=-1)
    return jnp.mean((preds - y) ** 2, axis=0)

  tx = optax.chain(optax_mtl.mgda(problems.NUM_TASKS), optax.sgd(0.1))
  updates, state = jax.jit(lambda p: tx.update(optax_mtl.feature_task_gradients(encoder, heads)(p, x, y),
                                               tx.init(p), p))(params)
  z = encoder(params, x, y)
  jac_z = jax.jacrev(lambda rep: heads(params, rep, x, y))(z)
  w = optax_mtl.weighting.mgda(optax_mtl.gram({"z": jac_z}))
  np.testing.assert_allclose(state[0].weights, w, atol=1e-5)


@pytest.mark.parametrize("k", [3, 7, 20, 60, 100])
def test_exact_solver_on_random_graded_problems(k):
  """Random Grams with task norms spanning up to 1e6 and K up to 100: Frank-Wolfe gap <= 1e-6."""
  rng = np.random.default_rng(k)
  solve = jax.jit(optax_mtl.weighting.mgda)
  for trial in range(6):
    d = int(rng.integers(max(2, k // 3), 3 * k))
    g = rng.normal(size=(k, d))
    spread = [0.0, 1.0, 3.0][trial % 3]
    g *= np.logspace(-spread, spread, k)[rng.permutation(k), None]
    gram = g @ g.T
    w = np.asarray(solve(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    gap = (w @ gram @ w - np.min(gram @ w)) / np.max(np.diag(gram))
    assert gap <= 1e-6, (trial, spread, gap)
