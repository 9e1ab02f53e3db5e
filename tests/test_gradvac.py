"""GradVac (optax_mtl._src.gradvac)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems
import reference

CASES = reference.cases()

direction_error = reference.direction_error


@pytest.mark.parametrize("case", reference.params(CASES))
def test_reproduces_samsung_and_torchjd_with_their_orders(case):
  gram = reference.get(case, "gram")
  with jax.enable_x64(True):
    samsung, targets = optax_mtl.weighting.gradvac(
        jnp.asarray(gram), permutations=jnp.asarray(reference.get(case, "gradvac_samsung_perms")),
        eps=0.0, ema="on_correction")
    torchjd, _ = optax_mtl.weighting.gradvac(
        jnp.asarray(gram), permutations=jnp.asarray(reference.get(case, "tjd_gradvac_perms")))
  ref = reference.get(case, "gradvac_samsung_w")
  if np.all(np.isfinite(ref)):
    assert direction_error(gram, samsung, ref) <= 1e-12
    np.testing.assert_allclose(targets, reference.get(case, "gradvac_samsung_rho"), atol=1e-12)
  else:  # g_1 = -g_0: the official cosine rounds below -1 and it returns NaN; ours stays finite.
    assert np.all(np.isfinite(samsung))
  # TorchJD adds eps = 1e-8 in absolute units; ours is relative to unit norms.
  tolerance = 1e-6 if case["regime"] == "scale" else 2e-7
  assert direction_error(gram, torchjd, reference.get(case, "tjd_gradvac_w")) <= tolerance


def test_first_targets_and_state():
  g = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # pairwise cosines 0.6, 0, 0.8: no correction
  gram = jnp.asarray(g @ g.T, jnp.float32)
  cos = g @ g.T
  w, targets = optax_mtl.weighting.gradvac(gram, key=jax.random.key(0), beta=0.5)
  np.testing.assert_allclose(w, np.ones(3), rtol=1e-6)  # cosines above the zero targets: the plain sum
  # "always": every visited pair's target moves halfway (beta) to its cosine.
  np.testing.assert_allclose(targets, 0.5 * (cos - np.eye(3)), atol=1e-6)
  _, unchanged = optax_mtl.weighting.gradvac(gram, key=jax.random.key(0), ema="on_correction")
  np.testing.assert_array_equal(unchanged, 0.0)
  params = problems.init_params()
  _, jac = problems.per_task_gradients(params, *problems.make_batch())
  tx = optax_mtl.gradvac(3, key=1)
  s1 = tx.update(jac, tx.init(params), params)[1]
  s2 = tx.update(jac, s1, params)[1]
  assert not np.array_equal(s1.weighting_state.targets, s2.weighting_state.targets)
  assert not np.array_equal(s1.weighting_state.key, s2.weighting_state.key)
  with pytest.raises(ValueError, match="ema"):
    optax_mtl.gradvac(3, ema="sometimes")


def transcribed_gradvac(jac, targets, orders, beta):
  """The paper's GradVac (every visited pair's target updated), on the gradients, float64, eps = 0."""
  corrected = []
  targets = targets.copy()
  for i, order in enumerate(orders):
    g = jac[i].copy()
    for j in order:
      if j == i:
        continue
      phi = g @ jac[j] / (np.linalg.norm(g) * np.linalg.norm(jac[j]))
      t = targets[i, j]
      if phi < t:
        g = g + np.linalg.norm(g) * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2)) / (
            np.linalg.norm(jac[j]) * np.sqrt(1 - t**2)) * jac[j]
      targets[i, j] = (1 - beta) * t + beta * phi
    corrected.append(g)
  return np.sum(corrected, axis=0), targets


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_many_steps_follow_a_transcription_of_the_paper(beta):
  # The first step starts from zero targets; later ones exercise the target terms.
  rng = np.random.default_rng(0)
  k, steps = 4, 30
  targets = np.zeros((k, k))
  ours_targets = np.zeros((k, k))
  base = rng.normal(size=20)
  with jax.enable_x64(True):
    solve = jax.jit(lambda gram, targets, orders: optax_mtl.weighting.gradvac(
        gram, targets, permutations=orders, beta=beta, eps=0.0))
    for _ in range(steps):
      jac = base + rng.normal(size=(k, 20))  # positively correlated tasks: targets build up
      orders = np.stack([rng.permutation(k) for _ in range(k)])
      expected, targets = transcribed_gradvac(jac, targets, orders, beta)
      w, ours_targets = solve(jnp.asarray(jac @ jac.T), ours_targets, jnp.asarray(orders))
      np.testing.assert_allclose(np.asarray(w) @ jac, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
      np.testing.assert_allclose(np.asarray(ours_targets), targets, atol=1e-12)
  assert targets[~np.eye(k, dtype=bool)].min() > 0.1  # the targets did take part


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_duplicated_tasks_keep_the_update_bounded(eps):
  # Two identical tasks: their cosine target's EMA reaches 1.0 in float32, and
  # a cosine rounded just below it used to make the references' step divide by
  # eps (2.7e7 times the gradients' norm at step 1152 of this run; inf for
  # eps = 0). The method's own growth as the target nears 1 remains: in float64
  # this run peaks at 1.7e3.
  rng = np.random.default_rng(0)
  tx = optax_mtl.gradvac(3, key=0, eps=eps)
  params = {"w": jnp.zeros(50)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for _ in range(1200):
    g = rng.normal(size=50)
    jac = np.stack([g, g, rng.normal(size=50)]).astype(np.float32)
    updates, state = update({"w": jnp.asarray(jac)}, state, params)
    worst = max(worst, float(jnp.linalg.norm(updates["w"]) / np.linalg.norm(jac, axis=1).max()))
  assert int(state.nonfinite_count) == 0
  assert 1.0 < worst < 1e3
