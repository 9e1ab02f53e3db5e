"""Aligned-MTL / Aligned-MTL-UB (optax_mtl._src.aligned)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems
import reference
from optax_mtl._src import aligned as aligned_lib

CASES = reference.cases()
FLOAT64_EPS = float(np.finfo(np.float64).eps)


@functools.lru_cache(maxsize=None)
def solver(scale_mode="min", eps=aligned_lib.FLOAT32_EPS, mean=False):
  def solve(gram):
    preference = jnp.full(gram.shape[:1], 1.0 / gram.shape[0], gram.dtype) if mean else None
    return aligned_lib.aligned_solve(gram, scale_mode=scale_mode, eps=eps, preference=preference)
  return jax.jit(solve)


def relative_direction_error(gram, w, w_ref):
  """``||J^T (w - w_ref)|| / ||J^T w_ref||`` (absolute, in units of max ||g_i||, when the reference is 0)."""
  dw = np.asarray(w, np.float64) - w_ref
  error = np.sqrt(max(dw @ gram @ dw, 0.0))
  reference_norm = np.sqrt(max(w_ref @ gram @ w_ref, 0.0))
  return error / (reference_norm if reference_norm > 0 else np.sqrt(np.max(np.diag(gram))))


@pytest.mark.parametrize("case", reference.params(CASES))
def test_float32_matches_the_official_float32_threshold_run(case):
  """The official code as trained (float32 eps threshold): directions within 1e-4, same rank."""
  gram = reference.get(case, "gram")
  w, info = solver()(jnp.asarray(gram, jnp.float32))
  assert relative_direction_error(gram, w, reference.get(case, "aligned_official_f32eps_w")) <= 1e-4
  assert int(info.rank) == int(reference.get(case, "aligned_official_f32eps_rank"))


@pytest.mark.parametrize("case", reference.params(CASES))
@pytest.mark.parametrize("mode, field", [("min", "aligned_official_w"), ("median", "aligned_official_median_w"),
                                         ("rmse", "aligned_official_rmse_w")])
def test_float64_matches_the_official_float64_runs(case, mode, field):
  gram = reference.get(case, "gram")
  with jax.enable_x64(True):
    w, info = solver(mode, FLOAT64_EPS)(jnp.asarray(gram, jnp.float64))
  assert relative_direction_error(gram, w, reference.get(case, field)) <= 1e-6
  if mode == "min":
    assert int(info.rank) == int(reference.get(case, "aligned_official_rank"))
    k = case["K"]
    official = reference.get(case, "aligned_official_singulars")[: int(info.rank)]
    # float64 eigh is accurate to ~eps * max(lambda) in absolute terms.
    np.testing.assert_allclose(np.asarray(info.singular_values)[: int(info.rank)] ** 2, official,
                               rtol=1e-9, atol=1e-13 * official[0])
    # TorchJD's AlignedMTL is the official one with mean preference.
    with jax.enable_x64(True):
      w_mean, _ = solver(mode, FLOAT64_EPS, mean=True)(jnp.asarray(gram, jnp.float64))
    assert relative_direction_error(gram, w_mean, reference.get(case, "tjd_alignedmtl_w")) <= 1e-6
    assert relative_direction_error(gram, k * np.asarray(w_mean), reference.get(case, field)) <= 1e-6


def test_golden_values():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  gram = jac @ jac.T
  np.testing.assert_allclose(optax_mtl.weighting.aligned(gram), [1.1181, 0.8165], atol=1e-4)
  np.testing.assert_allclose(optax_mtl.weighting.aligned(gram, preference=jnp.array([0.5, 0.5])),
                             [0.5591, 0.4083], atol=1e-4)


@pytest.mark.parametrize(
    "case", reference.params([c for c in CASES if c["regime"] in ("gaussian", "conflicting", "collinear")]))
def test_aligned_system_has_orthogonal_rows_of_equal_norm(case):
  """B M B = s P: the rows of B J are orthogonal with norm sqrt(s) on the kept subspace."""
  gram = reference.get(case, "gram")
  b, eigenvalues, kept = jax.jit(aligned_lib.balance_matrix)(jnp.asarray(gram, jnp.float32))
  b = np.asarray(b, np.float64)
  s = np.min(np.asarray(eigenvalues)[np.asarray(kept)])
  aligned_gram = b @ gram @ b
  rank = int(np.sum(kept))
  values = np.linalg.eigvalsh(aligned_gram)[::-1]
  np.testing.assert_allclose(values[:rank], s, rtol=1e-3)
  assert np.all(np.abs(values[rank:]) <= 1e-3 * s)
  if rank == case["K"]:
    np.testing.assert_allclose(aligned_gram, s * np.eye(case["K"]), atol=1e-3 * s)


def test_permutation_equivariance():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(5, 12)) * np.array([[0.1], [1.0], [3.0], [10.0], [0.5]])
  gram = jnp.asarray(g @ g.T, jnp.float32)
  perm = rng.permutation(5)
  aligned = jax.jit(optax_mtl.weighting.aligned)
  np.testing.assert_allclose(aligned(gram[perm][:, perm]), aligned(gram)[perm], rtol=1e-4)


def test_scale_modes_and_preference_validation():
  gram = jnp.diag(jnp.array([1.0, 4.0, 9.0, 16.0]))
  sqrt = jnp.sqrt(jnp.diagonal(gram))
  # Orthogonal gradients: B = sqrt(s) diag(1/sqrt(lambda)).
  np.testing.assert_allclose(optax_mtl.weighting.aligned(gram, scale_mode="min"), 1.0 / sqrt, rtol=1e-6)
  np.testing.assert_allclose(optax_mtl.weighting.aligned(gram, scale_mode="median"), 2.0 / sqrt, rtol=1e-6)
  np.testing.assert_allclose(optax_mtl.weighting.aligned(gram, scale_mode="rmse"), np.sqrt(7.5) / sqrt, rtol=1e-6)
  with pytest.raises(ValueError, match="scale_mode"):
    optax_mtl.weighting.aligned(gram, scale_mode="max")
  with pytest.raises(ValueError, match=r"preference must have shape \(4,\)"):
    optax_mtl.weighting.aligned(gram, preference=jnp.ones(3))


def test_degenerate_inputs():
  aligned = jax.jit(aligned_lib.aligned_solve)
  rng = np.random.default_rng(1)
  g = rng.normal(size=(3, 6))
  for name, j in {"all zero": np.zeros((3, 6)), "zero row": np.vstack([g[:2], np.zeros((1, 6))]),
                  "opposite": np.vstack([g[:1], -g[:1]]), "duplicate": np.vstack([g[:2], g[:1]]),
                  "single": g[:1], "huge": g * 1e15, "tiny": g * 1e-10}.items():
    gram = j @ j.T
    w, info = aligned(jnp.asarray(gram, jnp.float32))
    w = np.asarray(w, np.float64)
    assert np.all(np.isfinite(w)), name
    if name == "all zero":
      np.testing.assert_array_equal(w, 0.0)
      assert int(info.rank) == 0 and float(info.condition_number) == 0.0
    else:
      # The aligned update has norm sqrt(s * rank) for ones preference... at most.
      assert int(info.rank) == np.linalg.matrix_rank(j), name


def setup():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  return params, jac, losses


def test_transform_heads_and_diagnostics():
  params, jac, _ = setup()
  k = problems.NUM_TASKS
  tx = optax_mtl.aligned_mtl(k, shared=problems.is_shared)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  gram = np.asarray(optax_mtl.gram(jac, mask={"trunk": True, "heads": False}), np.float64)
  w = optax_mtl.weighting.aligned(jnp.asarray(gram, jnp.float32))
  np.testing.assert_allclose(state.weights, w, rtol=1e-5)
  # Official default: heads get their plain gradients; "weighted" scales them by w.
  np.testing.assert_allclose(updates["heads"]["task1"], jac["heads"]["task1"][1], rtol=1e-6)
  weighted = optax_mtl.aligned_mtl(k, shared=problems.is_shared, task_specific="weighted")
  heads_w, _ = weighted.update(jac, weighted.init(params), params)
  np.testing.assert_allclose(heads_w["heads"]["task1"], w[1] * jac["heads"]["task1"][1], rtol=1e-5)
  info = state.weighting_state
  eig = np.linalg.eigvalsh(gram)[::-1]
  np.testing.assert_allclose(info.singular_values, np.sqrt(eig), rtol=1e-4)
  np.testing.assert_allclose(info.condition_number, np.sqrt(eig[0] / eig[-1]), rtol=1e-4)
  n = np.sqrt(np.diag(gram))
  np.testing.assert_allclose(info.cosines, gram / np.outer(n, n), atol=1e-6)
  np.testing.assert_allclose(info.magnitude_similarity, 2 * np.outer(n, n) / (n[:, None] ** 2 + n[None, :] ** 2),
                             rtol=1e-6)
  assert int(info.rank) == k


def test_aligned_mtl_ub_equals_full_path_with_identity_encoder():
  params = problems.init_params()
  x, y = problems.make_batch()
  identity = lambda p, x, y: p["trunk"]
  heads = lambda p, trunk, x, y: problems.task_losses(dict(p, trunk=trunk), x, y)
  tx = optax_mtl.aligned_mtl(problems.NUM_TASKS, shared=problems.is_shared)
  ub, ub_state = tx.update(optax_mtl.feature_task_gradients(identity, heads)(params, x, y), tx.init(params), params)
  losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
  full, full_state = tx.update(jac, tx.init(params), params, task_losses=losses)
  np.testing.assert_allclose(ub_state.weights, full_state.weights, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(ub), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
