"""GradDrop (optax_mtl._src.graddrop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
import problems
import reference
from optax_mtl._src import graddrop as graddrop_lib

CASES = [c for c in reference.cases() if reference.has(c, "G")]


@pytest.mark.parametrize("case", reference.params(CASES))
def test_reproduces_torchjd_and_samsung_with_their_uniforms(case):
  g = reference.get(case, "G")
  with jax.enable_x64(True):
    combined, _ = graddrop_lib.drop({"p": jnp.asarray(g)}, {"p": jnp.asarray(reference.get(case, "tjd_graddrop_U"))})
    _, multipliers = graddrop_lib.drop({"p": jnp.asarray(g)}, jnp.asarray(reference.get(case, "graddrop_samsung_U")),
                                       leak=0.5, purity="global", eps=1e-8)
  ref = reference.get(case, "tjd_graddrop_dir")
  np.testing.assert_allclose(combined["p"], ref, rtol=1e-12, atol=1e-12 * np.abs(g).max())
  np.testing.assert_array_equal(multipliers, reference.get(case, "graddrop_samsung_w"))


def test_agreeing_signs_are_kept_and_full_leak_is_the_sum():
  rng = np.random.default_rng(0)
  g = np.abs(rng.normal(size=(3, 10))).astype(np.float32)
  g[:, ::2] *= -1  # every coordinate has one sign across tasks
  out, kept = graddrop_lib.drop({"p": jnp.asarray(g)}, {"p": jax.random.uniform(jax.random.key(0), (10,))})
  np.testing.assert_allclose(out["p"], g.sum(0), rtol=1e-6)
  np.testing.assert_allclose(kept, 1.0)
  mixed = rng.normal(size=(3, 10)).astype(np.float32)
  out, _ = graddrop_lib.drop({"p": jnp.asarray(mixed)}, {"p": jnp.full((10,), 0.5)}, leak=1.0)
  np.testing.assert_allclose(out["p"], mixed.sum(0), rtol=1e-6)


def test_transform_keys_heads_and_weights():
  params = problems.init_params()
  _, jac = problems.per_task_gradients(params, *problems.make_batch())
  tx = optax_mtl.graddrop(3, key=0)
  a, sa = jax.jit(tx.update)(jac, tx.init(params), params)
  b, sb = jax.jit(tx.update)(jac, tx.init(params), params)
  np.testing.assert_array_equal(a["trunk"]["w"], b["trunk"]["w"])
  np.testing.assert_allclose(a["heads"]["task2"], jac["heads"]["task2"][2], rtol=1e-6)  # one task: kept
  assert np.all((np.asarray(sa.weights) > 0) & (np.asarray(sa.weights) <= 1))
  other = optax_mtl.graddrop(3, key=1)
  c, _ = jax.jit(other.update)(jac, other.init(params), params)
  assert not np.allclose(a["trunk"]["w"], c["trunk"]["w"])


def test_feature_level_drops_signed_representation_gradients():
  params = problems.init_params()
  x, y = problems.make_batch()

  def encoder(p, x, y):
    return jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"][None, :])

  def heads(p, z, x, y):
    preds = jnp.stack([z @ p["heads"][f"task{i}"] for i in range(3)], axis=-1)
    return jnp.mean((preds - y) ** 2, axis=0)

  tx = optax_mtl.graddrop(3, key=2)
  updates, _ = jax.jit(lambda p: tx.update(optax_mtl.feature_task_gradients(encoder, heads)(p, x, y),
                                           tx.init(p), p))(params)
  # Reference: the same uniforms on dL_i/dz signed by z, then one backward pass through the encoder.
  z = encoder(params, x, y)
  jac_z = jax.jacrev(lambda rep: heads(params, rep, x, y))(z)
  _, sub = jax.random.split(jax.random.wrap_key_data(jax.random.key_data(jax.random.key(2))))
  uniforms = graddrop_lib.draw_uniforms(sub, {"z": jac_z}, "coordinate")
  dz, _ = graddrop_lib.drop({"z": jac_z}, uniforms, signs={"z": jnp.sign(z)})
  _, encoder_vjp = jax.vjp(lambda p: encoder(p, x, y), params)
  expected_trunk = encoder_vjp(dz["z"])[0]["trunk"]
  np.testing.assert_allclose(updates["trunk"]["w"], expected_trunk["w"], rtol=1e-5, atol=1e-7)
  plain_heads = jax.grad(lambda p: jnp.sum(heads(p, z, x, y)))(params)["heads"]
  np.testing.assert_allclose(updates["heads"]["task1"], plain_heads["task1"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [3, 7])  # unrolled over tasks, and a loop over tasks
def test_drop_matches_the_formula_with_signs_leaks_and_kept_mass(k):
  rng = np.random.default_rng(k)
  shapes = {"a": (4, 5, 3), "b": (6,)}
  grads = {n: rng.normal(size=(k,) + s) for n, s in shapes.items()}
  signs = {n: np.sign(rng.normal(size=s)) for n, s in shapes.items()}
  uniforms = {n: rng.uniform(size=s) for n, s in shapes.items()}
  leak = rng.uniform(size=k)
  with jax.enable_x64(True):
    out, kept = graddrop_lib.drop(jax.tree.map(jnp.asarray, grads), jax.tree.map(jnp.asarray, uniforms),
                                  leak=jnp.asarray(leak), signs=jax.tree.map(jnp.asarray, signs))
  kept_mass, mass = np.zeros(k), np.zeros(k)
  for n, g in grads.items():
    s = g * signs[n][None]
    p = 0.5 * (1 + s.sum(0) / np.abs(s).sum(0))
    mask = ((p > uniforms[n])[None] & (s > 0)) | ((p < uniforms[n])[None] & (s < 0))
    multipliers = leak.reshape((k,) + (1,) * len(shapes[n])) + (1 - leak.reshape((k,) + (1,) * len(shapes[n]))) * mask
    np.testing.assert_allclose(out[n], (multipliers * g).sum(0), rtol=1e-12, atol=1e-12)
    kept_mass += (multipliers * np.abs(g)).reshape(k, -1).sum(1)
    mass += np.abs(g).reshape(k, -1).sum(1)
  np.testing.assert_allclose(kept, kept_mass / mass, rtol=1e-12)


def test_uniforms_are_one_draw_sliced_per_leaf():
  """One random draw whatever the leaf count (a draw per leaf bloated the compiled step)."""
  tree = {f"leaf{i}": jnp.zeros((3, 4, i + 1)) for i in range(12)}
  key = jax.random.key_data(jax.random.key(0))
  draw = lambda key: graddrop_lib.draw_uniforms(key, tree, "coordinate")
  names = [eqn.primitive.name for eqn in jax.make_jaxpr(draw)(key).jaxpr.eqns]
  assert names.count("random_wrap") == 1 and names.count("jit") == 1  # jax.random.uniform's one call
  uniforms = draw(key)
  assert jax.tree.map(jnp.shape, uniforms) == {f"leaf{i}": (4, i + 1) for i in range(12)}
  values = np.concatenate([np.ravel(u) for u in jax.tree.leaves(uniforms)])
  assert values.min() >= 0.0 and values.max() < 1.0
  assert len(np.unique(values)) == values.size  # no two leaves share a slice
