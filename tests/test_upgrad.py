"""UPGrad and DualProj (optax_mtl._src.upgrad)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import optax_mtl
import problems
import reference

CASES = reference.cases()
upgrad = jax.jit(optax_mtl.weighting.upgrad)
dualproj = jax.jit(optax_mtl.weighting.dualproj)
upgrad_tjd = jax.jit(functools.partial(optax_mtl.weighting.upgrad, regularization=1e-4))
dualproj_tjd = jax.jit(functools.partial(optax_mtl.weighting.dualproj, regularization=1e-4))


def direction_error(gram, w, w_ref):
  dw = np.asarray(w, np.float64) - w_ref
  return np.sqrt(max(dw @ gram @ dw, 0.0)) / max(np.sqrt(max(w_ref @ gram @ w_ref, 0.0)),
                                                  np.sqrt(np.max(np.diag(gram))))


@pytest.mark.parametrize("case", reference.params(CASES))
def test_torchjd_variant_matches_torchjd(case):
  gram = reference.get(case, "gram")
  g32 = jnp.asarray(gram, jnp.float32)
  # case04 (K = 11 > d = 8): a rank-8 Gram, conditioned only by TorchJD's ridge (measured 5.5e-6).
  tol = 1e-5 if case["prefix"] == "case04" else 5e-6
  assert direction_error(gram, upgrad_tjd(g32), reference.get(case, "tjd_upgrad_w")) <= tol
  assert direction_error(gram, dualproj_tjd(g32), reference.get(case, "tjd_dualproj_w")) <= tol


@pytest.mark.parametrize("case", reference.params(CASES))
def test_exact_projections_are_non_conflicting(case):
  """M w >= 0 (J d >= 0), up to float32 rounding relative to the size of the weights."""
  gram = reference.get(case, "gram")
  norms = np.sqrt(np.diag(gram))
  for solve in (upgrad, dualproj):
    w = np.asarray(solve(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(np.isfinite(w))
    bound = norms * (np.abs(w) @ norms) + 1e-30
    assert np.all(gram @ w >= -1e-5 * bound)


def nnls_projection(gram, u):
  """``argmin_{v >= u} v^T M v`` in float64: SciPy's NNLS on a square root of ``M`` (the reference)."""
  eigenvalues, vectors = np.linalg.eigh(gram)
  root = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T  # root^T root = M
  z, _ = scipy.optimize.nnls(root, -root @ u, maxiter=10_000)
  return u + z


@pytest.mark.parametrize("case", reference.params(CASES))
def test_exact_projections_match_a_float64_reference(case):
  """``d = J^T w`` against float64 NNLS, relative to the gradients' size ``sum_i |w_i| ||g_i||``.

  Every fixture, the Pareto-stationary ones included (measured at most 1.6e-6, K = 11 > d); ``d``
  is unique where ``w`` is not (duplicated or opposite tasks).
  """
  gram = reference.get(case, "gram")
  k = gram.shape[0]
  norms = np.sqrt(np.diag(gram))
  g32 = jnp.asarray(gram, jnp.float32)
  upgrad_reference = sum(nnls_projection(gram, np.eye(k)[i] / k) for i in range(k))
  dualproj_reference = nnls_projection(gram, np.full(k, 1.0 / k))
  for solve, expected in ((upgrad, upgrad_reference), (dualproj, dualproj_reference)):
    dw = np.asarray(solve(g32), np.float64) - expected
    assert np.sqrt(max(dw @ gram @ dw, 0.0)) <= 5e-6 * (np.abs(expected) @ norms)


def test_golden_values_and_pcgrad_equivalence():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  gram = jac @ jac.T
  np.testing.assert_allclose(optax_mtl.weighting.upgrad(gram), [1.1111, 0.7895], atol=1e-4)
  np.testing.assert_allclose(upgrad_tjd(gram), [1.1109, 0.7894], atol=1e-4)  # TorchJD's golden value
  np.testing.assert_allclose(optax_mtl.weighting.upgrad(gram, preference=jnp.ones(2)),
                             optax_mtl.weighting.pcgrad(gram, jax.random.key(0)), rtol=1e-5)


def test_projection_of_non_conflicting_gradients_is_the_identity():
  g = np.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.1, 1.0]])  # all pairwise inner products >= 0
  gram = jnp.asarray(g @ g.T, jnp.float32)
  np.testing.assert_allclose(optax_mtl.weighting.upgrad(gram), np.full(3, 1 / 3), rtol=1e-5)
  np.testing.assert_allclose(optax_mtl.weighting.dualproj(gram), np.full(3, 1 / 3), rtol=1e-5)


def test_transform_defaults():
  params = problems.init_params()
  _, jac = problems.per_task_gradients(params, *problems.make_batch())
  for factory in (optax_mtl.upgrad, optax_mtl.dualproj):
    tx = factory(3, shared=problems.is_shared)
    updates, state = tx.update(jac, tx.init(params), params)
    np.testing.assert_allclose(updates["heads"]["task2"], jac["heads"]["task2"][2], rtol=1e-6)
    gram = optax_mtl.gram(jac, mask={"trunk": True, "heads": False})
    assert np.all(np.asarray(gram @ state.weights) >= -1e-5 * float(jnp.max(jnp.diagonal(gram))))
