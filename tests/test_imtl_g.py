"""IMTL-G (optax_mtl._src.imtl_g)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems
import reference

CASES = reference.cases()
imtl_g = jax.jit(optax_mtl.weighting.imtl_g)
# Ill-conditioned or Pareto-stationary: the float64 references are themselves least-squares artefacts.
SKIP = {"case04", "case24", "case32", "case33", "case34", "case35", "case36"}


@pytest.mark.parametrize("case", reference.params([c for c in CASES if c["prefix"] not in SKIP]))
def test_matches_torchjd_and_the_official_closed_form(case):
  gram = reference.get(case, "gram")
  w = np.asarray(imtl_g(jnp.asarray(gram, jnp.float32)), np.float64)
  # A float32 solve's forward error grows like cond(M) eps: where M is nonsingular in float32
  # the bound is that, at least 2e-5 (the collinear K = 10 case, cond 729, read 2.1e-5 on an
  # AVX-512 CPU and under 2e-5 on the earlier machines); rank-deficient Grams keep 2e-5.
  eigenvalues = np.linalg.eigvalsh(gram)
  nonsingular = eigenvalues[0] > 1e-6 * eigenvalues[-1]
  rtol = max(2e-5, np.finfo(np.float32).eps * eigenvalues[-1] / eigenvalues[0]) if nonsingular else 2e-5
  for key in ("tjd_imtlg_w", "imtlg_official_w"):
    ref = reference.get(case, key)
    if not np.all(np.isfinite(ref)):  # the official code returns NaN on a zero row
      continue
    dw = w - ref
    assert np.sqrt(max(dw @ gram @ dw, 0)) <= rtol * max(np.sqrt(max(ref @ gram @ ref, 0)), 1e-12)
  if np.all(np.isfinite(w)) and abs(w.sum()) > 0:
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("case", reference.params(CASES))
def test_equal_projections_on_unit_gradients(case):
  """On every fixture, the skipped ones included: ``u_i^T d`` equal across tasks, relative to ``||d||``."""
  gram = reference.get(case, "gram")
  w = np.asarray(imtl_g(jnp.asarray(gram, jnp.float32)), np.float64)
  norms = np.sqrt(np.diag(gram))
  projections = (gram @ w)[norms > 0] / norms[norms > 0]  # u_i^T d
  d_norm = np.sqrt(max(w @ gram @ w, 0.0))
  assert np.ptp(projections) <= 1e-3 * d_norm, (projections, d_norm)


def test_golden_zero_rows_and_pareto():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  np.testing.assert_allclose(optax_mtl.weighting.imtl_g(jac @ jac.T), [0.5923, 0.4077], atol=1e-4)
  g = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
  w = np.asarray(optax_mtl.weighting.imtl_g(jnp.asarray(g @ g.T, jnp.float32)))
  assert w[2] == 0 and np.all(np.isfinite(w))
  opposite = np.array([[1.0, 0.0], [-4.0, 0.0]])
  np.testing.assert_array_equal(optax_mtl.weighting.imtl_g(jnp.asarray(opposite @ opposite.T, jnp.float32)), 0.0)
  # Pareto-stationary fixtures: equal projections only for d = 0 (as the official run's d = 0 in case 35).
  for case in CASES:
    if case["regime"] == "pareto":
      w = imtl_g(jnp.asarray(reference.get(case, "gram"), jnp.float32))
      np.testing.assert_array_equal(w, 0.0)


def test_transform():
  params = problems.init_params()
  _, jac = problems.per_task_gradients(params, *problems.make_batch())
  tx = optax_mtl.imtl_g(3, shared=problems.is_shared)
  updates, state = tx.update(jac, tx.init(params), params)
  np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(updates["heads"]["task1"], state.weights[1] * jac["heads"]["task1"][1], rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5, 10])
def test_highly_aligned_tasks_get_equal_projections_not_zero_weights(k):
  # Cosines of about 0.9999: the pseudo-inverse drops the cosine matrix's tiny
  # eigenvalues and C y misses 1 by a uniform 1e-3, which read as "no solution"
  # and gave zero weights in 4, 39 and 65 of 100 such draws for K = 3, 5, 10.
  rng = np.random.default_rng(k)
  for _ in range(20):
    jac = (rng.normal(size=200) + 0.01 * rng.normal(size=(k, 200))).astype(np.float32)
    w = np.asarray(optax_mtl.weighting.imtl_g(jnp.asarray(jac @ jac.T)), np.float64)
    assert abs(w.sum() - 1) < 1e-5
    d = w @ jac.astype(np.float64)
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    projections = units @ d
    assert np.ptp(projections) <= 2e-3 * projections.mean()
    g = jac.astype(np.float64)
    exact = np.linalg.solve(g @ g.T / np.outer(*(2 * [np.linalg.norm(g, axis=1)])), np.ones(k))
    exact_d = (exact / np.linalg.norm(g, axis=1)) @ g
    assert d @ exact_d / np.linalg.norm(d) / np.linalg.norm(exact_d) > 1 - 1e-4
