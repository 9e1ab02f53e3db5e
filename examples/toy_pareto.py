"""The two-task toy problem of Nash-MTL's figure 1 (after CAGrad's), in ``lax.scan``.

Two losses of ``x = (x1, x2)``; the Pareto front is the curve below
``x1 in [-7, 7]`` where the two gradients are opposite (``x2 = -8.3552`` at
``x1 = 0``, ``-8.4345`` at ``|x1| = 7``). From the paper's five starts, Adam (lr 1e-3,
35,000 steps) follows each method's update. Linear scalarization is dominated
by the larger-scale loss and stalls away from the front from some starts;
Nash-MTL reaches the front from all five.

  python examples/toy_pareto.py [--steps 35000] [--out toy_pareto.png]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

LOWER = 5e-6
SCALE = 0.1
STARTS = np.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]], np.float32)
PARETO_X1 = (-7.0, 7.0)

METHODS = {
    "nash_mtl": lambda: optax_mtl.nash_mtl(2),
    "linear_scalarization": lambda: optax_mtl.linear_scalarization(2),
    "mgda": lambda: optax_mtl.mgda(2),
    "aligned_mtl": lambda: optax_mtl.aligned_mtl(2),
    "pcgrad": lambda: optax_mtl.pcgrad(2, key=0),
    "cagrad": lambda: optax_mtl.cagrad(2),
    "imtl_g": lambda: optax_mtl.imtl_g(2),
    "upgrad": lambda: optax_mtl.upgrad(2),
    "dualproj": lambda: optax_mtl.dualproj(2),
    "graddrop": lambda: optax_mtl.graddrop(2, key=0),
    "gradvac": lambda: optax_mtl.gradvac(2, key=0),
    "random_weighting": lambda: optax_mtl.random_weighting(2, key=0),
    "dwa": lambda: optax_mtl.dwa(2),
    "gradnorm": lambda: optax_mtl.gradnorm(2),
    # The toy losses go negative: scale_invariant (log L) skips every such step and
    # uncertainty_weighting's log-variances diverge; they are shown for completeness.
    "scale_invariant": lambda: optax_mtl.scale_invariant(2),
    "uncertainty_weighting": lambda: optax_mtl.uncertainty_weighting(2),
}


def task_losses(x, scale: float = SCALE):
  """``(L1, L2)`` of the toy problem (METHODS.md, "The toy problem")."""
  x1, x2 = x[0], x[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
  c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  return jnp.stack([scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2])


def trajectories(make_tx, steps: int, lr: float = 1e-3, every: int = 100) -> np.ndarray:
  """Points of the five runs, every ``every`` steps: shape ``(5, steps // every + 1, 2)``."""
  tx = optax.chain(make_tx(), optax.adam(lr))

  def run(x0):
    def step(carry, _):
      x, state = carry
      losses, jac = optax_mtl.value_and_jacobian(task_losses)(x)
      updates, state = tx.update(jac, state, x, task_losses=losses)
      return (optax.apply_updates(x, updates), state), None

    def chunk(carry, _):
      carry, _ = jax.lax.scan(step, carry, None, length=every)
      return carry, carry[0]

    _, points = jax.lax.scan(chunk, (x0, tx.init(x0)), None, length=steps // every)
    return jnp.concatenate([x0[None], points])

  return np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(STARTS)))


@jax.jit
@jax.vmap
def pareto_front(x1):
  """``x2`` of the Pareto front above ``x1``: where the loss Jacobian is singular.

  Found by bisection on ``det J`` for ``x2`` in ``[-9, -7.5]`` (below the
  x-axis the gradients are opposite along this curve).
  """

  def det(x2):
    jac = jax.jacrev(task_losses)(jnp.stack([x1, x2]))
    return jnp.linalg.det(jac)

  def bisect(bounds, _):
    low, high = bounds
    mid = 0.5 * (low + high)
    same = jnp.sign(det(mid)) == jnp.sign(det(low))
    return (jnp.where(same, mid, low), jnp.where(same, high, mid)), None

  (low, high), _ = jax.lax.scan(bisect, (jnp.float32(-9.0), jnp.float32(-7.5)), None, length=40)
  return 0.5 * (low + high)


def on_pareto_front(x: np.ndarray, tol: float = 0.05) -> np.ndarray:
  """Whether each point lies within ``tol`` (in ``x2``) of the Pareto front."""
  x = np.asarray(x, np.float32).reshape(-1, 2)
  inside = (x[:, 0] >= PARETO_X1[0] - tol) & (x[:, 0] <= PARETO_X1[1] + tol)
  front = np.asarray(pareto_front(jnp.clip(jnp.asarray(x[:, 0]), *PARETO_X1)))
  return inside & (np.abs(x[:, 1] - front) < tol)


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  grid = np.linspace(-10, 10, 201, dtype=np.float32)
  xx, yy = np.meshgrid(grid, grid)
  losses = jax.jit(jax.vmap(task_losses))(jnp.stack([xx.ravel(), yy.ravel()], axis=1))
  total = np.asarray(losses.sum(axis=1)).reshape(xx.shape)
  columns = min(4, len(results))
  rows = -(-len(results) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4.5 * rows), squeeze=False)
  colors = plt.cm.tab10(np.arange(len(STARTS)))
  for ax in axes.flat[len(results):]:
    ax.axis("off")
  for ax, (name, traj) in zip(axes.flat, results.items()):
    ax.contour(xx, yy, total, levels=25, cmap="Greys", linewidths=0.6)
    front_x1 = np.linspace(*PARETO_X1, 57, dtype=np.float32)
    front_x2 = np.asarray(pareto_front(jnp.asarray(front_x1)))
    ax.plot(front_x1, front_x2, color="tab:red", linewidth=4, alpha=0.6, label="Pareto front")
    for i, run in enumerate(traj):
      ax.plot(run[:, 0], run[:, 1], color=colors[i], linewidth=2)
      ax.scatter(*run[0], color=colors[i], marker="o", s=40, zorder=3)
      ax.scatter(*run[-1], color=colors[i], marker="*", s=150, edgecolor="k", zorder=4)
    reached = int(on_pareto_front(traj[:, -1]).sum())
    ax.set_title(f"{name} ({reached}/5 on the front)")
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
  axes[0][0].legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=35_000)
  parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--out", default="toy_pareto.png")
  args = parser.parse_args()
  results = {}
  for name in args.methods:
    start = time.perf_counter()
    results[name] = trajectories(METHODS[name], args.steps)
    final = results[name][:, -1]
    reached = on_pareto_front(final)
    print(f"{name}: {time.perf_counter() - start:.1f}s, {int(reached.sum())}/5 starts reach the Pareto front")
    for x0, x, ok in zip(STARTS, final, reached):
      print(f"  start ({x0[0]:5.1f}, {x0[1]:5.1f}) -> ({x[0]:7.3f}, {x[1]:7.3f}) {'on the front' if ok else ''}")
  plot(results, args.out)
  print(f"plot saved to {args.out}")


if __name__ == "__main__":
  main()
