"""Step time of each gradient path relative to linear scalarization (LS).

An MLP trunk shared by ``K`` task heads, one jitted train step (gradients,
aggregation, Adam) per path, timed round-robin in the same process:

- ``ls``: one backward pass of ``sum_i L_i`` (the baseline, ratio 1);
- ``jacobian``: ``value_and_jacobian(batch_size=K)`` (K vectorised backward
  passes on every backend), Gram, weighting, combine;
- ``jacobian_chunked``: the same with ``batch_size=1`` (memory-bounded);
- the lazy and feature-level paths use the default ``batch_size=None``;
- ``lazy_refresh``: ``task_gradients`` on a refresh step (K backward passes
  for the trunk, one weighted pass for the heads);
- ``streamed_gram``: ``task_gradients(store_jacobian=False)`` (K VJPs + K JVPs,
  no K x params Jacobian, then one backward pass);
- ``cached``: ``task_gradients`` on a step that reuses the last weights (one
  backward pass, chosen by ``lax.cond`` inside the same compiled step);
- ``feature_level``: ``feature_task_gradients`` (K backward passes through the
  heads only, one through the trunk).

  python benchmarks/gradient_paths.py            # CPU defaults, writes results/gradient_paths_<platform>.json
  python benchmarks/gradient_paths.py --tiny --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402


def normalized_gradients(gram):
  """Stand-in Gram weighting (unit-norm task gradients); any Gram method costs the same here."""
  return 1.0 / jnp.sqrt(jnp.diag(gram) + 1e-20)


def init_params(key, features, width, depth, num_tasks, head_dim):
  keys = jax.random.split(key, depth + num_tasks)
  trunk, fan_in = [], features
  for i in range(depth):
    trunk.append({"w": jax.random.normal(keys[i], (fan_in, width)) / jnp.sqrt(fan_in), "b": jnp.zeros((width,))})
    fan_in = width
  return {"trunk": trunk, "heads": init_heads(keys[depth:], width, head_dim)}


def init_for(sizes, num_tasks):
  """``init_params`` at the sizes of ``train_step.py``'s command line (``features``, ``width``, ...)."""
  return init_params(jax.random.key(0), sizes.features, sizes.width, sizes.depth, num_tasks, sizes.head_dim)


def input_shape(sizes):
  """The shape of one example."""
  return (sizes.features,)


def init_heads(keys, width, head_dim):
  """One linear head per key on a ``(batch, width)`` representation (shared with ``conv_net.py``)."""
  return [{"w": jax.random.normal(key, (width, head_dim)) / jnp.sqrt(width), "b": jnp.zeros((head_dim,))}
          for key in keys]


def encoder(params, x, y):
  del y
  h = x
  for layer in params["trunk"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
  return h


def torch_linear(torch, layer):
  """A ``torch.nn.Linear`` with the weights of a ``{"w": (in, out), "b": (out,)}`` layer."""
  linear = torch.nn.Linear(*layer["w"].shape)
  with torch.no_grad():
    linear.weight.copy_(torch.as_tensor(np.array(layer["w"]).T))  # np.array: a writable copy
    linear.bias.copy_(torch.as_tensor(np.array(layer["b"])))
  return linear


def torch_trunk(torch, trunk):
  """``encoder`` in ``torch.nn`` with the same weights (the PyTorch peers of ``train_step.py``)."""
  layers = []
  for layer in trunk:
    layers += [torch_linear(torch, layer), torch.nn.ReLU()]
  return torch.nn.Sequential(*layers)


def torch_inputs(x):
  """A batch of inputs in the layout of ``torch_trunk``: as it is."""
  return x


def heads_losses(params, z, x, y):
  return heads_losses_per_task(params, [z] * len(params["heads"]), x, y)


def heads_losses_per_task(params, zs, x, y):
  """The heads of ``feature_task_gradients(..., per_task_heads=K)``: head ``i`` reads ``zs[i]`` only."""
  del x
  losses = [jnp.mean((z @ head["w"] + head["b"][None, :] - y[:, i, :]) ** 2)
            for i, (z, head) in enumerate(zip(zs, params["heads"]))]
  return jnp.stack(losses)


def task_losses(params, x, y):
  return heads_losses(params, encoder(params, x, y), x, y)


def is_shared(params):
  return {"trunk": True, "heads": False}


def build_steps(num_tasks):
  adam = optax.adam(1e-4)
  aggregator = lambda every=1: optax_mtl.weighted_aggregation(
      num_tasks, normalized_gradients, shared=is_shared, update_weights_every=every)

  def ls_step(params, opt_state, x, y):
    grads = jax.grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def jacobian_step(batch_size):
    def step(params, opt_state, x, y):
      tx = optax.chain(aggregator(), adam)
      losses, jac = optax_mtl.value_and_jacobian(task_losses, batch_size=batch_size)(params, x, y)
      updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
      return optax.apply_updates(params, updates), opt_state
    return step

  def lazy_step(every, store_jacobian=True):
    def step(params, opt_state, x, y):
      tx = optax.chain(aggregator(every), adam)
      grads = optax_mtl.task_gradients(task_losses, store_jacobian=store_jacobian)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return step

  def feature_step(params, opt_state, x, y):
    tx = optax.chain(aggregator(), adam)
    grads = optax_mtl.feature_task_gradients(encoder, heads_losses)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  never_again = 2**30  # refresh on the first step only: every later step reuses the weights
  return {
      "ls": (ls_step, lambda p: adam.init(p)),
      "jacobian": (jacobian_step(num_tasks), lambda p: optax.chain(aggregator(), adam).init(p)),
      "jacobian_chunked": (jacobian_step(1), lambda p: optax.chain(aggregator(), adam).init(p)),
      "lazy_refresh": (lazy_step(1), lambda p: optax.chain(aggregator(), adam).init(p)),
      "streamed_gram": (lazy_step(1, store_jacobian=False), lambda p: optax.chain(aggregator(), adam).init(p)),
      "cached": (lazy_step(never_again), lambda p: optax.chain(aggregator(never_again), adam).init(p)),
      "feature_level": (feature_step, lambda p: optax.chain(aggregator(), adam).init(p)),
  }


def run(args) -> dict:
  key = jax.random.key(0)
  params = init_params(key, args.features, args.width, args.depth, args.tasks, args.head_dim)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, args.features)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(args.batch, args.tasks, args.head_dim)), jnp.float32)
  n_trunk = sum(p.size for p in jax.tree.leaves(params["trunk"]))
  n_heads = sum(p.size for p in jax.tree.leaves(params["heads"]))

  calls = {}
  for name, (step, init) in build_steps(args.tasks).items():
    jitted = jax.jit(step)
    state = {"params": params, "opt_state": init(params)}
    if name == "cached":  # consume the one refresh step before timing
      state["params"], state["opt_state"] = common.block(jitted(state["params"], state["opt_state"], x, y))

    def call(jitted=jitted, state=state):
      # Params are not carried over, so every timed call does the same work.
      _, state["opt_state"] = jitted(state["params"], state["opt_state"], x, y)
      return state["opt_state"]

    calls[name] = call
  timings = common.time_interleaved(calls, repeats=args.repeats)
  baseline = timings["ls"]["median_ms"]
  for entry in timings.values():
    entry["ratio_to_ls"] = entry["median_ms"] / baseline
  return {
      "benchmark": "gradient_paths",
      "environment": common.environment(),
      "sizes": {
          "num_tasks": args.tasks, "batch": args.batch, "features": args.features,
          "width": args.width, "depth": args.depth, "head_dim": args.head_dim,
          "trunk_params": int(n_trunk), "head_params": int(n_heads),
      },
      "weighting": "normalized gradients (stand-in Gram weighting)",
      "results": timings,
  }


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--features", type=int, default=256)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.tiny:
    args.tasks, args.batch, args.features, args.width, args.depth, args.head_dim, args.repeats = 3, 8, 8, 16, 2, 2, 2
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  result = run(args)
  path = common.write(result, args.out, f"gradient_paths_{result['environment']['platform']}.json")
  print(f"{'path':<18}{'median ms':>12}{'x LS':>8}")
  for name, entry in result["results"].items():
    print(f"{name:<18}{entry['median_ms']:>12.2f}{entry['ratio_to_ls']:>8.2f}")
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
