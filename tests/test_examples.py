"""The integration examples run, with tiny step counts (examples/)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
import scripts

ROOT = scripts.ROOT
pytestmark = pytest.mark.slow  # each test runs an example


def load(name):
  return scripts.load("examples", name)


def test_demo_runs_as_a_script():
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--steps", "10",
                        "--methods", "linear_scalarization"],
                       capture_output=True, text=True, check=True, timeout=300)
  # The table's STL and LS rows, with accuracies in [0, 100] and finite Delta_m% and time per step.
  rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines()
          if line.startswith("| STL") or line.startswith("| LS")}
  assert set(rows) == {"STL", "LS"}
  for cells in rows.values():
    left, right = (float(cell.split("±")[0]) for cell in cells[:2])
    assert 0.0 <= left <= 100.0 and 0.0 <= right <= 100.0
    assert np.isfinite(float(cells[2].split("±")[0])) and float(cells[-1]) > 0.0


def test_flax_nnx_optimizer_path_equals_the_pure_transform():
  from flax import nnx
  example = load("flax_nnx")
  x, y = example.make_data()
  model = example.MultiTaskMLP(example.NUM_TASKS, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)

  def losses_of(p):
    return example.mse_per_task(nnx.merge(graphdef, p, rest), x, y)

  tx = example.make_tx()
  losses, jac = optax_mtl.value_and_jacobian(losses_of)(params)
  updates, _ = tx.update(jac, tx.init(params), params, task_losses=losses)
  expected = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, example.make_tx(), wrt=nnx.Param)
  example.optimizer_step(model, optimizer, x, y)
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_flax_nnx_both_paths_train():
  example = load("flax_nnx")
  x, y = example.make_data()
  from flax import nnx
  initial = np.asarray(example.mse_per_task(example.MultiTaskMLP(example.NUM_TASKS, rngs=nnx.Rngs(0)), x, y))
  for train in (example.train_with_optimizer, example.train_lazy):
    model, _, weights = train(12)
    final = np.asarray(example.mse_per_task(model, x, y))
    assert np.all(np.isfinite(final)) and final.sum() < initial.sum()
    assert weights.shape == (example.NUM_TASKS,) and np.all(weights > 0)


def test_flax_linen_train_state_forwards_task_losses():
  example = load("flax_linen")
  state, losses = example.train(12)
  assert int(state.step) == 12 and np.all(np.isfinite(losses))
  weights = optax.tree.get(state.opt_state, "weights")
  assert weights.shape == (example.NUM_TASKS,)
  # The forwarded losses reach the transform: a loss-based weighting sees them.
  seen = []

  def init(num_tasks, dtype):
    return jnp.zeros((num_tasks,), dtype)

  def update(gram, state, task_losses):
    del gram, state
    seen.append(task_losses)
    return jnp.ones_like(task_losses), task_losses

  tx = optax_mtl.weighted_aggregation(example.NUM_TASKS, optax_mtl.Weighting(init, update, needs_gram=False,
                                                                               needs_task_losses=True))
  linen_state = example.MultiTaskTrainState.create(apply_fn=state.apply_fn, params=state.params, tx=tx)
  x, y = example.make_data()
  losses_of = lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2, axis=0)
  losses, jac = optax_mtl.value_and_jacobian(losses_of)(state.params)
  new_state = linen_state.apply_gradients(grads=jac, task_losses=losses)
  np.testing.assert_allclose(new_state.opt_state.weighting_state, losses, rtol=1e-6)


def test_orbax_checkpoint_round_trip_continues_identically(tmp_path):
  example = load("checkpointing")
  assert example.interrupted_equals_uninterrupted(steps=9, save_at=5, workdir=tmp_path)


def test_toy_pareto_front_curve_matches_the_papers_value():
  example = load("toy_pareto")
  np.testing.assert_allclose(example.pareto_front(jnp.array([0.0]))[0], -8.3552, atol=1e-3)


def test_toy_nash_mtl_and_mgda_reach_the_pareto_front_from_all_five_starts():
  example = load("toy_pareto")
  nash = example.trajectories(example.METHODS["nash_mtl"], steps=35_000)
  assert nash.shape == (5, 351, 2)
  assert example.on_pareto_front(nash[:, -1]).all()
  mgda = example.trajectories(example.METHODS["mgda"], steps=35_000)
  assert example.on_pareto_front(mgda[:, -1]).all()
  # Linear scalarization falls into the log valley of f2 from (9, 9), as in the paper.
  ls = example.trajectories(example.METHODS["linear_scalarization"], steps=35_000)
  assert not example.on_pareto_front(ls[:, -1]).all()


def test_toy_plot_is_written(tmp_path):
  example = load("toy_pareto")
  results = {name: example.trajectories(make, steps=200) for name, make in example.METHODS.items()}
  example.plot(results, str(tmp_path / "toy.png"))
  assert (tmp_path / "toy.png").stat().st_size > 10_000
