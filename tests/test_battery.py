"""The common battery: every transform of the registry (transforms.py) runs it.

The quick tier (``pytest -m "not slow"``) runs the unmarked tests on each method's primary case;
the variants, and the tests marked ``slow`` (meshes, several compiled steps), run in the full suite.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl
import problems
from transforms import case_params

K = problems.NUM_TASKS
RTOL = 1e-5
ATOL = 1e-6

pytestmark = pytest.mark.parametrize("case", case_params())


def make(case, **overrides):
  return case.factory(K, **{**case.kwargs, **overrides})


@functools.lru_cache(maxsize=None)
def problem(dtype_name="float32"):
  params = problems.init_params(dtype=jnp.dtype(dtype_name))
  x, y = problems.make_batch()
  losses, jac = problems.per_task_gradients(params, x, y)
  return params, jac, losses


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


def assert_same_types(a, b):
  """Same tree structure, shapes and dtypes (what lax.cond/scan require)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (jnp.shape(u), jnp.result_type(u)) == (jnp.shape(v), jnp.result_type(v))


def test_chain_with_adam_under_jit(case):
  # Also: one trace and one compilation over steps on changing batches (no recompilation).
  params, jac, losses = problem()
  tx = optax.chain(make(case), optax.adam(1e-2))
  alone = make(case)
  traces = []

  @jax.jit
  def step(params, state, jac, losses):
    traces.append(None)
    updates, state = tx.update(jac, state, params, task_losses=losses)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  alone_state = alone.init(params)
  adam = optax.adam(1e-2)
  adam_state = adam.init(params)
  for _ in range(3):
    new_params, state, updates = step(params, state, jac, losses)
    aggregated, alone_state = alone.update(jac, alone_state, params, task_losses=losses)
    expected, adam_state = adam.update(aggregated, adam_state, params)
    assert_trees_close(updates, expected)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(new_params))
    params = new_params
    losses, jac = problems.per_task_gradients(params, *problems.make_batch())
  weights = optax.tree.get(state, "weights")
  assert weights.shape == (K,)
  assert int(state[0].count) == 3
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_unknown_extra_args_are_ignored(case):
  params, jac, losses = problem()
  tx = make(case)
  state = tx.init(params)
  plain = tx.update(jac, state, params, task_losses=losses)
  extra = tx.update(jac, state, params, task_losses=losses, batch_stats=None, step=3, label="x")
  assert_trees_close(plain, extra, rtol=0, atol=0)


@pytest.mark.slow
def test_refresh_weights_from_the_loop_matches_the_schedule(case):
  # The loop's static choice against update_weights_every=2's cond: refresh, reuse, refresh.
  params, jac, losses = problem()
  other_losses, other_jac = problems.per_task_gradients(params, *problems.make_batch(seed=5))
  batches = [(jac, losses), (other_jac, other_losses), (jac, losses)]
  if "update_weights_every" not in inspect.signature(case.factory).parameters:
    # No update_weights_every: LS and DWA weigh every step as it comes, GradDrop draws a new mask;
    # the extra arg is ignored.
    tx = make(case)
    # Weights in the state that the step would not compute: honouring False would reuse them.
    state = tx.init(params)._replace(weights=jnp.array([0.3, 2.0, 5.0]))
    plain = tx.update(jac, state, params, task_losses=losses)
    for refresh in (True, False, jnp.asarray(False)):
      assert_trees_close(tx.update(jac, state, params, task_losses=losses, refresh_weights=refresh),
                         plain, rtol=0, atol=0)
    with pytest.raises(TypeError, match="refresh_weights must be"):
      tx.update(jac, state, params, task_losses=losses, refresh_weights="yes")
    return
  scheduled, loop = make(case, update_weights_every=2), make(case, update_weights_every=1)
  scheduled_update = jax.jit(scheduled.update)
  loop_update = jax.jit(loop.update, static_argnames="refresh_weights")
  scheduled_state, loop_state = scheduled.init(params), loop.init(params)
  for t, (jac_t, losses_t) in enumerate(batches):
    expected, scheduled_state = scheduled_update(jac_t, scheduled_state, params, task_losses=losses_t)
    kept = loop_state.weights
    updates, loop_state = loop_update(jac_t, loop_state, params, task_losses=losses_t, refresh_weights=t != 1)
    assert_trees_close(updates, expected)
    assert_trees_close(loop_state, scheduled_state)
    if t == 1:  # update_weights_every=1 would refresh here; the loop said no
      np.testing.assert_array_equal(loop_state.weights, kept)
  assert int(loop_state.count) == 3
  assert loop_update._cache_size() == 2


@pytest.mark.slow
def test_inject_hyperparams(case):
  params, jac, losses = problem()
  injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)
  tx = injected(K, **case.kwargs)
  state = tx.init(params)
  assert_trees_close(
      jax.jit(tx.update)(jac, state, params, task_losses=losses)[0],
      make(case).update(jac, make(case).init(params), params, task_losses=losses)[0],
  )
  # Several steps on changing batches: some hyperparameters act only from the second step on
  # (update_weights_every, DWA's temperature after its window, learning rates, EMA rates).
  batches = [problems.per_task_gradients(params, *problems.make_batch(seed=seed))[::-1] for seed in range(1, 5)]
  for name, (first, second) in case.injectable.items():
    tx = injected(K, **{**case.kwargs, name: first})
    update = jax.jit(tx.update)
    kept = tx.init(params)
    state = tx.init(params)
    state.hyperparams[name] = jnp.asarray(second, state.hyperparams[name].dtype)
    reference = make(case, **{name: second})
    reference_state = reference.init(params)
    differs = False
    for step_jac, step_losses in batches:
      updates, state = update(step_jac, state, params, task_losses=step_losses)
      expected, reference_state = reference.update(step_jac, reference_state, params, task_losses=step_losses)
      assert_trees_close(updates, expected)
      assert_trees_close(state.inner_state, reference_state)  # keys are carried as raw key data
      unchanged, kept = update(step_jac, kept, params, task_losses=step_losses)
      differs |= not all(np.allclose(u, v, rtol=1e-4, atol=1e-6)
                         for u, v in zip(jax.tree.leaves(unchanged), jax.tree.leaves(updates)))
    assert differs, f"{name}: {first} and {second} gave the same updates"


@pytest.mark.slow
def test_partition_with_task_heads(case):
  params, jac, losses = problem()
  labels = {"trunk": "shared", "heads": "heads"}
  tx = optax.partition(
      {
          "shared": optax.chain(make(case), optax.sgd(1.0)),
          "heads": optax.chain(optax_mtl.linear_scalarization(K), optax.sgd(1.0)),
      },
      labels,
  )
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jac, state, params, task_losses=losses)
  masked = make(case, shared=problems.is_shared)
  expected, _ = masked.update(jac, masked.init(params), params, task_losses=losses)
  assert_trees_close(updates["trunk"], jax.tree.map(jnp.negative, expected["trunk"]))
  assert_trees_close(
      updates["heads"], jax.tree.map(lambda g: -jnp.sum(g, axis=0), jac["heads"]))


@pytest.mark.slow
def test_leaf_dtypes_are_kept(case):
  params, jac, losses = problem()
  params = dict(params, trunk=jax.tree.map(lambda p: p.astype(jnp.bfloat16), params["trunk"]))
  jac = dict(jac, trunk=jax.tree.map(lambda g: g.astype(jnp.bfloat16), jac["trunk"]))
  tx = make(case)
  updates, state = jax.jit(tx.update)(jac, tx.init(params), params, task_losses=losses)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
  assert state.weights.dtype == jnp.float32
  reference, _ = tx.update(*problem()[1:2], tx.init(problem()[0]), problem()[0], task_losses=losses)
  # bfloat16 keeps 8 bits: each entry within a few of its roundings of the largest one.
  for u, r in zip(jax.tree.leaves(updates["trunk"]), jax.tree.leaves(reference["trunk"])):
    scale = float(jnp.max(jnp.abs(r)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(r, np.float64), rtol=0, atol=4e-2 * scale)


@pytest.mark.slow
def test_state_types_are_stable(case):
  params, jac, losses = problem()
  tx = make(case)
  state0 = tx.init(params)
  step = jax.jit(functools.partial(tx.update, task_losses=losses))
  _, state1 = step(jac, state0, params)
  _, state2 = step(jac, state1, params)
  assert_same_types(state0, state1)
  assert_same_types(state1, state2)

  @jax.jit
  def maybe_update(pred, state):
    return lax.cond(pred, lambda s: tx.update(jac, s, params, task_losses=losses)[1], lambda s: s, state)

  assert_same_types(maybe_update(True, state0), state0)
  assert int(maybe_update(True, state0).count) == 1
  assert int(maybe_update(False, state0).count) == 0

  def body(state, _):
    return tx.update(jac, state, params, task_losses=losses)[1], None

  scanned, _ = lax.scan(body, state0, length=3)
  assert int(scanned.count) == 3


def test_init_on_shape_dtype_struct(case):
  params, _, _ = problem()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  tx = make(case)
  assert_same_types(tx.init(abstract), tx.init(params))
  assert_same_types(jax.eval_shape(tx.init, abstract), tx.init(params))


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_equals_unsharded(case, axis_type):
  params, jac, losses = problem()
  tx = optax.chain(make(case), optax.adam(1e-2))
  expected, _ = jax.jit(tx.update)(jac, tx.init(params), params, task_losses=losses)

  mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,), devices=problems.mesh_devices(8))
  # Every trunk leaf is split over "model" along its first axis; heads stay replicated.
  param_spec = {"trunk": {"w": P("model", None), "b": P("model")},
                "heads": jax.tree.map(lambda _: P(), params["heads"])}
  jac_spec = jax.tree.map(lambda s: P(None, *s), param_spec, is_leaf=lambda s: isinstance(s, P))
  put = lambda tree, specs: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
      is_leaf=lambda s: isinstance(s, P))
  sharded_params, sharded_jac = put(params, param_spec), put(jac, jac_spec)
  with jax.set_mesh(mesh):
    state = tx.init(sharded_params)
    updates, state = jax.jit(tx.update)(sharded_jac, state, sharded_params, task_losses=losses)
  assert_trees_close(updates, expected)
  assert updates["trunk"]["w"].sharding.spec == P("model", None) or axis_type == AxisType.Auto
  assert updates["trunk"]["w"].sharding.is_equivalent_to(sharded_params["trunk"]["w"].sharding, 2)


def test_contract_errors(case):
  params, jac, losses = problem()
  tx = make(case)
  state = tx.init(params)
  wrong_k = dict(jac, trunk=dict(jac["trunk"], b=jac["trunk"]["b"][:2]))
  with pytest.raises(ValueError, match=r"trunk/b.*\(2, 8\).*\(3, 8\)"):
    tx.update(wrong_k, state, params, task_losses=losses)
  no_axis = dict(jac, trunk=dict(jac["trunk"], w=params["trunk"]["w"]))
  with pytest.raises(ValueError, match=r"trunk/w.*\(16, 8\).*\(3, 16, 8\)"):
    jax.jit(tx.update)(no_axis, state, params, task_losses=losses)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(3,\)"):
    tx.update(jac, state, params, task_losses=losses[:2])


@pytest.mark.slow
def test_lazy_task_gradients_equal_the_explicit_tree(case):
  params, jac, losses = problem()
  x, y = problems.make_batch()
  tx = make(case, shared=problems.is_shared)
  expected, expected_state = tx.update(jac, tx.init(params), params, task_losses=losses)

  @jax.jit
  def lazy(params):
    grads = optax_mtl.task_gradients(problems.task_losses)(params, x, y)
    return tx.update(grads, tx.init(params), params)

  updates, state = lazy(params)
  assert_trees_close(updates, expected, rtol=2e-5)
  assert_trees_close(state, expected_state, rtol=2e-5)


@pytest.mark.slow
def test_gradients_through_the_representation_equal_the_explicit_tree(case):
  """``feature_task_gradients(..., per_task_heads=K, level="parameters")``: the per-task path."""
  params, jac, losses = problem()
  x, y = problems.make_batch()
  tx = make(case, shared=problems.is_shared)
  expected, expected_state = tx.update(jac, tx.init(params), params, task_losses=losses)
  grads_fn = optax_mtl.feature_task_gradients(problems.encoder, problems.heads_per_task,
                                              per_task_heads=problems.NUM_TASKS, level="parameters")
  updates, state = jax.jit(lambda params: tx.update(grads_fn(params, x, y), tx.init(params), params))(params)
  assert_trees_close(updates, expected, rtol=2e-5)
  assert_trees_close(state, expected_state, rtol=2e-5)


def test_nonfinite_gradients_are_skipped_and_counted(case):
  params, jac, losses = problem()
  tx = make(case)
  state = tx.init(params)
  poisoned = dict(jac, trunk=dict(jac["trunk"], w=jac["trunk"]["w"].at[0, 1, 1].set(jnp.nan)))
  updates, new_state = jax.jit(tx.update)(poisoned, state, params, task_losses=losses)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(new_state.nonfinite_count) == 1 and int(new_state.count) == 0
  assert_same_types(new_state, state)
  assert_trees_close(new_state.weighting_state, state.weighting_state, rtol=0, atol=0)


def test_a_transform_given_no_leaves_passes(case):
  # optax.masked, or an optax.partition label with no parameters, hands the
  # transform an empty tree: K comes from num_tasks, not from the leaves.
  params, jac, losses = problem()
  tx = optax.masked(make(case), jax.tree.map(lambda _: False, params))
  updates, state = jax.jit(lambda jac, state: tx.update(jac, state, params, task_losses=losses))(
      jac, tx.init(params))
  assert_trees_close(updates, jac, rtol=0, atol=0)
  assert int(state.inner_state.nonfinite_count) == 0 and int(state.inner_state.count) == 1


@pytest.mark.slow
def test_propagated_nonfinite_input_makes_the_optimizer_skip_too(case):
  # nonfinite="propagate" sends NaN on, so that optax.apply_if_finite on the
  # optimizer after the transform keeps the optimizer's moments as well.
  params, jac, losses = problem()
  tx = optax.chain(make(case, nonfinite="propagate"), optax.apply_if_finite(optax.adam(1e-2), 3))
  step = jax.jit(lambda jac, state: tx.update(jac, state, params, task_losses=losses))
  _, state = step(jac, tx.init(params))
  poisoned = dict(jac, trunk=dict(jac["trunk"], w=jac["trunk"]["w"].at[0, 1, 1].set(jnp.inf)))
  updates, new_state = step(poisoned, state)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))  # apply_if_finite's zeros
  assert int(new_state[0].nonfinite_count) == 1 and int(new_state[0].count) == 1
  assert int(new_state[1].notfinite_count) == 1
  assert_trees_close(new_state[1].inner_state, state[1].inner_state, rtol=0, atol=0)
  updates, _ = step(jac, new_state)
  leaves = [np.asarray(u) for u in jax.tree.leaves(updates)]
  assert all(np.isfinite(u).all() for u in leaves) and any(np.any(u != 0) for u in leaves)  # stepping again
  with pytest.raises(ValueError, match="nonfinite"):
    make(case, nonfinite="zero")


@pytest.mark.slow
def test_step_never_synchronises_with_the_host(case):
  # The solvers run in-graph: no callbacks in the program, and a jitted step on
  # device-resident inputs moves nothing between host and device.
  params, jac, losses = problem()
  tx = optax.chain(make(case), optax.adam(1e-2))
  step = jax.jit(lambda jac, state, params, losses: tx.update(jac, state, params, task_losses=losses))
  args = jax.device_put((jac, tx.init(params), params, losses))
  assert "callback" not in str(jax.make_jaxpr(step)(*args))
  jax.block_until_ready(step(*args))  # compiled outside the guard
  with jax.transfer_guard("disallow"):
    _, state = step(*args)
    updates, state = step(args[0], state, *args[2:])
    jax.block_until_ready((updates, state))
