"""The generic builder weighted_aggregation (optax_mtl._src.aggregation)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
import problems

K = problems.NUM_TASKS


def setup(seed=1):
  params = problems.init_params()
  losses, jac = problems.per_task_gradients(params, *problems.make_batch(seed=seed))
  return params, jac, losses


def inverse_norm(gram):
  return 1.0 / jnp.sqrt(jnp.diag(gram))


def test_stateless_weighting_is_gram_then_combine():
  params, jac, losses = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params)
  w = inverse_norm(optax_mtl.gram(jac))
  expected = optax_mtl.combine(w, jac)
  for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.weights, w, rtol=1e-5, atol=1e-7)
  assert int(state.count) == 1


def test_shared_mask_restricts_the_gram_only():
  params, jac, _ = setup()
  seen = []

  def record(gram):
    seen.append(gram)
    return inverse_norm(gram)

  tx = optax_mtl.weighted_aggregation(K, record, shared=problems.is_shared)
  updates, state = tx.update(jac, tx.init(params), params)
  trunk_gram = optax_mtl.gram(jac, mask={"trunk": True, "heads": False})
  np.testing.assert_allclose(seen[0], trunk_gram, rtol=1e-5, atol=1e-7)
  # Task-specific leaves still receive their w-weighted gradients.
  np.testing.assert_allclose(updates["heads"]["task1"], state.weights[1] * jac["heads"]["task1"][1], rtol=1e-5, atol=1e-7)


def test_stateful_weighting_threads_its_state_and_losses():
  params, jac, losses = setup()

  def init(num_tasks, dtype):
    return {"calls": jnp.zeros([], jnp.int32), "last_losses": jnp.zeros((num_tasks,), dtype)}

  def update(gram, state, task_losses):
    del gram
    return jax.nn.softmax(task_losses), {"calls": state["calls"] + 1, "last_losses": task_losses}

  tx = optax_mtl.weighted_aggregation(
      K, optax_mtl.Weighting(init, update, needs_gram=False, needs_task_losses=True))
  state = tx.init(params)
  for _ in range(2):
    _, state = jax.jit(tx.update)(jac, state, params, task_losses=losses)
  assert int(state.weighting_state["calls"]) == 2
  np.testing.assert_allclose(state.weighting_state["last_losses"], losses)
  np.testing.assert_allclose(state.weights, jax.nn.softmax(losses), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="needs the per-task losses"):
    tx.update(jac, state, params)


@pytest.mark.parametrize("every", [1, 3])
def test_a_weighting_must_keep_its_state_dtypes_and_return_k_weights(every):
  params, jac, losses = setup()
  init = lambda num_tasks, dtype: {"calls": jnp.zeros([], jnp.int32)}
  drifting = lambda gram, state, task_losses: (jnp.ones(K), {"calls": state["calls"] + 0.5})
  extra_leaf = lambda gram, state, task_losses: (jnp.ones(K), {**state, "more": jnp.zeros(())})
  tx = optax_mtl.weighted_aggregation(K, optax_mtl.Weighting(init, drifting), update_weights_every=every)
  with pytest.raises(TypeError, match=r"changed state leaf calls from int32\[\] to float32\[\]"):
    tx.update(jac, tx.init(params), params)
  tx = optax_mtl.weighted_aggregation(K, optax_mtl.Weighting(init, extra_leaf), update_weights_every=every)
  with pytest.raises(TypeError, match="returned a state of structure"):
    tx.update(jac, tx.init(params), params)
  for bad in (lambda gram: jnp.ones((K, 1)), lambda gram: jnp.ones(K + 1), lambda gram: jnp.ones(())):
    tx = optax_mtl.weighted_aggregation(K, bad, update_weights_every=every)
    with pytest.raises(ValueError, match=f"expected \\({K},\\)"):
      tx.update(jac, tx.init(params), params)


@pytest.mark.parametrize("traced", [False, True])
def test_update_weights_every_reuses_the_last_weights(traced):
  params = problems.init_params()
  factory = optax_mtl.weighted_aggregation
  if traced:
    factory = optax.inject_hyperparams(factory, static_args=("num_tasks", "weighting"))
  tx = factory(K, inverse_norm, update_weights_every=3)
  state = tx.init(params)
  history = []
  step = jax.jit(tx.update)
  for t in range(7):
    _, jac = problems.per_task_gradients(params, *problems.make_batch(seed=10 + t))
    updates, state = step(jac, state, params)
    history.append(np.asarray(optax.tree.get(state, "weights")))
    fresh = inverse_norm(optax_mtl.gram(jac))
    if t % 3 == 0:
      np.testing.assert_allclose(history[-1], fresh, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_array_equal(history[-1], history[t - t % 3])
      assert not np.allclose(history[-1], fresh, rtol=1e-3)
    expected = optax_mtl.combine(history[-1], jac)
    np.testing.assert_allclose(updates["trunk"]["w"], expected["trunk"]["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["static", "traced", "inject_hyperparams"])
def test_refresh_weights_from_the_caller_overrides_the_schedule(kind):
  # The caller refreshes at steps 0, 2, 3 and 6 while update_weights_every=3 would say 0, 3, 6.
  params = problems.init_params()
  factory = optax_mtl.weighted_aggregation
  if kind == "inject_hyperparams":
    factory = optax.inject_hyperparams(factory, static_args=("num_tasks", "weighting"))
  tx = factory(K, inverse_norm, update_weights_every=3)
  state = tx.init(params)
  if kind == "traced":
    step = jax.jit(lambda jac, state, refresh: tx.update(jac, state, params, refresh_weights=refresh))
  else:
    step = jax.jit(lambda jac, state, refresh: tx.update(jac, state, params, refresh_weights=refresh),
                   static_argnums=2)
  weights = np.ones(K)
  for t in range(7):
    _, jac = problems.per_task_gradients(params, *problems.make_batch(seed=40 + t))
    refresh = t in (0, 2, 3, 6)
    updates, state = step(jac, state, jnp.asarray(refresh) if kind == "traced" else refresh)
    if refresh:
      np.testing.assert_allclose(optax.tree.get(state, "weights"), inverse_norm(optax_mtl.gram(jac)),
                                 rtol=1e-5, atol=1e-7)
      weights = np.asarray(optax.tree.get(state, "weights"))
    else:
      np.testing.assert_array_equal(optax.tree.get(state, "weights"), weights)
    inner = state.inner_state if kind == "inject_hyperparams" else state
    assert int(inner.count) == t + 1
    expected = optax_mtl.combine(weights, jac)
    np.testing.assert_allclose(updates["trunk"]["w"], expected["trunk"]["w"], rtol=1e-5, atol=1e-7)
  assert step._cache_size() == (1 if kind == "traced" else 2)


def test_a_static_refresh_weights_compiles_no_conditional():
  params, jac, _ = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=3)
  primitives = lambda **kw: {eqn.primitive.name for eqn in jax.make_jaxpr(
      lambda j, s: tx.update(j, s, params, **kw))(jac, tx.init(params)).jaxpr.eqns}
  assert "cond" in primitives()
  assert "cond" in primitives(refresh_weights=jnp.asarray(True))
  assert "cond" not in primitives(refresh_weights=True)
  assert "cond" not in primitives(refresh_weights=np.bool_(False))
  assert "cond" not in primitives(refresh_weights=np.asarray(True))  # host data: static too


def test_the_loops_schedule_does_not_retry_a_skipped_refresh():
  # The documented difference from the cond: a refresh skipped for NaN input is not retried
  # until the loop says True again; until then the initial weights stay.
  params, jac, _ = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm)
  poisoned = dict(jac, trunk=dict(jac["trunk"], w=jac["trunk"]["w"].at[0, 1, 1].set(jnp.nan)))
  step = jax.jit(lambda jac, state, refresh: tx.update(jac, state, params, refresh_weights=refresh),
                 static_argnums=2)
  updates, state = step(poisoned, tx.init(params), True)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert (int(state.count), int(state.nonfinite_count)) == (0, 1)
  updates, state = step(jac, state, False)
  np.testing.assert_array_equal(state.weights, np.ones(K))
  assert (int(state.count), int(state.nonfinite_count)) == (1, 1)
  np.testing.assert_allclose(updates["trunk"]["w"], optax_mtl.combine(np.ones(K), jac)["trunk"]["w"], rtol=1e-6)
  _, state = step(jac, state, True)
  np.testing.assert_allclose(state.weights, inverse_norm(optax_mtl.gram(jac)), rtol=1e-5)


@pytest.mark.parametrize("bad", [1, jnp.ones((2,), bool), jnp.asarray(1.0), "yes"])
def test_refresh_weights_must_be_a_bool(bad):
  params, jac, _ = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=3)
  with pytest.raises(TypeError, match="refresh_weights must be None, a Python bool"):
    tx.update(jac, tx.init(params), params, refresh_weights=bad)


@pytest.mark.parametrize("period", [0, -2])
def test_a_traced_period_below_one_refreshes_every_step(period):
  params = problems.init_params()
  factory = optax.inject_hyperparams(optax_mtl.weighted_aggregation, static_args=("num_tasks", "weighting"))
  tx = factory(K, inverse_norm, update_weights_every=3)
  state = tx.init(params)
  state.hyperparams["update_weights_every"] = jnp.asarray(period, state.hyperparams["update_weights_every"].dtype)
  step = jax.jit(tx.update)
  for t in range(3):
    _, jac = problems.per_task_gradients(params, *problems.make_batch(seed=30 + t))
    _, state = step(jac, state, params)
    np.testing.assert_allclose(optax.tree.get(state, "weights"), inverse_norm(optax_mtl.gram(jac)), rtol=1e-5)


def test_initial_weights_and_validation():
  params = problems.init_params()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, initial_weights=jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(tx.init(params).weights, [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(optax_mtl.weighted_aggregation(K, inverse_norm).init(params).weights, np.ones(K))
  with pytest.raises(ValueError, match="update_weights_every"):
    optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=0)
  with pytest.raises(ValueError, match=r"initial_weights must have shape \(3,\)"):
    optax_mtl.weighted_aggregation(K, inverse_norm, initial_weights=jnp.ones(2)).init(params)


@pytest.mark.parametrize("bad", ["nan_gradient", "inf_gradient", "nan_loss", "overflow"])
def test_nonfinite_input_is_skipped_and_counted(bad):
  params, jac, losses = setup()
  if bad == "nan_gradient":
    jac = dict(jac, trunk=dict(jac["trunk"], w=jac["trunk"]["w"].at[1, 0, 0].set(jnp.nan)))
  elif bad == "inf_gradient":
    jac = dict(jac, trunk=dict(jac["trunk"], b=jac["trunk"]["b"].at[0, 3].set(jnp.inf)))
  elif bad == "nan_loss":
    losses = losses.at[2].set(jnp.nan)
  else:  # squared norms beyond float32's range: the Gram overflows
    jac = jax.tree.map(lambda g: g * 1e25, jac)
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, initial_weights=jnp.array([1.0, 2.0, 3.0]))
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(jac, state, params, task_losses=losses)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  np.testing.assert_array_equal(new_state.weights, state.weights)
  assert int(new_state.count) == 0 and int(new_state.nonfinite_count) == 1
  # A finite step afterwards proceeds normally.
  _, good_jac = problems.per_task_gradients(params, *problems.make_batch())
  _, after = tx.update(good_jac, new_state, params)
  assert int(after.count) == 1 and int(after.nonfinite_count) == 1


def test_nonfinite_propagate_lets_apply_if_finite_skip_the_optimizer():
  params, jac, losses = setup()
  jac = dict(jac, heads=dict(jac["heads"], task0=jac["heads"]["task0"] * jnp.nan))
  tx = optax.chain(optax_mtl.weighted_aggregation(K, inverse_norm, nonfinite="propagate"),
                   optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5))
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(jac, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  aggregation_state, guarded = new_state
  assert int(aggregation_state.nonfinite_count) == 1 and int(aggregation_state.count) == 0
  np.testing.assert_array_equal(aggregation_state.weights, state[0].weights)
  assert int(guarded.notfinite_count) == 1
  # Adam's moments are untouched.
  for a, b in zip(jax.tree.leaves(guarded.inner_state), jax.tree.leaves(state[1].inner_state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="nonfinite"):
    optax_mtl.weighted_aggregation(K, inverse_norm, nonfinite="ignore")


def _compiled_ands(make, num_leaves):
  """The ``and`` ops in the compiled train step of ``make(2)`` + Adam on a ``num_leaves``-leaf tree."""
  params = {f"leaf{i:03d}": jnp.full((4,), 1.0 + i) for i in range(num_leaves)}

  def losses(p):
    return jnp.stack([sum(jnp.sum(v**2) for v in p.values()), sum(jnp.sum(v) for v in p.values())])

  tx = optax.chain(make(2), optax.adam(1e-3))

  def step(p, s):
    values, jac = optax_mtl.value_and_jacobian(losses)(p)
    updates, s = tx.update(jac, s, p, task_losses=values)
    return optax.apply_updates(p, updates), s

  return jax.jit(step).lower(params, tx.init(params)).compile().as_text().count(" and(")


@pytest.mark.slow
@pytest.mark.parametrize("make", [optax_mtl.linear_scalarization, optax_mtl.nash_mtl,
                                  lambda k: optax_mtl.graddrop(k, key=0)],
                         ids=["linear_scalarization", "nash_mtl", "graddrop"])
def test_nonfinite_check_grows_the_program_linearly_in_the_leaves(make):
  # The policy's flag is read once per leaf; XLA used to copy the chain of
  # per-leaf ``and``s into each of those reads (leaves**2 ops: 8449 at 64 leaves).
  counts = [_compiled_ands(make, n) for n in (8, 16, 32)]
  assert counts[2] - counts[1] <= 2.5 * (counts[1] - counts[0]), counts


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, np.float32(3.0)])
def test_update_weights_every_must_be_a_positive_integer(bad):
  with pytest.raises((TypeError, ValueError), match="update_weights_every"):
    optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=bad)
  assert optax_mtl.weighted_aggregation(K, inverse_norm, update_weights_every=np.int64(3))


def test_task_specific_weights_as_a_function_of_w():
  params, jac, _ = setup()
  tx = optax_mtl.weighted_aggregation(K, inverse_norm, shared=problems.is_shared,
                                      task_specific_weights=lambda w: 2.0 * w)
  updates, state = tx.update(jac, tx.init(params), params)
  np.testing.assert_allclose(updates["heads"]["task1"], 2 * state.weights[1] * jac["heads"]["task1"][1], rtol=1e-6)
  constant = optax_mtl.weighted_aggregation(K, inverse_norm, shared=problems.is_shared,
                                            task_specific_weights=jnp.ones(K))
  updates, _ = constant.update(jac, constant.init(params), params)
  np.testing.assert_allclose(updates["heads"]["task0"], jac["heads"]["task0"][0], rtol=1e-6)
