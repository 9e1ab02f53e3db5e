"""PCGrad (optax_mtl._src.pcgrad)."""

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
def test_reproduces_nash_mtl_and_torchjd_with_their_orders(case):
  gram = reference.get(case, "gram")
  with jax.enable_x64(True):
    official = np.asarray(optax_mtl.weighting.pcgrad(
        jnp.asarray(gram), permutations=jnp.asarray(reference.get(case, "pcgrad_official_perms"))))
    torchjd = np.asarray(optax_mtl.weighting.pcgrad(
        jnp.asarray(gram), permutations=jnp.asarray(reference.get(case, "tjd_pcgrad_perms")), skip_self=True))
  if reference.has(case, "G"):
    ref = reference.get(case, "pcgrad_official_dir")
    np.testing.assert_allclose(official @ reference.get(case, "G"), ref, rtol=1e-12,
                               atol=1e-12 * np.sqrt(np.max(np.diag(gram))))
  assert direction_error(gram, torchjd, reference.get(case, "tjd_pcgrad_w")) <= 1e-12
  # float32, keyed orders: no conflicting component left between any projected gradient and the
  # last task it visited is not guaranteed, but the K = 2 case is order-free.
  if case["K"] == 2:
    w32 = optax_mtl.weighting.pcgrad(jnp.asarray(gram, jnp.float32), jax.random.key(0))
    assert direction_error(gram, w32, reference.get(case, "tjd_pcgrad_w")) <= 1e-5


def test_golden_and_equals_upgrad_with_ones_for_two_tasks():
  jac = jnp.array([[-4.0, 1, 1], [6, 1, 1]])
  w = optax_mtl.weighting.pcgrad(jac @ jac.T, jax.random.key(3))
  np.testing.assert_allclose(w, [2.2222, 1.5789], atol=1e-4)
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = rng.normal(size=(2, 6))
    gram = jnp.asarray(g @ g.T, jnp.float32)
    np.testing.assert_allclose(optax_mtl.weighting.pcgrad(gram, jax.random.key(1)),
                               optax_mtl.weighting.upgrad(gram, preference=jnp.ones(2)), rtol=1e-4, atol=1e-6)


def test_keys_zero_rows_and_errors():
  rng = np.random.default_rng(1)
  g = np.vstack([rng.normal(size=(3, 5)), np.zeros((1, 5))])
  gram = jnp.asarray(g @ g.T, jnp.float32)
  a = optax_mtl.weighting.pcgrad(gram, jax.random.key(0))
  np.testing.assert_array_equal(a, optax_mtl.weighting.pcgrad(gram, jax.random.key(0)))
  assert np.all(np.isfinite(a))
  with pytest.raises(ValueError, match="PRNG key"):
    optax_mtl.weighting.pcgrad(gram)


def test_transform_reduction_and_plain_heads():
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  total = optax_mtl.pcgrad(3, key=0, shared=problems.is_shared)
  mean = optax_mtl.pcgrad(3, key=0, shared=problems.is_shared, reduction="mean")
  u_sum, s_sum = total.update(jac, total.init(params), params)
  u_mean, s_mean = mean.update(jac, mean.init(params), params)
  np.testing.assert_allclose(s_mean.weights, s_sum.weights / 3, rtol=1e-6)
  np.testing.assert_allclose(u_mean["trunk"]["w"], u_sum["trunk"]["w"] / 3, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(u_sum["heads"]["task0"], jac["heads"]["task0"][0], rtol=1e-6)
