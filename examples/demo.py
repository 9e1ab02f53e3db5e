"""Main demo: a two-head multi-task regression trained with optax_mtl.

A shared MLP trunk feeds two task heads whose losses differ in scale by two
orders of magnitude. Each step computes the per-task gradients with
``jax.jacrev`` and aggregates them with an optax_mtl transform chained in
front of Adam.

  python examples/demo.py [--steps 2000] [--method linear_scalarization]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import optax_mtl

NUM_TASKS = 2
METHODS = {
    "linear_scalarization": lambda: optax_mtl.linear_scalarization(NUM_TASKS),
}


def make_data(num_train: int, num_test: int, seed: int):
  """Two related targets on the same inputs: a sine and a large quadratic."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_train + num_test, 8)).astype(np.float32)
  direction = rng.normal(size=(8,)).astype(np.float32) / np.sqrt(8)
  z = x @ direction
  y = np.stack([np.sin(2 * z), 10 * z**2], axis=-1)
  y += 0.05 * rng.normal(size=y.shape) * np.array([1.0, 10.0])
  x, y = jnp.asarray(x), jnp.asarray(y.astype(np.float32))
  return (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:])


def init_params(key, hidden: int = 64):
  k1, k2, k3 = jax.random.split(key, 3)
  dense = lambda k, n_in, n_out: {
      "w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
      "b": jnp.zeros((n_out,)),
  }
  return {
      "trunk": [dense(k1, 8, hidden), dense(k2, hidden, hidden)],
      "heads": dense(k3, hidden, NUM_TASKS),  # one output column per task
  }


def task_losses(params, x, y):
  h = x
  for layer in params["trunk"]:
    h = jax.nn.gelu(h @ layer["w"] + layer["b"][None, :])
  preds = h @ params["heads"]["w"] + params["heads"]["b"][None, :]
  return jnp.mean((preds - y) ** 2, axis=0)  # (K,)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--method", choices=sorted(METHODS), default="linear_scalarization")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  (x_train, y_train), (x_test, y_test) = make_data(4096, 1024, args.seed)
  params = init_params(jax.random.key(args.seed))
  tx = optax.chain(METHODS[args.method](), optax.adam(args.lr))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.choice(key, x_train.shape[0], (args.batch,), replace=False)
    x, y = x_train[idx], y_train[idx]
    losses = task_losses(params, x, y)
    per_task_grads = jax.jacrev(task_losses)(params, x, y)  # every leaf (K, ...)
    updates, opt_state = tx.update(per_task_grads, opt_state, params, task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  eval_losses = jax.jit(task_losses)
  print(f"optax_mtl {optax_mtl.__version__} | jax {jax.__version__} on {jax.devices()[0].platform}"
        f" | method: {args.method} | {args.steps} steps")
  print("test losses before training:", np.round(np.asarray(eval_losses(params, x_test, y_test)), 4))
  key = jax.random.key(args.seed + 2)
  start = time.perf_counter()
  with tqdm(range(args.steps), desc="training", unit="step") as bar:
    for t in bar:
      key, sub = jax.random.split(key)
      params, opt_state, losses = step(params, opt_state, sub)
      if t % 50 == 0 or t == args.steps - 1:
        bar.set_postfix({f"L{i}": f"{float(l):.4f}" for i, l in enumerate(losses)})
  elapsed = time.perf_counter() - start
  test = np.asarray(eval_losses(params, x_test, y_test))
  weights = np.asarray(optax.tree.get(opt_state, "weights"))
  print(f"trained in {elapsed:.1f}s ({1e3 * elapsed / args.steps:.2f} ms/step incl. compile)")
  for i in range(NUM_TASKS):
    print(f"  task {i}: test MSE {test[i]:.4f}   last weight {weights[i]:.4f}")


if __name__ == "__main__":
  main()
