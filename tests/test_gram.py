"""gram and combine (optax_mtl._src.gram)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl
import problems
import reference

MATRIX_CASES = [c for c in reference.cases() if reference.has(c, "G")]


def split_into_tree(g: np.ndarray) -> dict:
  """The columns of a (K, d) matrix spread over leaves of several ranks."""
  k, d = g.shape
  a, b = d // 2, d // 2 + d // 4
  return {
      "matrix": g[:, :a].reshape(k, 2, a // 2),
      "vector": g[:, a:b],
      "rest": {"tail": g[:, b:]},
  }


@pytest.mark.parametrize("case", reference.params(MATRIX_CASES))
def test_gram_matches_float64_reference(case):
  g = reference.get(case, "G")
  expected = reference.get(case, "gram")
  m = np.asarray(jax.jit(optax_mtl.gram)(split_into_tree(g.astype(np.float32))))
  assert m.dtype == np.float32 and m.shape == (case["K"],) * 2
  norms = np.sqrt(np.diag(expected))
  # float32 rounding of the inputs and of the accumulation, relative to |g_i||g_j|.
  np.testing.assert_array_less(np.abs(m - expected), 1e-5 * np.outer(norms, norms) + 1e-30)
  np.testing.assert_array_equal(m, m.T)


@pytest.mark.parametrize("k", [2, 10, 19])  # row pairs; 8-row tiles and a partial one
@pytest.mark.parametrize("columns", [2 * 16384, 3 * 16384 + 5, 16384 + 7])
def test_wide_leaves_blocked_gram_matches_float64(columns, k):
  """Leaves wide enough for the blocked CPU contraction (blocks of 16384 columns, and a remainder)."""
  rng = np.random.default_rng(columns)
  leaf = rng.normal(size=(k, columns)).astype(np.float32) * np.logspace(0, 3, k)[:, None].astype(np.float32)
  jac = {"flat": jnp.asarray(leaf), "shaped": jnp.asarray(leaf[:, : columns - columns % 8].reshape(k, 8, -1))}
  expected = sum(np.asarray(x, np.float64).reshape(k, -1) @ np.asarray(x, np.float64).reshape(k, -1).T
                 for x in jax.tree.leaves(jac))
  for fn in (optax_mtl.gram, jax.jit(optax_mtl.gram)):
    np.testing.assert_allclose(fn(jac), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_gram_sums_leaves_and_respects_mask():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 4, 2)).astype(np.float32), "b": rng.normal(size=(3, 5)).astype(np.float32)}
  flat = lambda t: np.concatenate([x.reshape(3, -1) for x in jax.tree.leaves(t)], axis=1).astype(np.float64)
  np.testing.assert_allclose(optax_mtl.gram(tree), flat(tree) @ flat(tree).T, rtol=1e-5)
  only_b = optax_mtl.gram(tree, mask={"a": False, "b": True})
  np.testing.assert_allclose(only_b, flat({"b": tree["b"]}) @ flat({"b": tree["b"]}).T, rtol=1e-5)
  nested = {"x": tree, "y": {"c": tree["b"]}}
  np.testing.assert_allclose(optax_mtl.gram(nested, mask={"x": True, "y": False}), optax_mtl.gram(tree), rtol=1e-6)
  np.testing.assert_array_equal(optax_mtl.gram(tree, mask=False), np.zeros((3, 3)))


def test_gram_of_scalar_parameter_is_outer_product():
  g = jnp.array([1.0, -2.0, 3.0])
  np.testing.assert_allclose(optax_mtl.gram({"s": g}), np.outer(g, g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_accumulate_in_float32(dtype):
  rng = np.random.default_rng(1)
  # 2**14 entries of magnitude ~4: a float16 accumulator would overflow (65504).
  g = jnp.asarray(rng.normal(size=(3, 128, 128)) * 4, dtype)
  exact = np.asarray(g, np.float64).reshape(3, -1)
  exact = exact @ exact.T
  m = jax.jit(optax_mtl.gram)({"w": g})
  assert m.dtype == jnp.float32
  np.testing.assert_allclose(m, exact, rtol=1e-4)
  if dtype == jnp.float16:
    naive = jnp.einsum("kij,lij->kl", g, g, preferred_element_type=jnp.float16)
    assert not np.isfinite(np.asarray(naive)).all()


def test_jit_equals_eager():
  rng = np.random.default_rng(2)
  tree = {"a": rng.normal(size=(4, 8, 3)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  np.testing.assert_array_equal(optax_mtl.gram(tree), jax.jit(optax_mtl.gram)(tree))
  w = jnp.array([0.5, -1.0, 2.0, 0.25])
  for u, v in zip(jax.tree.leaves(optax_mtl.combine(w, tree)), jax.tree.leaves(jax.jit(optax_mtl.combine)(w, tree))):
    np.testing.assert_array_equal(u, v)


def test_gram_is_vmappable_over_a_batch_of_trees():
  rng = np.random.default_rng(3)
  batch = {"a": rng.normal(size=(5, 3, 6)).astype(np.float32)}
  out = jax.vmap(optax_mtl.gram)(batch)
  assert out.shape == (5, 3, 3)
  np.testing.assert_allclose(out[2], optax_mtl.gram({"a": batch["a"][2]}), rtol=1e-6)


@pytest.mark.parametrize("case", reference.params(MATRIX_CASES[::4]))
def test_combine_matches_weighted_sum(case):
  g = reference.get(case, "G")
  rng = np.random.default_rng(case["seed"])
  w = rng.normal(size=case["K"])
  out = optax_mtl.combine(jnp.asarray(w, jnp.float32), split_into_tree(g.astype(np.float32)))
  expected = split_into_tree((w @ g)[None])
  for u, v in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    assert u.dtype == jnp.float32 and u.shape == v.shape[1:]
    scale = np.abs(w) @ np.abs(g).max(axis=1)
    np.testing.assert_allclose(u, v[0], atol=1e-6 * scale)


@pytest.mark.parametrize("k", [3, 17, 40])
def test_combine_small_and_large_k_paths(k):
  """Unrolled for K <= 16, a dot_general beyond; both float32 accurate, also on bf16 leaves."""
  rng = np.random.default_rng(k)
  tree = {"a": rng.normal(size=(k, 5, 3)).astype(np.float32), "b": rng.normal(size=(k, 4))}
  w = rng.normal(size=k).astype(np.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    leaves = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    out = jax.jit(optax_mtl.combine)(jnp.asarray(w), leaves)
    for name, leaf in leaves.items():
      exact = np.tensordot(w.astype(np.float64), np.asarray(leaf, np.float64), axes=1)
      assert out[name].dtype == dtype
      tol = 1e-5 if dtype == jnp.float32 else 1e-2
      np.testing.assert_allclose(np.asarray(out[name], np.float64), exact, rtol=tol, atol=tol * np.abs(exact).max())


def test_combine_keeps_leaf_dtype():
  tree = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones((2,), jnp.float16), "c": jnp.ones((2, 1), jnp.float32)}
  out = optax_mtl.combine(jnp.array([1.0, 2.0]), tree)
  assert {k: v.dtype for k, v in out.items()} == {"a": jnp.bfloat16, "b": jnp.float16, "c": jnp.float32}
  assert out["a"].shape == (3,) and out["b"].shape == () and out["c"].shape == (1,)
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32), [3.0, 3.0, 3.0])


def test_combine_validates_weights():
  with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
    optax_mtl.combine(jnp.ones(3), {"a": jnp.ones((2, 4))})


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_gram_all_reduces_and_never_gathers(axis_type):
  rng = np.random.default_rng(4)
  tree = {"w": rng.normal(size=(3, 64, 16)).astype(np.float32), "b": rng.normal(size=(3, 16)).astype(np.float32)}
  mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,), devices=problems.mesh_devices(8))
  specs = {"w": P(None, None, "model"), "b": P(None, "model")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
  weights = jnp.array([0.3, -1.0, 2.0])
  with jax.set_mesh(mesh):
    gram_fn = jax.jit(optax_mtl.gram)
    m = gram_fn(sharded)
    hlo = gram_fn.lower(sharded).compile().as_text()
    combine_fn = jax.jit(optax_mtl.combine)
    d = combine_fn(weights, sharded)
    combine_hlo = combine_fn.lower(weights, sharded).compile().as_text()
  np.testing.assert_allclose(m, optax_mtl.gram(tree), rtol=1e-5)
  assert "all-reduce" in hlo
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert "all-gather" not in combine_hlo and "all-reduce" not in combine_hlo
  np.testing.assert_allclose(d["w"], optax_mtl.combine(weights, tree)["w"], rtol=1e-6, atol=1e-6)
  assert d["w"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)


@pytest.mark.parametrize("shape", [(64, 16), (8, 4 * 16384 // 8 + 8)], ids=["narrow", "blocked"])
@pytest.mark.parametrize("spec", [P(None, None, "model"), P(None, "model", None)], ids=["minor", "major"])
def test_sharded_inputs_without_a_mesh_context_never_gather(spec, shape):
  # Outside jax.set_mesh the CPU path merges the non-task axes; the partitioner
  # must still contract each shard locally, whichever axis is sharded. "blocked":
  # wide enough for the blocked CPU Gram's loop of dynamic slices, were it taken.
  rng = np.random.default_rng(5)
  tree = {"w": rng.normal(size=(3, *shape)).astype(np.float32),
          "b": rng.normal(size=(3, 16)).astype(np.float32)}
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,), devices=problems.mesh_devices(8))
  sharded = {"w": jax.device_put(tree["w"], NamedSharding(mesh, spec)),
             "b": jax.device_put(tree["b"], NamedSharding(mesh, P(None, "model")))}
  gram_fn = jax.jit(optax_mtl.gram)
  hlo = gram_fn.lower(sharded).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo
  reference = np.einsum("iab,jab->ij", tree["w"].astype(np.float64), tree["w"].astype(np.float64))
  reference += tree["b"].astype(np.float64) @ tree["b"].T.astype(np.float64)
  np.testing.assert_allclose(gram_fn(sharded), reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())


@pytest.mark.parametrize("k", [4, 11])
@pytest.mark.parametrize("columns", [100, 2 * 16384, 3 * 16384 + 5])
def test_task_trees_gram_and_combine_equal_the_stacked_ones(columns, k):
  """K per-task trees given as a list (the feature level's per-task heads), narrow and blocked."""
  from optax_mtl._src import gram as gram_lib

  rng = np.random.default_rng(columns)
  scales = np.logspace(0, 3, k)
  trees = [{"wide": jnp.asarray(rng.normal(size=(columns,)) * s, jnp.float32),
            "matrix": jnp.asarray(rng.normal(size=(3, 5)) * s, jnp.float32),
            "half": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16)} for s in scales]
  stacked = jax.tree.map(lambda *rows: jnp.stack(rows), *trees)
  flat = np.stack([np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)]) for t in trees])
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=k), jnp.float32)
  for gram_fn, combine_fn in ((gram_lib.gram_of_task_trees, gram_lib.combine_task_trees),
                              (jax.jit(gram_lib.gram_of_task_trees), jax.jit(gram_lib.combine_task_trees))):
    m = gram_fn(trees)
    assert m.dtype == jnp.float32 and m.shape == (k, k)
    np.testing.assert_allclose(m, flat @ flat.T, rtol=1e-5, atol=1e-6 * np.abs(flat @ flat.T).max())
    np.testing.assert_allclose(m, optax_mtl.gram(stacked), rtol=1e-5)
    combined = combine_fn(weights, trees)
    expected = optax_mtl.combine(weights, stacked)
    assert jax.tree.map(lambda x: x.dtype, combined) == jax.tree.map(lambda x: x.dtype, expected)
    for a, b, rows in zip(jax.tree.leaves(combined), jax.tree.leaves(expected), zip(*map(jax.tree.leaves, trees))):
      # float32 rounding of a sum whose terms reach max |w_i g_i|, not of the (cancelling) result
      exact = sum(float(w) * np.asarray(row, np.float64) for w, row in zip(weights, rows))
      scale = max(np.abs(float(w) * np.asarray(row, np.float64)).max() for w, row in zip(weights, rows))
      tol = (1e-2 if a.dtype == jnp.bfloat16 else 1e-6) * scale
      np.testing.assert_allclose(np.asarray(a, np.float64), exact, rtol=0, atol=tol)
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=tol)
