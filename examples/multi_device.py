"""Multi-task training on a device mesh: data parallelism and model-sharded parameters.

A three-task regression model (a two-layer trunk shared by the tasks, one
linear head per task) trained on a ``data x model`` mesh (2 x 4 by default):

- the batch is split over ``"data"``;
- the trunk's hidden units are split over ``"model"`` (the first layer by its
  output columns, the second by its input rows, Megatron style); the heads are
  replicated.

The per-task gradients come from :func:`optax_mtl.value_and_jacobian` and
carry the parameters' shardings (every leaf ``(K, *param.shape)`` with the task
axis unsharded), so each device holds the ``K`` task gradients of its own
parameter shard. Their backward pass sums them over the batch shards (the
all-reduce over ``"data"`` of any data-parallel step, ``K`` times the
parameter shard); the multi-task transform then moves no gradient at all: it
contracts each shard locally and all-reduces the ``K x K`` Gram matrix (plus
a few norms and flags). Sharding changes nothing but the order of float32
sums: the run matches the single-device one (tests/test_multi_device.py checks
the optimizer step of every method of the test registry against one device).

On a CPU host the script asks XLA for 8 CPU devices (``--mesh 2x4``); on a host
with enough accelerators it uses them.

  python examples/multi_device.py --steps 100 --method nash_mtl
"""

from __future__ import annotations

import argparse
import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl

NUM_TASKS = 3
IN_FEATURES = 8
HIDDEN = 32  # divisible by the "model" axis
BATCH = 64  # divisible by the "data" axis
# Task i's target is scaled by TASK_SCALES[i]: without a multi-task method the
# largest task dominates the shared trunk.
TASK_SCALES = (1.0, 10.0, 0.1)

# Parameter shardings over the "model" axis (heads replicated).
PARAM_SPECS = {
    "trunk": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()},
    "heads": {"w": P(), "b": P()},
}
BATCH_SPEC = P("data", None)

METHODS = {
    "linear_scalarization": optax_mtl.linear_scalarization,
    "nash_mtl": optax_mtl.nash_mtl,
    "mgda": optax_mtl.mgda,
    "aligned_mtl": optax_mtl.aligned_mtl,
    "upgrad": optax_mtl.upgrad,
    "cagrad": optax_mtl.cagrad,
    "pcgrad": optax_mtl.pcgrad,
    "graddrop": optax_mtl.graddrop,
}


def make_mesh(data: int = 2, model: int = 4, devices=None) -> jax.sharding.Mesh:
  """A ``("data", "model")`` mesh with Explicit axes (shardings are part of the array types)."""
  if devices is None:
    devices = jax.devices()
    if len(devices) < data * model:
      devices = jax.devices("cpu")
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Explicit,) * 2,
                       devices=devices[: data * model])


def init_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  return {
      "trunk": {"w1": normal(IN_FEATURES, HIDDEN), "b1": jnp.zeros((HIDDEN,)),
                "w2": normal(HIDDEN, HIDDEN), "b2": jnp.zeros((HIDDEN,))},
      "heads": {"w": normal(HIDDEN, NUM_TASKS), "b": jnp.zeros((NUM_TASKS,))},
  }


def make_batch(step: int) -> tuple[jax.Array, jax.Array]:
  """Inputs ``(BATCH, IN_FEATURES)`` and the ``(BATCH, NUM_TASKS)`` targets of three related tasks."""
  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(BATCH, IN_FEATURES)).astype(np.float32)
  targets = np.stack([np.sin(x[:, 0] + x[:, 1]), x[:, 0] * x[:, 2], np.tanh(x[:, 3] - x[:, 1])], axis=-1)
  return jnp.asarray(x), jnp.asarray(targets * np.asarray(TASK_SCALES, np.float32))


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """The ``(K,)`` mean squared errors; with sharded inputs every reduction is explicit."""
  trunk, heads = params["trunk"], params["heads"]
  h = jnp.tanh(x @ trunk["w1"] + trunk["b1"][None])  # (batch over "data", hidden over "model")
  # Contracting the "model"-sharded hidden axis leaves each device a partial
  # sum; with Explicit axes the result's sharding must be stated: replicated
  # over "model" (an all-reduce). Without a mesh there is nothing to state.
  out_sharding = None if jax.sharding.get_abstract_mesh().empty else BATCH_SPEC
  h = jnp.tanh(jnp.matmul(h, trunk["w2"], out_sharding=out_sharding) + trunk["b2"][None])
  preds = h @ heads["w"] + heads["b"][None]
  return jnp.mean((preds - y) ** 2, axis=0)


def shard(params: dict, batches, mesh: jax.sharding.Mesh):
  """Places the params by ``PARAM_SPECS`` and every ``(x, y)`` batch by ``BATCH_SPEC``."""
  put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  params = jax.tree.map(put, params, PARAM_SPECS)
  batches = [(put(x, BATCH_SPEC), put(y, BATCH_SPEC)) for x, y in batches]
  return params, batches


def make_tx(method: str = "nash_mtl", learning_rate: float = 1e-2, **kwargs) -> optax.GradientTransformation:
  return optax.chain(METHODS[method](NUM_TASKS, **kwargs), optax.adam(learning_rate))


def make_train_step(tx: optax.GradientTransformation, **jit_kwargs):
  """The jitted step ``(params, opt_state, x, y) -> (params, opt_state, losses)``.

  The same function serves sharded and single-device arrays: ``jax.jit``
  compiles it once per input sharding. ``jit_kwargs`` go to :func:`jax.jit`.
  """

  def train_step(params, opt_state, x, y):
    losses, jac = optax_mtl.value_and_jacobian(task_losses)(params, x, y)  # leaves (K, *param.shape)
    updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
    return optax_mtl.apply_updates(params, updates), opt_state, losses

  return jax.jit(train_step, **jit_kwargs)


def train(tx, steps: int, mesh: jax.sharding.Mesh | None = None, *, train_step=None, seed: int = 0,
          log_every: int = 0):
  """Trains ``steps`` steps, on ``mesh`` (sharded) or on one device (``None``).

  Returns:
    ``(params, opt_state, history)``: ``history`` holds, per step, the losses
    and the params after the step (NumPy, gathered to the host).
  """
  train_step = make_train_step(tx) if train_step is None else train_step
  params = init_params(seed)
  batches = [make_batch(step) for step in range(steps)]
  if mesh is not None:
    params, batches = shard(params, batches, mesh)
  history = []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    opt_state = tx.init(params)
    for step, (x, y) in enumerate(batches):
      params, opt_state, losses = train_step(params, opt_state, x, y)
      history.append({"losses": np.asarray(losses), "params": jax.tree.map(np.asarray, params)})
      if log_every and (step % log_every == 0 or step == steps - 1):
        weights = optax.tree.get(opt_state, "weights")
        print(f"step {step:4d}  losses {np.array2string(np.asarray(losses), precision=4)}"
              f"  weights {np.array2string(np.asarray(weights), precision=3)}")
  return params, opt_state, history


def collectives(compiled_text: str) -> list[tuple[str, str]]:
  """``(opcode, result type)`` of every cross-device collective in compiled HLO text."""
  pattern = r"=\s+(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
  return [(op, shape) for shape, op in re.findall(pattern, compiled_text)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--method", choices=sorted(METHODS), default="nash_mtl")
  parser.add_argument("--mesh", default="2x4", help="DATAxMODEL, e.g. 2x4")
  args = parser.parse_args()
  data, model = (int(n) for n in args.mesh.lower().split("x"))
  if jax.config.jax_num_cpu_devices < data * model:
    # Must precede the first JAX operation; only the CPU backend reads it.
    jax.config.update("jax_num_cpu_devices", data * model)
  mesh = make_mesh(data, model)
  print(f"mesh {dict(mesh.shape)} on {mesh.devices.flat[0].platform}; method {args.method}")

  tx = make_tx(args.method)
  train_step = make_train_step(tx)
  params, opt_state, history = train(tx, args.steps, mesh, train_step=train_step,
                                     log_every=max(1, args.steps // 10))
  print("first-layer kernel sharding:", params["trunk"]["w1"].sharding.spec)

  # What crosses devices inside the multi-task transform alone: only K x K
  # and (K,) all-reduces (the Gram, norms, finiteness flags), never a gradient.
  params0, [(x, y)] = shard(init_params(), [make_batch(0)], mesh)
  with jax.set_mesh(mesh):
    losses, jac = jax.jit(optax_mtl.value_and_jacobian(task_losses))(params0, x, y)
    tx_update = jax.jit(lambda jac, state, params, losses: tx.update(jac, state, params, task_losses=losses))
    hlo = tx_update.lower(jac, tx.init(params0), params0, losses).compile().as_text()
  print("per-task gradient of w1:", jac["trunk"]["w1"].shape, jac["trunk"]["w1"].sharding.spec)
  print("collectives in the transform's update:", sorted(set(collectives(hlo))))

  single, _, single_history = train(tx, args.steps)
  gap = max(float(np.max(np.abs(np.asarray(a) - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_history[-1]["params"])))
  print(f"largest difference to the single-device run after {args.steps} steps: {gap:.2e}")


if __name__ == "__main__":
  main()
