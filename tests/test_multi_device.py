"""Sharded per-task gradients and examples/multi_device.py, on the 8 fake CPU devices (conftest.py).

On a 2 x 4 ``("data", "model")`` mesh with the example's parameters split
over ``"model"`` and their per-task gradients split alike (task axis whole):

- the compiled Gram (float32 or bfloat16 gradients, Explicit or Auto axes)
  all-reduces float32 ``K x K`` matrices and nothing else;
- for every case of the registry (transforms.py), ``STEPS`` optimizer steps
  (the method, then SGD) on per-task gradients from the example's
  ``value_and_jacobian`` equal the single-device steps: losses, updates and
  params relative 1e-5 at every step, final state rtol 1e-5 / atol 1e-6 (it
  also holds solver residuals, float32 noise), shardings kept. The compiled
  sharded step contains only all-reduces, none of more than ``K x K``
  numbers (the Gram where the method has one, norms, finiteness flags),
  while every shard of a split per-task gradient is larger: no gradient is
  gathered, scattered or permuted across devices;
- the example runs as a script.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_mtl
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import problems
import scripts
from transforms import CASES

example = scripts.load("examples", "multi_device")
pytestmark = pytest.mark.slow  # 2 x 4 meshes, and the example as a script
K = example.NUM_TASKS
STEPS = 3
LEARNING_RATE = 0.1
RTOL = 1e-5
ATOL = 1e-6
# Transforms whose weights do not come from the Gram matrix (no K x K all-reduce).
GRAM_FREE = {"linear_scalarization", "linear_scalarization_mean", "scale_invariant", "random_weighting", "dwa",
             "dwa_blockwise_sum", "uncertainty_weighting", "graddrop", "graddrop_global"}
# As in test_precision.py: LLVM optimisation level 0 compiles faster and changes
# neither the HLO passes (sharding propagation, SPMD partitioning) nor the numbers.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
COLLECTIVE = re.compile(
    r"=\s+(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|ragged-all-to-all|collective-permute|"
    r"collective-broadcast|reduce-scatter)(?:-start)?\(")
ARRAY_TYPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """``(opcode, [(element type, shape), ...])`` of every collective in compiled HLO text."""
  found = []
  for result_type, opcode in COLLECTIVE.findall(hlo):
    arrays = [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in ARRAY_TYPE.findall(result_type)]
    found.append((opcode, arrays))
  return found


@functools.lru_cache(maxsize=None)
def host_problem():
  """The example's params and per-task gradients at init, on the host."""
  params = example.init_params()
  x, y = example.make_batch(0)
  losses, jac = jax.jit(optax_mtl.value_and_jacobian(example.task_losses))(params, x, y)
  return jax.tree.map(np.asarray, (params, jac, losses))


def sharded_problem(mesh):
  """Params split by the example's specs and their per-task gradients split alike (task axis whole)."""
  params, jac, losses = host_problem()
  put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  jac_specs = jax.tree.map(lambda spec: P(None, *spec), example.PARAM_SPECS, is_leaf=lambda s: isinstance(s, P))
  return (jax.tree.map(put, params, example.PARAM_SPECS), jax.tree.map(put, jac, jac_specs),
          jax.device_put(losses, NamedSharding(mesh, P())))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_gram_all_reduces_a_float32_k_by_k_matrix_and_nothing_else(axis_type, dtype):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2, devices=problems.mesh_devices(8))
  _, jac, _ = sharded_problem(mesh)
  jac = jax.tree.map(lambda g: g.astype(dtype), jac)
  with jax.set_mesh(mesh):
    compiled = jax.jit(optax_mtl.gram, compiler_options=COMPILER_OPTIONS).lower(jac).compile()
    gram = compiled(jac)
  hlo = compiled.as_text()
  found = collectives(hlo)
  assert not any(op in hlo for op in ("all-gather", "all-to-all", "reduce-scatter", "collective-permute"))
  # The three sharded leaves' Grams, combined into one all-reduce (float32 even for bfloat16
  # gradients: the accumulation happens before anything crosses devices).
  assert found and all(op == "all-reduce" for op, _ in found)
  assert {array for _, arrays in found for array in arrays} == {("f32", (K, K))}
  host = jax.tree.map(lambda g: np.asarray(g, np.float32), jac)
  np.testing.assert_allclose(gram, optax_mtl.gram(host), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def gradients_fn():
  """The example's losses and per-task gradients, jitted once for every case (per sharding)."""
  return jax.jit(optax_mtl.value_and_jacobian(example.task_losses), compiler_options=COMPILER_OPTIONS)


def trajectory(case, mesh):
  """``STEPS`` steps of the case (then SGD) on the example; per step the updates and params.

  Returns:
    ``(history, final optimizer state, compiled HLO text of the optimizer step)``.
  """
  tx = optax.chain(case.factory(K, **case.kwargs), optax.sgd(LEARNING_RATE))

  def step(params, opt_state, jac, losses):
    updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, updates

  params = example.init_params()
  batches = [example.make_batch(t) for t in range(STEPS)]
  if mesh is not None:
    params, batches = example.shard(params, batches, mesh)
  history, compiled = [], None
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    opt_state = tx.init(params)
    for x, y in batches:
      losses, jac = gradients_fn()(params, x, y)
      if compiled is None:
        compiled = jax.jit(step, compiler_options=COMPILER_OPTIONS).lower(params, opt_state, jac, losses).compile()
      params, opt_state, updates = compiled(params, opt_state, jac, losses)
      history.append(jax.tree.map(np.asarray, {"losses": losses, "updates": updates, "params": params}))
  if mesh is not None:
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(example.PARAM_SPECS)):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)  # shardings kept
  return history, jax.tree.map(np.asarray, opt_state), compiled.as_text()


def relative_error(actual, expected) -> float:
  """Largest ``max |a - e| / max |e|`` over the leaves (integer leaves must be equal)."""
  worst = 0.0
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    if not np.issubdtype(e.dtype, np.floating):
      np.testing.assert_array_equal(a, e)
      continue
    scale = np.max(np.abs(e)) if e.size else 0.0
    diff = np.max(np.abs(a.astype(np.float64) - e)) if e.size else 0.0
    worst = max(worst, diff / scale if scale > 0 else diff)
  return worst


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sharded_steps_equal_single_device_and_all_reduce_only_k_by_k(case):
  mesh = example.make_mesh()
  history, state, hlo = trajectory(case, mesh)
  single_history, single_state, _ = trajectory(case, None)
  for step in range(STEPS):
    assert relative_error(history[step], single_history[step]) <= RTOL, step
  # The state also holds solver diagnostics (residuals) that are float32 rounding noise: atol.
  for a, e in zip(jax.tree.leaves(state), jax.tree.leaves(single_state), strict=True):
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)
  assert int(optax.tree.get(state, "nonfinite_count")) == 0

  # What the compiled sharded optimizer step moves across devices: all-reduces
  # of at most K x K numbers (the Gram, norms, flags), never a gradient shard.
  found = collectives(hlo)
  assert found, "at least the finiteness check crosses devices"
  assert {op for op, _ in found} == {"all-reduce"}
  assert not any(op in hlo for op in ("all-gather", "all-to-all", "reduce-scatter", "collective-permute"))
  arrays = [array for _, arrays in found for array in arrays]
  assert all(int(np.prod(shape)) <= K * K for _, shape in arrays), arrays
  assert (("f32", (K, K)) in arrays) == (case.name not in GRAM_FREE)  # the Gram, where there is one
  _, jac, _ = sharded_problem(mesh)
  shards = [g.sharding.shard_shape(g.shape) for g in jax.tree.leaves(jac) if not g.sharding.is_fully_replicated]
  assert len(shards) == 3 and min(int(np.prod(shape)) for shape in shards) > K * K  # what the bound excludes


def test_the_script_trains_and_reports(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["multi_device.py", "--steps", "3", "--method", "linear_scalarization"])
  example.main()
  out = capsys.readouterr().out
  losses = [line for line in out.splitlines() if line.startswith("step ")]
  assert len(losses) == 3 and all("losses [" in line for line in losses)
  assert "mesh {'data': 2, 'model': 4}" in out
  assert "per-task gradient of w1: (3, 8, 32) P(None, None, 'model')" in out
  collectives_line = next(line for line in out.splitlines() if line.startswith("collectives"))
  assert "all-reduce" in collectives_line and "all-gather" not in collectives_line
  gap = float(out.strip().splitlines()[-1].split(":")[-1])
  assert gap <= 1e-5
