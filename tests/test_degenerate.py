"""Degenerate-input families for every weighting and every transform.

Each family is a per-task gradient matrix ``G`` (K x d) that breaks some
reference implementation: zeros, a zero row, duplicated or exactly opposite
tasks, rank deficiency, near collinearity, uniform scales from 1e-10 to 1e15,
task norms spanning 1e10, strong conflict. Every method must return a finite
update on every family (two consecutive steps, so that state-carrying methods
use what they stored); the weightings' claimed properties are checked where
they apply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from transforms import case_params

K, D = 3, 16


def _families(k: int, d: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  base = rng.normal(size=(k, d))
  one_zero = base.copy()
  one_zero[1] = 0.0
  duplicated = base.copy()
  duplicated[2] = duplicated[0]
  opposite = base.copy()
  opposite[1] = -opposite[0]
  opposite[2] = 0.5 * opposite[0] - 0.5 * opposite[1]  # = g0: 0 stays in the hull
  rank_one = np.outer(rng.uniform(0.5, 2.0, size=k), base[0])
  collinear = base[0] + 1e-6 * rng.normal(size=(k, d))
  conflicting = base.copy()
  conflicting[1] = -0.9 * base[0] + 0.3 * base[1]  # cosine about -0.95
  conflicting[2] = -0.5 * base[0] - 0.5 * base[1] + 0.3 * base[2]
  families = {
      "zero": np.zeros((k, d)),
      "one_zero_row": one_zero,
      "duplicated": duplicated,
      "opposite": opposite,
      "rank_one": rank_one,
      "nearly_collinear": collinear,
      "mixed_scales": base * np.logspace(-5, 5, k)[:, None],
      "strongly_conflicting": conflicting,
  }
  for scale in (1e-10, 1e-5, 1e3, 1e10, 1e15):
    families[f"scale_{scale:g}"] = base * scale
  return families


FAMILIES = _families(K, D)
LOSSES = np.array([0.5, 1.0, 2.0])


def _weightings():
  w = optax_mtl.weighting
  return {
      "nash": w.nash, "mgda": w.mgda, "aligned": w.aligned, "cagrad": w.cagrad, "imtl_g": w.imtl_g,
      "upgrad": w.upgrad, "dualproj": w.dualproj,
      "pcgrad": lambda gram: w.pcgrad(gram, jax.random.key(0)),
      "gradvac": lambda gram: w.gradvac(gram, key=jax.random.key(0))[0],
  }


WEIGHTINGS = _weightings()
NON_CONFLICTING = ("mgda", "upgrad", "dualproj")


@functools.lru_cache(maxsize=None)
def _jitted_weighting(name):
  return jax.jit(WEIGHTINGS[name])


# Linearly independent gradients (every other family is rank-deficient or numerically so in
# float32): Nash-MTL's bargaining solution exists there.
REGULAR = ("mixed_scales", "strongly_conflicting") + tuple(f for f in FAMILIES if f.startswith("scale_"))
CAGRAD_C = 0.4  # weighting.cagrad's defaults: c = 0.4, rescale = 1 (s = 1 + c^2)


def _check_weighting(name, g, regular=False):
  gram = g @ g.T
  w = np.asarray(_jitted_weighting(name)(jnp.asarray(gram, jnp.float32)), np.float64)
  assert w.shape == (len(g),) and np.all(np.isfinite(w)), (name, w)
  d = w @ g
  norms = np.linalg.norm(g, axis=1)
  nonzero = norms > 0
  units = g[nonzero] / norms[nonzero, None]
  resolvable = np.linalg.norm(d) > 1e-5 * norms.max() * max(1.0, np.abs(w).sum())
  if name in NON_CONFLICTING and resolvable:
    # g_i^T d >= 0 for every task, up to float32 rounding of the cosines.
    cosines = (g @ d)[nonzero] / (norms[nonzero] * np.linalg.norm(d))
    assert np.all(cosines >= -1e-3), (name, cosines)
  if name == "nash":
    if regular:
      assert np.all(w > 0), w
    if np.all(w > 0):
      np.testing.assert_allclose(w * (gram @ w), 1.0, rtol=1e-3)
  if name == "mgda":
    # The min-norm point of the hull: w on the simplex and (M w)_i >= w^T M w for every task.
    scale = max(np.max(np.diag(gram)), 1e-300)
    assert np.all(w >= -1e-6) and abs(w.sum() - 1.0) < 1e-5, w
    assert np.all(gram @ w >= w @ gram @ w - 1e-5 * scale), (gram @ w, w @ gram @ w)
  if not np.any(nonzero):
    assert np.all(d == 0), (name, d)
    return
  if name == "imtl_g":
    # d has the same projection on every unit gradient (d = 0 where no such d exists).
    projections = units @ d
    assert np.ptp(projections) <= 1e-4 * max(np.linalg.norm(d), 1e-300), projections
    if regular:
      assert abs(w.sum() - 1.0) < 1e-4 and np.all(projections > 0), (w, projections)
  if name == "cagrad":
    # s d maximises the worst task's improvement over the ball ||s d - g0|| <= c ||g0||, so it
    # improves the worst task at least as much as g0 does, on the ball's boundary unless w = 0
    # (zero in the hull: no direction improves every task).
    g0, sd = g.mean(axis=0), (1 + CAGRAD_C**2) * d
    tol = 1e-4 * np.linalg.norm(g0) * norms.max()
    assert np.min(g[nonzero] @ sd) >= np.min(g[nonzero] @ g0) - tol, name
    if np.any(w != 0):
      np.testing.assert_allclose(np.linalg.norm(sd - g0), CAGRAD_C * np.linalg.norm(g0), rtol=1e-3)
    if regular:
      assert np.any(w != 0), w
  if name == "aligned" and regular:
    # w = B 1 with B = sqrt(s) V L^{-1/2} V^T over the eigenpairs above max(L) K eps (float32's
    # eps), s the smallest of those: compared with float64 as directions.
    eigenvalues, vectors = np.linalg.eigh(gram)
    kept = eigenvalues > eigenvalues.max() * len(g) * np.finfo(np.float32).eps
    vectors, eigenvalues = vectors[:, kept], eigenvalues[kept]
    expected = np.sqrt(eigenvalues.min()) * vectors @ ((vectors.T @ np.ones(len(g))) / np.sqrt(eigenvalues))
    error = np.linalg.norm((w - expected) @ g) / np.linalg.norm(expected @ g)
    assert error < 1e-3, error
  if name in ("nash", "mgda", "upgrad", "dualproj", "imtl_g", "cagrad", "aligned"):
    # Scale-free methods: the update is never larger than the gradients allow.
    assert np.linalg.norm(d) <= 10 * len(g) * max(norms.max(), 1e-30) * max(1.0, np.abs(w).sum()), name


@pytest.mark.parametrize("family", list(FAMILIES), ids=str)
@pytest.mark.parametrize("name", list(WEIGHTINGS), ids=str)
def test_weighting_is_finite_and_keeps_its_properties(name, family):
  _check_weighting(name, FAMILIES[family], regular=family in REGULAR)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WEIGHTINGS), ids=str)
def test_weighting_at_k100_and_k1(name):
  rng = np.random.default_rng(1)
  g = rng.normal(size=(100, 256)) * np.logspace(-2, 2, 100)[:, None]
  _check_weighting(name, g)
  _check_weighting(name, rng.normal(size=(1, 8)), regular=True)


_UPDATES = {}


def _jitted_update(case, k):
  if (case.name, k) not in _UPDATES:
    tx = case.factory(k, **case.kwargs)
    _UPDATES[case.name, k] = tx, jax.jit(tx.update)
  return _UPDATES[case.name, k]


def _two_steps(case, g, losses):
  k, d = g.shape
  tx, update = _jitted_update(case, k)
  params = {"w": jnp.zeros((d,), jnp.float32)}
  state = tx.init(params)
  grads = {"w": jnp.asarray(g, jnp.float32)}
  losses = jnp.asarray(losses, jnp.float32)
  outputs = []
  for _ in range(2):
    updates, state = update(grads, state, params, task_losses=losses)
    outputs.append(np.asarray(updates["w"]))
  return outputs, state


@pytest.mark.parametrize("case", case_params())
def test_transform_update_is_finite_on_every_family(case):
  for family, g in FAMILIES.items():
    outputs, state = _two_steps(case, g, LOSSES)
    for u in outputs:
      assert np.all(np.isfinite(u)), (case.name, family, u)
    # Finite input is never counted as non-finite (no silent skips).
    assert int(state.nonfinite_count) == 0, (case.name, family)
    if family == "zero":
      np.testing.assert_array_equal(outputs[-1], 0.0)


@pytest.mark.parametrize("case", case_params())
def test_transform_with_a_single_task(case):
  g = np.random.default_rng(2).normal(size=(1, D))
  outputs, state = _two_steps(case, g, LOSSES[:1])
  assert all(np.all(np.isfinite(u)) for u in outputs)
  # One task: every method follows its gradient (up to a positive factor).
  u = outputs[-1]
  cosine = u @ g[0] / (np.linalg.norm(u) * np.linalg.norm(g[0]))
  assert cosine > 1 - 1e-5, (case.name, cosine)
