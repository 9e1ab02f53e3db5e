"""Shared numerics (optax_mtl._src.numerics): cosine scaling, the simplex QP, graded eigenpairs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src import numerics


def enumerate_qp(q, c, e=None):
  """Exact minimiser in float64 by enumerating supports (small K only)."""
  k = len(q)
  best, best_value = None, np.inf
  for size in range(1, k + 1):
    for support in itertools.combinations(range(k), size):
      s = list(support)
      if e is None:
        system, rhs = q[np.ix_(s, s)], -c[s]
      else:
        system = np.block([[q[np.ix_(s, s)], -e[s][:, None]], [e[s][None, :], np.zeros((1, 1))]])
        rhs = np.concatenate([-c[s], [1.0]])
      solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
      x = np.zeros(k)
      x[s] = solution[:size]
      if np.any(x < -1e-12) or (e is not None and abs(e @ x - 1) > 1e-9):
        continue
      value = 0.5 * x @ q @ x + c @ x
      if value < best_value - 1e-14:
        best, best_value = x, value
  return best, best_value


def random_problem(seed, k, rank=None, duplicate=False):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, rank or k + 3))
  if duplicate:
    g[-1] = g[0]
  return g @ g.T, rng.normal(size=k)


qp = jax.jit(numerics.box_simplex_qp, static_argnames="simplex")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [dict(k=3), dict(k=5), dict(k=6, rank=3), dict(k=5, duplicate=True)],
                         ids=["k3", "k5", "rank3", "duplicate"])
def test_simplex_qp_matches_enumeration(seed, shape):
  q, c = random_problem(seed, **shape)
  x_ref, value_ref = enumerate_qp(q, c, np.ones(len(q)))
  sol = qp(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32))
  x = np.asarray(sol.x, np.float64)
  assert np.all(x >= 0) and abs(x.sum() - 1) <= 1e-6
  assert float(sol.kkt_residual) <= 1e-5
  scale = max(np.max(np.diag(q)), np.max(np.abs(c)))
  assert 0.5 * x @ q @ x + c @ x <= value_ref + 1e-6 * scale
  np.testing.assert_allclose(float(sol.objective), value_ref, atol=1e-5 * scale)
  if not shape.get("duplicate") and not shape.get("rank"):  # unique minimiser
    np.testing.assert_allclose(x, x_ref, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_nonnegative_qp_and_general_equality(seed):
  q, c = random_problem(seed, 5)
  x_ref, value_ref = enumerate_qp(q, c)
  sol = qp(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32), simplex=False)
  np.testing.assert_allclose(np.asarray(sol.x), x_ref, atol=1e-4 * max(1.0, np.max(np.abs(x_ref))))
  e = np.random.default_rng(seed).uniform(0.5, 3.0, size=5)
  x_ref, value_ref = enumerate_qp(q, c, e)
  sol = qp(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32), equality=jnp.asarray(e, jnp.float32))
  x = np.asarray(sol.x, np.float64)
  assert abs(e @ x - 1) <= 1e-5 and np.all(x >= 0)
  np.testing.assert_allclose(x, x_ref, atol=1e-4)


def test_qp_zeros_are_exact_and_zero_matrix_is_finite():
  q = np.diag([1.0, 4.0, 9.0])
  sol = qp(jnp.asarray(q, jnp.float32), jnp.asarray([0.0, -10.0, 10.0], jnp.float32))
  assert float(sol.x[2]) == 0.0  # active bound exactly zero, not 1e-8
  sol = qp(jnp.zeros((4, 4), jnp.float32))
  assert np.all(np.isfinite(np.asarray(sol.x))) and abs(float(jnp.sum(sol.x)) - 1) <= 1e-6


def test_cosine_scaling_flags_zero_tasks_and_does_not_overflow():
  g = np.array([[3.0, 4.0], [0.0, 0.0], [1e19, 0.0]])
  gram = jnp.asarray(g @ g.T, jnp.float32)  # 1e38: n_i n_j would overflow
  scaling = numerics.cosine_scaling(gram)
  np.testing.assert_array_equal(scaling.nonzero, [True, False, True])
  np.testing.assert_allclose(scaling.norms, [5.0, 0.0, 1e19], rtol=1e-6)
  np.testing.assert_allclose(scaling.cosines, [[1, 0, 0.6], [0, 1, 0], [0.6, 0, 1]], atol=1e-6)


def test_graded_eigh_keeps_small_eigenvalues_relative():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(6, 20))
  g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.logspace(-3, 3, 6)[:, None]
  gram = g @ g.T
  exact = np.linalg.eigvalsh(gram)  # float64, ascending
  values, vectors = jax.jit(numerics.graded_eigh)(jnp.asarray(gram, jnp.float32))
  np.testing.assert_allclose(np.asarray(values, np.float64), exact, rtol=1e-4)
  plain = np.asarray(jnp.linalg.eigvalsh(jnp.asarray(gram, jnp.float32)), np.float64)
  assert abs(plain[0] - exact[0]) > 1e-2 * exact[0]  # what plain float32 eigh loses
  v = np.asarray(vectors, np.float64)
  np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-5)


def test_full_precision_sets_highest_matmul_precision():
  seen = []

  @numerics.full_precision
  def probe():
    seen.append(jax.config.jax_default_matmul_precision)

  probe()
  assert seen == ["highest"]


@pytest.mark.parametrize("name", ["aligned", "cagrad", "dualproj", "gradvac", "imtl_g", "mgda", "nash", "pcgrad",
                                  "upgrad"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_public_weightings_give_nan_for_a_nonfinite_gram(name, bad):
  # A NaN off the diagonal used to give finite weights from nash (zeros), mgda
  # (uniform), imtl_g (zeros), upgrad and pcgrad.
  jac = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  gram = jnp.asarray(jac @ jac.T).at[0, 1].set(bad).at[1, 0].set(bad)
  kwargs = {"key": jax.random.key(0)} if name in ("gradvac", "pcgrad") else {}
  out = getattr(optax_mtl.weighting, name)(gram, **kwargs)
  weights = out[0] if isinstance(out, tuple) else out
  assert weights.shape == (3,) and np.all(np.isnan(np.asarray(weights)))
  finite = getattr(optax_mtl.weighting, name)(jnp.asarray(jac @ jac.T), **kwargs)
  assert np.all(np.isfinite(np.asarray(finite[0] if isinstance(finite, tuple) else finite)))
