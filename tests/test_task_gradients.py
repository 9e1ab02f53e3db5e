"""Gradient paths (optax_mtl._src.task_gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
import problems

K = problems.NUM_TASKS


def inverse_norm(gram):
  return 1.0 / jnp.sqrt(jnp.diag(gram))


def assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@functools.lru_cache(maxsize=None)
def setup(seed=1):
  params = problems.init_params()
  x, y = problems.make_batch(seed=seed)
  return params, x, y


@pytest.mark.parametrize("batch_size", [None, 1, 2, 3])
def test_value_and_jacobian_equals_jacrev(batch_size):
  params, x, y = setup()
  losses, jac = jax.jit(optax_mtl.value_and_jacobian(problems.task_losses, batch_size=batch_size))(params, x, y)
  assert_trees_close(jac, jax.jacrev(problems.task_losses)(params, x, y), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses, problems.task_losses(params, x, y), rtol=1e-6)
  optax_mtl.check_task_gradients(jac, K, params)


def test_vectorised_and_chunked_jacobians_agree():
  params, x, y = setup()
  full = optax_mtl.value_and_jacobian(problems.task_losses)
  chunked = optax_mtl.value_and_jacobian(problems.task_losses, batch_size=2)
  assert_trees_close(jax.jit(full)(params, x, y), jax.jit(chunked)(params, x, y), rtol=1e-6, atol=1e-7)


def test_has_aux():
  params, x, y = setup()

  def fun(params, x, y):
    losses = problems.task_losses(params, x, y)
    return losses, {"total": jnp.sum(losses)}

  (losses, aux), jac = optax_mtl.value_and_jacobian(fun, has_aux=True)(params, x, y)
  np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
  grads = optax_mtl.task_gradients(fun, has_aux=True)(params, x, y)
  np.testing.assert_allclose(grads.aux["total"], aux["total"], rtol=1e-6)
  streamed = optax_mtl.task_gradients(fun, has_aux=True, store_jacobian=False)(params, x, y)
  np.testing.assert_allclose(streamed.aux["total"], aux["total"], rtol=1e-6)
  assert_trees_close(grads.jacobian(), jac)


@pytest.mark.parametrize("shared", [None, problems.is_shared], ids=["all-shared", "heads"])
@pytest.mark.parametrize("store_jacobian", [True, False], ids=["jacobian", "streamed"])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_lazy_gradients_equal_the_explicit_tree(shared, store_jacobian, batch_size):
  params, x, y = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, shared=shared)
  losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
  expected, expected_state = tx.update(jac, tx.init(params), params, task_losses=losses)

  @jax.jit
  def lazy_step(params, x, y):
    grads = optax_mtl.task_gradients(
        problems.task_losses, batch_size=batch_size, store_jacobian=store_jacobian)(params, x, y)
    return tx.update(grads, tx.init(params), params)

  updates, state = lazy_step(params, x, y)
  assert_trees_close(updates, expected)
  np.testing.assert_allclose(state.weights, expected_state.weights, rtol=2e-5)


def test_lazy_gradients_with_a_method_that_ignores_the_gram_take_one_backward_pass():
  params, x, y = setup()
  tx = optax_mtl.linear_scalarization(K, jnp.array([0.5, 1.0, 2.0]))
  grads = optax_mtl.task_gradients(problems.task_losses)(params, x, y)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = jax.grad(lambda p: jnp.dot(jnp.array([0.5, 1.0, 2.0]), problems.task_losses(p, x, y)))(params)
  assert_trees_close(updates, expected)
  # Structural check of "one backward pass": same FLOPs as the plain gradient.
  lazy = jax.jit(lambda p: tx.update(optax_mtl.task_gradients(problems.task_losses)(p, x, y), tx.init(p), p)[0])
  plain = jax.jit(jax.grad(lambda p: jnp.sum(problems.task_losses(p, x, y))))
  flops = lambda f: f.lower(params).compile().cost_analysis()["flops"]
  assert flops(lazy) < 1.2 * flops(plain)


def test_cached_weights_in_one_jitted_step_equal_the_full_path():
  """update_weights_every=3: K backward passes on refresh steps, one in between."""
  params, x, y = setup()
  every = 3
  lazy_tx = optax.chain(optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=every), optax.sgd(0.05))
  full_tx = optax.chain(optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=every), optax.sgd(0.05))

  @jax.jit
  def lazy_step(params, state, x, y):
    grads = optax_mtl.task_gradients(problems.task_losses)(params, x, y)
    updates, state = lazy_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def full_step(params, state, x, y):
    losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
    updates, state = full_tx.update(jac, state, params, task_losses=losses)
    return optax.apply_updates(params, updates), state

  lazy_params, lazy_state = params, lazy_tx.init(params)
  full_params, full_state = params, full_tx.init(params)
  for t in range(7):
    x, y = problems.make_batch(seed=20 + t)
    lazy_params, lazy_state = lazy_step(lazy_params, lazy_state, x, y)
    full_params, full_state = full_step(full_params, full_state, x, y)
    assert_trees_close(lazy_params, full_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lazy_state[0].weights, full_state[0].weights, rtol=1e-5)
  assert lazy_step._cache_size() == 1
  # The cached branch is the weighted backward pass: its FLOPs are about 1/K of the refresh.
  # batch_size=K: vectorised, since XLA's cost analysis counts a loop body once.
  grads_at = lambda p: optax_mtl.task_gradients(problems.task_losses, batch_size=K)(p, x, y)
  w = jnp.ones(K)
  cached = jax.jit(lambda p: grads_at(p).weighted_update(w))
  refresh = jax.jit(lambda p: grads_at(p).gram_and_update(None, lambda m: (inverse_norm(m), ()))[0])
  flops = lambda f: f.lower(params).compile().cost_analysis()["flops"]
  assert flops(cached) * 1.5 < flops(refresh)


def test_cached_steps_run_the_weighted_backward_pass_outside_the_cond():
  """Only the weights are chosen under ``lax.cond``; the backward pass of ``sum_i w_i L_i`` follows it.

  XLA:CPU compiles gradient convolutions inside a conditional branch without
  its fast path (a conv net's backward pass ran 8x slower there; jax#12868),
  so a weighted backward pass under the cond made every cached step as slow
  as a refresh.
  """
  params, x, y = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=5, shared=problems.is_shared)
  update = lambda p, s: tx.update(optax_mtl.task_gradients(problems.task_losses)(p, x, y), s, p)
  jaxpr = jax.make_jaxpr(update)(params, tx.init(params)).jaxpr
  conds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
  assert len(conds) == 1
  reuse, refresh = conds[0].params["branches"]
  primitives = lambda closed: {eqn.primitive.name for eqn in closed.jaxpr.eqns}
  assert "dot_general" in primitives(refresh)  # the K backward passes and the Gram
  assert "dot_general" not in primitives(reuse)
  after = jaxpr.eqns[jaxpr.eqns.index(conds[0]) + 1:]
  assert any(eqn.primitive.name == "dot_general" for eqn in after)  # the weighted backward pass


def test_a_caller_scheduled_refresh_equals_the_cond_and_runs_at_top_level():
  """``refresh_weights`` as a static argument: the two kinds of step compile apart, without a cond.

  On the cond's schedule (every 3rd step) the trajectory is the cond path's;
  the reusing step is one backward pass, the refreshing one the K backward
  passes, both in the step's own computation.
  """
  params, x, y = setup()
  make_tx = lambda: optax.chain(
      optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=3, shared=problems.is_shared),
      optax.sgd(0.05))
  cond_tx, host_tx = make_tx(), make_tx()

  def step(tx, params, state, x, y, **kw):
    grads = optax_mtl.task_gradients(problems.task_losses, batch_size=K)(params, x, y)
    updates, state = tx.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), state

  cond_step = jax.jit(functools.partial(step, cond_tx))
  host_step = jax.jit(functools.partial(step, host_tx), static_argnames="refresh_weights")
  cond_params, cond_state = params, cond_tx.init(params)
  host_params, host_state = params, host_tx.init(params)
  for t in range(7):
    x, y = problems.make_batch(seed=50 + t)
    cond_params, cond_state = cond_step(cond_params, cond_state, x, y)
    host_params, host_state = host_step(host_params, host_state, x, y, refresh_weights=t % 3 == 0)
    assert_trees_close(host_params, cond_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host_state[0].weights, cond_state[0].weights, rtol=1e-5)
  assert host_step._cache_size() == 2
  assert int(host_state[0].count) == int(cond_state[0].count) == 7

  lowered = {refresh: jax.jit(lambda p, s, refresh=refresh: step(host_tx, p, s, x, y, refresh_weights=refresh))
             for refresh in (True, False)}
  for fn in lowered.values():
    assert "cond" not in {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(params, host_state).jaxpr.eqns}
  flops = {refresh: fn.lower(params, host_state).compile().cost_analysis()["flops"] for refresh, fn in lowered.items()}
  plain = jax.jit(jax.grad(lambda p: jnp.sum(problems.task_losses(p, x, y)))).lower(params).compile()
  assert flops[False] < 1.3 * plain.cost_analysis()["flops"]  # one backward pass
  assert flops[False] * 1.5 < flops[True]  # the K backward passes


encoder = problems.encoder
heads_per_task = problems.heads_per_task


def heads(params, z, x, y):
  del x
  preds = jnp.stack([z @ params["heads"][f"task{i}"] for i in range(K)], axis=-1)
  return jnp.mean((preds - y) ** 2, axis=0)


def test_feature_level_update_is_the_weighted_gradient_of_the_representation_gram():
  params, x, y = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm)
  grads_fn = optax_mtl.feature_task_gradients(encoder, heads)
  updates, state = jax.jit(lambda p: tx.update(grads_fn(p, x, y), tx.init(p), p))(params)
  grads = grads_fn(params, x, y)
  z = encoder(params, x, y)
  jac_z = jax.jacrev(lambda rep: heads(params, rep, x, y))(z)  # (K, batch, hidden)
  w = inverse_norm(optax_mtl.gram({"z": jac_z}))
  np.testing.assert_allclose(state.weights, w, rtol=1e-5)
  expected = jax.grad(lambda p: jnp.dot(w, problems.task_losses(p, x, y)))(params)
  assert_trees_close(updates, expected)
  assert grads.jacobian().shape == (K, *z.shape)


def test_feature_level_with_identity_encoder_equals_the_full_path():
  params, x, y = setup()
  identity = lambda params, x, y: params["trunk"]

  def heads_of_trunk(params, trunk, x, y):
    return problems.task_losses(dict(params, trunk=trunk), x, y)

  tx = optax_mtl.weighted_aggregation(K, inverse_norm, shared=problems.is_shared)
  grads = optax_mtl.feature_task_gradients(identity, heads_of_trunk)(params, x, y)
  updates, state = tx.update(grads, tx.init(params), params)
  losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(params, x, y)
  expected, expected_state = tx.update(jac, tx.init(params), params, task_losses=losses)
  assert_trees_close(updates, expected)
  np.testing.assert_allclose(state.weights, expected_state.weights, rtol=1e-5)


def test_feature_level_cached_weights():
  params, x, y = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=2)
  step = jax.jit(lambda p, s, x, y: tx.update(optax_mtl.feature_task_gradients(encoder, heads)(p, x, y), s, p))
  state = tx.init(params)
  _, state = step(params, state, x, y)
  # The first step refreshes from the representation Gram of its own batch (not the initial ones).
  z = encoder(params, x, y)
  jac_z = jax.jacrev(lambda rep: heads(params, rep, x, y))(z)
  np.testing.assert_allclose(state.weights, inverse_norm(optax_mtl.gram({"z": jac_z})), rtol=1e-5)
  assert not np.allclose(state.weights, 1.0)
  x2, y2 = problems.make_batch(seed=7)
  updates, state2 = step(params, state, x2, y2)
  np.testing.assert_array_equal(state2.weights, state.weights)
  expected = jax.grad(lambda p: jnp.dot(state.weights, problems.task_losses(p, x2, y2)))(params)
  assert_trees_close(updates, expected)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("path", ["task_gradients", "feature_level"])
def test_half_precision_losses_take_weights_beyond_their_range(path, dtype):
  """The weighted backward pass runs in the losses' dtype; weights up to 2e5 (float16 ends at 65504)."""
  params, x, y = setup()
  weights = jnp.array([7e4, 1e5, 2e5])
  half = lambda fn: lambda *args: fn(*args).astype(dtype)
  if path == "task_gradients":
    grads_fn = optax_mtl.task_gradients(half(problems.task_losses))
  else:
    grads_fn = optax_mtl.feature_task_gradients(encoder, half(heads))
  tx = optax_mtl.weighted_aggregation(K, lambda gram: weights, update_weights_every=2)
  step = jax.jit(lambda state: tx.update(grads_fn(params, x, y), state, params))
  expected = jax.grad(lambda p: jnp.dot(weights, problems.task_losses(p, x, y)))(params)
  state = tx.init(params)
  for _ in range(2):  # a refresh, then a cached step (one weighted backward pass)
    updates, state = step(state)
    assert int(state.nonfinite_count) == 0
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(u, e, rtol=0, atol=4 * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(e))))


def stacked_heads_per_task(params, zs, x, y):
  """The same heads as one ``jax.vmap`` over stacked head weights and ``jnp.stack(zs)``."""
  del x
  weights = jnp.stack([params["heads"][f"task{i}"] for i in range(K)])
  preds = jax.vmap(jnp.matmul)(jnp.stack(zs), weights)  # (K, batch)
  return jnp.mean((preds - y.T) ** 2, axis=1)


PER_TASK_TRANSFORMS = {
    "inverse_norm": lambda: optax_mtl.weighted_aggregation(K, inverse_norm),
    "mgda": lambda: optax_mtl.mgda(K),
    "nash_mtl": lambda: optax_mtl.nash_mtl(K),
    # other weights on the task-specific leaves: the path that sums the K
    # representation cotangents of a weighted pass through the heads
    "aligned_mtl_shared": lambda: optax_mtl.aligned_mtl(K, shared=problems.is_shared),
    "cached": lambda: optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=2),
    "graddrop": lambda: optax_mtl.graddrop(K, key=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("per_task", [heads_per_task, stacked_heads_per_task], ids=["list", "vmap"])
@pytest.mark.parametrize("name", sorted(PER_TASK_TRANSFORMS))
def test_per_task_heads_equal_the_generic_heads(name, per_task):
  params, x, y = setup()
  x2, y2 = problems.make_batch(seed=7)
  tx = PER_TASK_TRANSFORMS[name]()
  generic = optax_mtl.feature_task_gradients(encoder, heads)
  split = optax_mtl.feature_task_gradients(encoder, per_task, per_task_heads=K)
  run = lambda grads_fn: jax.jit(lambda p, s, x, y: tx.update(grads_fn(p, x, y), s, p))
  state_a = state_b = tx.init(params)
  for batch in ((x, y), (x2, y2)):  # a refresh and a cached step for update_weights_every=2
    expected, state_a = run(generic)(params, state_a, *batch)
    updates, state_b = run(split)(params, state_b, *batch)
    assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
      np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=1e-5, atol=1e-6)
  jac = split(params, x, y).jacobian()
  np.testing.assert_allclose(jac, generic(params, x, y).jacobian(), rtol=1e-6, atol=1e-7)
  assert jac.shape == (K, *encoder(params, x, y).shape)


@pytest.mark.slow
def test_per_task_heads_step_never_stacks_the_representation_gradients():
  """A representation of two 16384-column blocks and a remainder: the blocked Gram of the K copies.

  The update equals the generic heads' and, on CPU, no ``(K, batch, width)``
  array is formed: the Gram and the combination read the K copies in place.
  """
  num_tasks, batch, width = 3, 64, 520
  rng = np.random.default_rng(2)
  params = {"trunk": jnp.asarray(rng.normal(size=(6, width)) / 3, jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(num_tasks, width)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(batch, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(num_tasks, batch)), jnp.float32)
  enc = lambda p, x, y: jnp.tanh(x @ p["trunk"])
  head = lambda w, z, t: jnp.mean((z @ w - t) ** 2)
  generic = lambda p, z, x, y: jnp.stack([head(p["heads"][i], z, y[i]) for i in range(num_tasks)])
  split = lambda p, zs, x, y: jnp.stack([head(p["heads"][i], zs[i], y[i]) for i in range(num_tasks)])
  tx = optax_mtl.mgda(num_tasks)
  step = lambda grads_fn: jax.jit(lambda p: tx.update(grads_fn(p, x, y), tx.init(p), p)[0])
  split_step = step(optax_mtl.feature_task_gradients(enc, split, per_task_heads=num_tasks))
  assert_trees_close(split_step(params), step(optax_mtl.feature_task_gradients(enc, generic))(params),
                     rtol=1e-5, atol=1e-6)
  if jax.default_backend() == "cpu":
    program = split_step.lower(params).compile().as_text()
    assert f"f32[{num_tasks},{batch},{width}]" not in program
    assert f"f32[{num_tasks},{batch * width}]" not in program


def heavy_heads(num_tasks=8, width=64):
  """8 two-layer heads on a cheap linear encoder: head work dominates the flops."""
  rng = np.random.default_rng(0)
  params = {"trunk": jnp.asarray(rng.normal(size=(4, width)), jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(num_tasks, width, width)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  enc = lambda p, x: x @ p["trunk"]
  head = lambda w, z: jnp.mean(jnp.tanh(jnp.tanh(z @ w) @ w) ** 2)
  generic = lambda p, z, x: jnp.stack([head(p["heads"][i], z) for i in range(num_tasks)])
  split = lambda p, zs, x: jax.vmap(head)(p["heads"], jnp.stack(zs))
  return num_tasks, params, x, enc, generic, split


def flops(jitted, *args):
  return jitted.lower(*args).compile().cost_analysis()["flops"]


def test_per_task_heads_cost_one_backward_pass_of_the_heads():
  """Head work linear in K, not quadratic: heavy heads on a cheap encoder, counted in flops."""
  num_tasks, params, x, enc, generic, split = heavy_heads()
  jacobian = lambda grads_fn: jax.jit(lambda p: grads_fn(p, x).jacobian())
  generic_flops = flops(jacobian(optax_mtl.feature_task_gradients(enc, generic)), params)
  split_flops = flops(jacobian(optax_mtl.feature_task_gradients(enc, split, per_task_heads=num_tasks)), params)
  forward_flops = flops(jax.jit(lambda p: generic(p, enc(p, x), x)), params)
  # the generic path backpropagates K cotangents through all K heads
  # (measured: split 2.0x, generic 9.2x the forward flops at K = 8)
  assert split_flops < 3 * forward_flops
  assert generic_flops > 6 * forward_flops


def test_per_task_heads_with_aux():
  params, x, y = setup()

  def per_task_with_aux(params, zs, x, y):
    losses = heads_per_task(params, zs, x, y)
    return losses, {"sum": jnp.sum(losses)}

  grads = optax_mtl.feature_task_gradients(encoder, per_task_with_aux, has_aux=True, per_task_heads=K)(params, x, y)
  np.testing.assert_allclose(grads.aux["sum"], jnp.sum(problems.task_losses(params, x, y)), rtol=1e-6)


def test_per_task_heads_errors():
  params, x, y = setup()
  for bad in (0, -1, True, 2.0, "3"):
    with pytest.raises(ValueError, match="per_task_heads must be None or a positive int"):
      optax_mtl.feature_task_gradients(encoder, heads_per_task, per_task_heads=bad)
  with pytest.raises(ValueError, match=r"losses of shape \(3,\) but per_task_heads=4"):
    optax_mtl.feature_task_gradients(encoder, lambda p, zs, x, y: heads_per_task(p, zs[:K], x, y),
                                     per_task_heads=4)(params, x, y)


def test_errors():
  params, x, y = setup()
  tx = optax_mtl.weighted_aggregation(4, inverse_norm)
  grads = optax_mtl.task_gradients(problems.task_losses)(params, x, y)
  with pytest.raises(ValueError, match=r"losses of shape \(3,\); expected \(4,\)"):
    tx.update(grads, tx.init(params), params)
  tx3 = optax_mtl.weighted_aggregation(K, inverse_norm)
  with pytest.raises(ValueError, match="structure of the params"):
    tx3.update(grads, tx3.init({"a": jnp.zeros(2)}), {"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match="store_jacobian=True"):
    optax_mtl.task_gradients(problems.task_losses, store_jacobian=False)(params, x, y).jacobian()
  with pytest.raises(ValueError, match="batch_size"):
    optax_mtl.value_and_jacobian(problems.task_losses, batch_size=0)
  with pytest.raises(ValueError, match=r"\(K,\) vector of task losses"):
    optax_mtl.value_and_jacobian(lambda p, x, y: jnp.sum(problems.task_losses(p, x, y)))(params, x, y)


def test_streamed_gram_never_holds_the_jacobian():
  # XLA's buffer assignment bounds what a step keeps live: the streamed Gram's
  # temporaries stay far below the K x params Jacobian that the stored mode needs.
  k, width = 16, 256
  params = {"w1": jnp.zeros((width, width)), "w2": jnp.zeros((width, width)), "heads": jnp.zeros((width, k))}

  def losses_fn(p, x):
    h = jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"])
    return jnp.mean((h @ p["heads"]) ** 2, axis=0)

  tx = optax_mtl.nash_mtl(k, shared={"w1": True, "w2": True, "heads": False})
  state, x = tx.init(params), jnp.ones((8, width))

  def temp_bytes(store_jacobian):
    def step(params, state, x):
      grads = optax_mtl.task_gradients(losses_fn, store_jacobian=store_jacobian)(params, x)
      return tx.update(grads, state, params)

    return jax.jit(step).lower(params, state, x).compile().memory_analysis().temp_size_in_bytes

  shared_jacobian_bytes = k * 2 * width * width * 4
  assert temp_bytes(True) >= shared_jacobian_bytes
  assert temp_bytes(False) < shared_jacobian_bytes / 4


def test_batch_size_picks_vectorised_or_sequential_backward_passes():
  params, x, y = setup()

  def program(batch_size):
    return str(jax.make_jaxpr(optax_mtl.value_and_jacobian(problems.task_losses, batch_size=batch_size))(params, x, y))

  assert "scan" not in program(None) and "scan" not in program(K)
  assert "scan" in program(1)


PARAMETER_LEVEL_TRANSFORMS = {
    "mgda": lambda shared: optax_mtl.mgda(K, shared=shared),
    "nash_mtl_cached": lambda shared: optax_mtl.nash_mtl(K, shared=shared, update_weights_every=2),
    "aligned_mtl": lambda shared: optax_mtl.aligned_mtl(K, shared=shared),
    "graddrop": lambda shared: optax_mtl.graddrop(K, key=3, shared=shared),
}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("shared", [None, problems.is_shared], ids=["all", "shared"])
@pytest.mark.parametrize("per_task", [None, heads_per_task, stacked_heads_per_task], ids=["generic", "list", "vmap"])
@pytest.mark.parametrize("name", sorted(PARAMETER_LEVEL_TRANSFORMS))
def test_parameter_level_equals_the_full_path(name, per_task, shared, batch_size):
  """``level="parameters"``: the per-task path's updates and states, step after step."""
  params, x, y = setup()
  x2, y2 = problems.make_batch(seed=7)
  tx = PARAMETER_LEVEL_TRANSFORMS[name](shared)
  grads_fn = optax_mtl.feature_task_gradients(
      encoder, heads if per_task is None else per_task, per_task_heads=None if per_task is None else K,
      batch_size=batch_size, level="parameters")
  step = jax.jit(lambda p, s, x, y: tx.update(grads_fn(p, x, y), s, p))

  @jax.jit
  def explicit_step(p, s, x, y):
    losses, jac = optax_mtl.value_and_jacobian(problems.task_losses)(p, x, y)
    return tx.update(jac, s, p, task_losses=losses)

  state_a = state_b = tx.init(params)
  for batch in ((x, y), (x2, y2)):  # with update_weights_every=2: a refresh, then a cached step
    expected, state_a = explicit_step(params, state_a, *batch)
    updates, state_b = step(params, state_b, *batch)
    assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
      np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 1])
def test_parameter_level_jacobian_is_exact_where_the_heads_read_shared_leaves(batch_size):
  """A shared leaf read by the heads directly gets that part too, not only the one through ``z``."""
  params, x, y = setup()

  def heads_reading_the_trunk(params, zs, x, y):
    return heads_per_task(params, [z * (1.0 + params["trunk"]["b"][None, :]) for z in zs], x, y)

  fun = lambda p, x, y: heads_reading_the_trunk(p, [encoder(p, x, y)] * K, x, y)
  grads = optax_mtl.feature_task_gradients(encoder, heads_reading_the_trunk, per_task_heads=K,
                                           batch_size=batch_size, level="parameters")(params, x, y)
  expected = jax.jacrev(fun)(params, x, y)
  direct = jax.jacrev(lambda p: heads_reading_the_trunk(p, [encoder(params, x, y)] * K, x, y))(params)
  assert float(jnp.max(jnp.abs(direct["trunk"]["b"]))) > 1e-2  # the heads' own part is not negligible
  assert_trees_close(jax.jit(grads.jacobian)(), expected, rtol=1e-5, atol=1e-6)
  tx = optax_mtl.mgda(K, shared=problems.is_shared)
  updates, state = tx.update(grads, tx.init(params), params)
  expected_updates, expected_state = tx.update(expected, tx.init(params), params, task_losses=grads.losses)
  assert_trees_close(updates, expected_updates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.weights, expected_state.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parameter_level_costs_one_backward_pass_of_the_heads():
  """The shared Gram without K^2 head backward passes: heavy heads on a cheap encoder, in flops."""
  num_tasks, params, x, enc, generic, split = heavy_heads()
  tx = optax_mtl.mgda(num_tasks, shared={"trunk": True, "heads": False})
  step = lambda grads_fn: jax.jit(lambda p: tx.update(grads_fn(p, x), tx.init(p), p)[0])
  through_z = step(optax_mtl.feature_task_gradients(enc, split, per_task_heads=num_tasks, level="parameters"))
  full = step(optax_mtl.task_gradients(lambda p, x: generic(p, enc(p, x), x)))
  assert_trees_close(through_z(params), full(params), rtol=1e-4, atol=1e-6)
  forward_flops = flops(jax.jit(lambda p: generic(p, enc(p, x), x)), params)
  # measured: 3.6x the forward flops through z, 10.8x on the full path at K = 8
  assert flops(through_z, params) < 5 * forward_flops
  assert flops(full, params) > 8 * forward_flops


def test_level_errors():
  with pytest.raises(ValueError, match="level must be 'representation' or 'parameters'"):
    optax_mtl.feature_task_gradients(encoder, heads, level="params")
