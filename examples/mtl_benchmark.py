"""Every optax_mtl method on real (scikit-learn) data, scored as in the seed papers.

A Flax NNX network (a shared MLP trunk and one small MLP head per task) is
trained on a problem of ``examples/datasets.py`` by each multi-task transform
(default hyperparameters, chained in front of the same Adam), over several
seeds, and by single-task baselines (STL: one network per task, trained the
same way on its own loss). The whole train step (per-task gradients by
``optax_mtl.value_and_jacobian``, the transform, Adam) is jitted, ``lax.scan``
running ``--eval-every`` steps per call. Reported: per-task test metrics,
Delta_m% against STL, the mean rank (MR) and the seconds per step, as JSON and
Markdown, with plots of the validation curves, of the task weights (read from
the optimizer state with ``optax.tree.get(opt_state, "weights")``) and of the
condition number of the per-task gradients of the trunk.

Delta_m% follows nash-mtl (lower is better, a flat mean over all metrics):
``Delta_m% = 100 / |metrics| * sum_j (-1)^{s_j} (M_j - M_j^STL) / M_j^STL`` with
``s_j = 1`` when higher is better.

  python examples/mtl_benchmark.py --problem multimnist --seeds 0 1 2 --steps 2000 --out docs/results
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import datasets  # noqa: E402  (a sibling module, importable however this script is run)

# Every transform with its default hyperparameters; the random ones take the run's seed.
METHODS = {
    "linear_scalarization": lambda k, seed, shared: optax_mtl.linear_scalarization(k, shared=shared),
    "nash_mtl": lambda k, seed, shared: optax_mtl.nash_mtl(k, shared=shared),
    "mgda": lambda k, seed, shared: optax_mtl.mgda(k, shared=shared),
    "aligned_mtl": lambda k, seed, shared: optax_mtl.aligned_mtl(k, shared=shared),
    "cagrad": lambda k, seed, shared: optax_mtl.cagrad(k, shared=shared),
    "imtl_g": lambda k, seed, shared: optax_mtl.imtl_g(k, shared=shared),
    "pcgrad": lambda k, seed, shared: optax_mtl.pcgrad(k, key=seed, shared=shared),
    "gradvac": lambda k, seed, shared: optax_mtl.gradvac(k, key=seed, shared=shared),
    "graddrop": lambda k, seed, shared: optax_mtl.graddrop(k, key=seed, shared=shared),
    "upgrad": lambda k, seed, shared: optax_mtl.upgrad(k, shared=shared),
    "dualproj": lambda k, seed, shared: optax_mtl.dualproj(k, shared=shared),
    "scale_invariant": lambda k, seed, shared: optax_mtl.scale_invariant(k, shared=shared),
    "random_weighting": lambda k, seed, shared: optax_mtl.random_weighting(k, key=seed, shared=shared),
    "dwa": lambda k, seed, shared: optax_mtl.dwa(k, shared=shared),
    "uncertainty_weighting": lambda k, seed, shared: optax_mtl.uncertainty_weighting(k, shared=shared),
    "gradnorm": lambda k, seed, shared: optax_mtl.gradnorm(k, shared=shared),
}
SHORT = {"linear_scalarization": "LS", "nash_mtl": "Nash-MTL", "mgda": "MGDA", "aligned_mtl": "Aligned-MTL",
         "cagrad": "CAGrad", "imtl_g": "IMTL-G", "pcgrad": "PCGrad", "gradvac": "GradVac",
         "graddrop": "GradDrop", "upgrad": "UPGrad", "dualproj": "DualProj", "scale_invariant": "SI",
         "random_weighting": "RLW", "dwa": "DWA", "uncertainty_weighting": "UW", "gradnorm": "GradNorm",
         "stl": "STL"}


class MultiTaskNet(nnx.Module):
  """A shared MLP trunk and one two-layer MLP head per task (as MGDA-UB's MultiMNIST model)."""

  def __init__(self, features: int, head_sizes, hidden: int = 128, head_hidden: int = 32, *,
               rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
        nnx.Linear(features, hidden, rngs=rngs), jax.nn.relu,
        nnx.Linear(hidden, hidden, rngs=rngs), jax.nn.relu,
    )
    self.heads = nnx.List([
        nnx.Sequential(nnx.Linear(hidden, head_hidden, rngs=rngs), jax.nn.relu,
                       nnx.Linear(head_hidden, size, rngs=rngs))
        for size in head_sizes
    ])

  def __call__(self, x):
    h = self.trunk(x)
    return [head(h) for head in self.heads]


def trunk_only(params):
  """The ``shared=`` mask: the trunk's parameters (the heads are task-specific)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", params)


def task_losses(outputs, ys, tasks):
  """``(K,)``: cross-entropy for classification, MSE for regression."""
  losses = []
  for out, y, task in zip(outputs, ys, tasks):
    if task.kind == "classification":
      losses.append(optax.softmax_cross_entropy_with_integer_labels(out, y).mean())
    else:
      losses.append(jnp.mean((out - y) ** 2))
  return jnp.stack(losses)


def task_metrics(outputs, ys, tasks):
  """``(K,)``: accuracy (%) for classification, MSE for regression."""
  values = []
  for out, y, task in zip(outputs, ys, tasks):
    if task.kind == "classification":
      values.append(100.0 * jnp.mean(jnp.argmax(out, axis=-1) == y))
    else:
      values.append(jnp.mean((out - y) ** 2))
  return jnp.stack(values)


def condition_number(gram: np.ndarray) -> float:
  """``sqrt(lambda_max / lambda_min)`` over the nonzero eigenvalues of the Gram (Aligned-MTL 6.4).

  Eigenvalues below ``lambda_max * K * eps(float32)`` (the Gram is accumulated
  in float32) count as zero; solved in float64.
  """
  eigenvalues = np.linalg.eigvalsh(np.asarray(gram, np.float64))
  if not np.all(np.isfinite(eigenvalues)) or eigenvalues[-1] <= 0:
    return float("nan")
  kept = eigenvalues[eigenvalues > eigenvalues[-1] * len(eigenvalues) * np.finfo(np.float32).eps]
  return float(np.sqrt(kept[-1] / kept[0]))


@functools.partial(jax.jit, static_argnums=(0, 1))
def evaluate(graphdef, tasks, params, rest, x, ys):
  """Per-task test metrics; shared by every transform (compiled once per model structure)."""
  return task_metrics(nnx.merge(graphdef, params, rest)(x), ys, tasks)


@functools.partial(jax.jit, static_argnums=(0, 1))
def probe_gram(graphdef, tasks, params, rest, x, ys):
  """The Gram matrix of the trunk's per-task gradients on one batch."""
  _, jac = optax_mtl.value_and_jacobian(
      lambda p: task_losses(nnx.merge(graphdef, p, rest)(x), ys, tasks))(params)
  return optax_mtl.gram(jac, mask=trunk_only(params))


class Trainer:
  """The jitted train chunk of one model structure and transform.

  Its compiled step serves every problem with the same task kinds and sizes
  (the STL networks of same-shaped tasks share one).
  """

  def __init__(self, problem: datasets.Problem, make_tx, *, batch: int, chunk: int, lr: float):
    self.problem, self.make_tx, self.batch, self.chunk, self.lr = problem, make_tx, batch, chunk, lr
    tasks = problem.tasks
    self.graphdef, _, self.rest = nnx.split(self.new_model(0), nnx.Param, ...)

    def losses_of(params, x, ys):
      return task_losses(nnx.merge(self.graphdef, params, self.rest)(x), ys, tasks)

    def run_chunk(params, opt_state, key, x, ys):
      # The random transforms carry their key in the state, so seed 0's update serves every seed.
      tx = self.tx(0)

      def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        losses, jac = optax_mtl.value_and_jacobian(losses_of)(params, x[idx], [y[idx] for y in ys])
        updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (losses, optax.tree.get(opt_state, "weights"))

      (params, opt_state), (losses, weights) = jax.lax.scan(
          step, (params, opt_state), jax.random.split(key, chunk))
      return params, opt_state, losses.mean(axis=0), weights.mean(axis=0)

    self.run_chunk = jax.jit(run_chunk)

  def new_model(self, seed: int) -> MultiTaskNet:
    sizes = [task.size for task in self.problem.tasks]
    return MultiTaskNet(self.problem.splits["train"]["x"].shape[1], sizes, rngs=nnx.Rngs(seed))

  def tx(self, seed: int):
    return optax.chain(self.make_tx(seed), optax.adam(self.lr))

  def train(self, seed: int, steps: int, problem: datasets.Problem | None = None, desc: str = "",
            progress: bool = True) -> dict:
    """Trains from the seed's initialisation on ``problem`` (default: the trainer's own).

    Returns:
      ``{"history", "test", "sec_per_step", "first_call_s"}``: the history holds,
      after every call of ``chunk`` steps, the chunk's mean train losses and
      weights, the validation metrics and the condition number of the trunk's
      per-task gradients on a fixed batch of 512 training examples.
    """
    problem = problem or self.problem
    splits = {name: (jnp.asarray(s["x"]), [jnp.asarray(y) for y in s["y"]])
              for name, s in problem.splits.items()}
    x_train, ys_train = splits["train"]
    probe = (x_train[:512], [y[:512] for y in ys_train])
    # Task names do not change the computation; without them same-shaped tasks share the compilation.
    static = (self.graphdef, tuple(dataclasses.replace(t, name="") for t in problem.tasks))
    params = nnx.as_pure(nnx.state(self.new_model(seed), nnx.Param))
    opt_state = self.tx(seed).init(params)
    key = jax.random.key(10_000 + seed)
    history = {"step": [], "train_loss": [], "val": [], "weights": [], "cond": []}
    chunk_seconds = []
    for start in tqdm(range(0, steps, self.chunk), desc=desc, unit="chunk", leave=False, disable=not progress):
      key, sub = jax.random.split(key)
      tic = time.perf_counter()
      params, opt_state, losses, weights = self.run_chunk(params, opt_state, sub, x_train, ys_train)
      losses.block_until_ready()
      chunk_seconds.append(time.perf_counter() - tic)
      history["step"].append(start + self.chunk)
      history["train_loss"].append(np.asarray(losses).tolist())
      history["weights"].append(np.asarray(weights).tolist())
      history["val"].append(np.asarray(evaluate(*static, params, self.rest, *splits["val"])).tolist())
      history["cond"].append(condition_number(probe_gram(*static, params, self.rest, *probe)))
    # The first call compiles; later calls time the steps alone.
    timed = chunk_seconds[1:] or chunk_seconds
    return {"history": history, "test": np.asarray(evaluate(*static, params, self.rest, *splits["test"])).tolist(),
            "sec_per_step": float(np.median(timed) / self.chunk),
            "first_call_s": chunk_seconds[0]}


def delta_m(metrics, stl, higher_is_better) -> float:
  """nash-mtl's Delta_m% (lower is better) of per-metric values against the STL values."""
  metrics, stl = np.asarray(metrics, np.float64), np.asarray(stl, np.float64)
  sign = np.where(np.asarray(higher_is_better), -1.0, 1.0)
  return float(100.0 * np.mean(sign * (metrics - stl) / stl))


def mean_ranks(table, higher_is_better) -> np.ndarray:
  """Mean rank of each row of a (methods, metrics) table; 1 is best, ties share their mean rank.

  A non-finite value (a diverged run) ranks last.
  """
  table = np.asarray(table, np.float64)
  score = np.where(np.asarray(higher_is_better), -table, table)  # lower score is better
  score = np.where(np.isfinite(score), score, np.inf)
  ranks = np.empty_like(score)
  for j in range(score.shape[1]):
    column = score[:, j]
    for i, value in enumerate(column):
      # 1 + the number strictly better, + half of the others tied with it.
      ranks[i, j] = 1 + np.sum(column < value) + 0.5 * (np.sum(column == value) - 1)
  return ranks.mean(axis=1)


def single_task(problem: datasets.Problem, i: int) -> datasets.Problem:
  """The problem restricted to task ``i`` (for its STL network)."""
  splits = {name: dict(split, y=[split["y"][i]]) for name, split in problem.splits.items()}
  return dataclasses.replace(problem, tasks=(problem.tasks[i],), splits=splits)


def run_stl(problem, seeds, steps, *, batch, chunk, lr, progress=True) -> dict:
  """One network (trunk and a single head) per task, trained on its own loss with Adam."""
  test, sec, val = [], [], []
  trainers = {}  # same-shaped tasks share one compiled train step
  for i, task in enumerate(problem.tasks):
    own = single_task(problem, i)
    if (task.kind, task.size) not in trainers:
      trainers[task.kind, task.size] = Trainer(own, lambda seed: optax_mtl.linear_scalarization(1),
                                               batch=batch, chunk=chunk, lr=lr)
    trainer = trainers[task.kind, task.size]
    runs = [trainer.train(seed, steps, own, desc=f"stl[{task.name}] seed {seed}", progress=progress)
            for seed in seeds]
    test.append([r["test"][0] for r in runs])
    sec.append(np.mean([r["sec_per_step"] for r in runs]))
    val.append([[v[0] for v in r["history"]["val"]] for r in runs])
  return {"test": np.asarray(test).T.tolist(),  # (seeds, tasks)
          "sec_per_step": [float(s) for s in sec],  # per task's network
          "history": {"step": runs[0]["history"]["step"], "val_per_task": val}}


def run(problem_name: str, methods, seeds, steps, *, batch=128, chunk=100, lr=1e-3, progress=True) -> dict:
  """Trains STL and every method over the seeds; returns the results dict (see ``summarize``)."""
  if steps % chunk:
    raise ValueError(f"steps ({steps}) must be a multiple of the steps per call ({chunk}).")
  problem = datasets.PROBLEMS[problem_name](seed=0)
  k = len(problem.tasks)
  start = time.perf_counter()
  results = {"problem": problem_name,
             "config": {"seeds": list(seeds), "steps": steps, "batch": batch, "lr": lr, "eval_every": chunk,
                        "optimizer": "adam", "model": "MLP trunk 2x128 relu, per-task heads 32-relu-out"},
             "tasks": [{"name": t.name, "metric": t.metric, "higher_is_better": t.higher_is_better}
                       for t in problem.tasks],
             "sizes": {name: int(s["x"].shape[0]) for name, s in problem.splits.items()},
             "stl": run_stl(problem, seeds, steps, batch=batch, chunk=chunk, lr=lr, progress=progress),
             "methods": {}}
  for name in tqdm(methods, desc=problem_name, unit="method", disable=not progress):
    trainer = Trainer(problem, lambda seed, name=name: METHODS[name](k, seed, trunk_only),
                      batch=batch, chunk=chunk, lr=lr)
    runs = [trainer.train(seed, steps, desc=f"{name} seed {seed}", progress=progress) for seed in seeds]
    results["methods"][name] = {
        "test": [r["test"] for r in runs],
        "sec_per_step": float(np.mean([r["sec_per_step"] for r in runs])),
        "first_call_s": runs[0]["first_call_s"],
        "history": [r["history"] for r in runs],
    }
  results["wall_s"] = time.perf_counter() - start
  return summarize(results)


def summarize(results: dict) -> dict:
  """Adds means, stds, Delta_m% (against the STL mean) and the mean rank to ``results``."""
  higher = [t["higher_is_better"] for t in results["tasks"]]
  stl = np.asarray(results["stl"]["test"])
  stl_mean = stl.mean(axis=0)
  results["stl"].update(mean=stl_mean.tolist(), std=stl.std(axis=0).tolist())
  names = list(results["methods"])
  means = []
  for name in names:
    entry = results["methods"][name]
    test = np.asarray(entry["test"])
    per_seed = [delta_m(row, stl_mean, higher) for row in test]
    entry.update(mean=test.mean(axis=0).tolist(), std=test.std(axis=0).tolist(),
                 delta_m=delta_m(test.mean(axis=0), stl_mean, higher), delta_m_std=float(np.std(per_seed)),
                 diverged=bool(not np.all(np.isfinite(test))))
    means.append(test.mean(axis=0))
  if names:
    for name, rank in zip(names, mean_ranks(np.stack(means), higher)):
      results["methods"][name]["mean_rank"] = float(rank)
  return results


def markdown(results: dict) -> str:
  """The results table: mean +- std over seeds of every test metric, Delta_m%, MR, ms per step."""
  tasks = results["tasks"]
  cfg = results["config"]
  head = ["method"] + [f"{t['name']} {t['metric']} {'↑' if t['higher_is_better'] else '↓'}" for t in tasks]
  head += ["Δm% ↓", "MR ↓", "ms/step"]
  seeds = len(cfg["seeds"])
  lines = [f"**{results['problem']}** ({seeds} seed{'s' * (seeds > 1)}, {cfg['steps']} steps, batch {cfg['batch']}, "
           f"Adam lr {cfg['lr']}; test set of {results['sizes']['test']}; mean ± std over seeds)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def cells(mean, std):
    return [f"{m:.2f} ± {s:.2f}" if t["metric"] == "acc" else f"{m:.3g} ± {s:.2g}"
            for m, s, t in zip(mean, std, tasks)]

  stl = results["stl"]
  # STL trains one network per task: its cost per step of all tasks is the sum.
  stl_ms = 1e3 * sum(stl["sec_per_step"])
  lines.append("| " + " | ".join(["STL"] + cells(stl["mean"], stl["std"]) + ["0.00", "-", f"{stl_ms:.2f}"]) + " |")
  for name, entry in sorted(results["methods"].items(), key=lambda item: item[1]["delta_m"]):
    row = [SHORT[name]] + cells(entry["mean"], entry["std"])
    row += [f"{entry['delta_m']:.2f} ± {entry['delta_m_std']:.2f}", f"{entry['mean_rank']:.2f}",
            f"{1e3 * entry['sec_per_step']:.2f}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Validation curves, task weights and condition numbers; returns the PNG paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  problem, tasks = results["problem"], results["tasks"]
  names = list(results["methods"])
  colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:len(names) + 1]
  paths = []

  def mean_over_seeds(name, key):
    return np.mean([np.asarray(h[key], np.float64) for h in results["methods"][name]["history"]], axis=0)

  # Per-task validation curves.
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
  steps = results["stl"]["history"]["step"]
  for j, (ax, task) in enumerate(zip(axes[0], tasks)):
    stl_curve = np.mean(results["stl"]["history"]["val_per_task"][j], axis=0)
    ax.plot(steps, stl_curve, "k--", lw=1.5, label="STL")
    for name, color in zip(names, colors):
      ax.plot(steps, mean_over_seeds(name, "val")[:, j], color=color, lw=1, label=SHORT[name])
    ax.set_title(f"{task['name']} (val {task['metric']})", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if task["metric"] == "mse":
      ax.set_yscale("log")
  axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  paths.append(out / f"{problem}_curves.png")
  fig.savefig(paths[-1], dpi=70)
  plt.close(fig)

  # Task weights (the state's ``weights``; mean over each chunk's steps and over seeds).
  cols = 4
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.1 * rows), squeeze=False, sharex=True)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  for ax, name in zip(axes.flat, names):
    weights = mean_over_seeds(name, "weights")
    for j, task in enumerate(tasks):
      ax.plot(results["methods"][name]["history"][0]["step"], weights[:, j], lw=1, label=task["name"])
    # Weights that run away (Nash-MTL, SI, UW as a loss nears 0) would flatten the others' curves.
    if np.all(weights > 0) and weights.max() > 1e3 * weights.min():
      ax.set_yscale("log")
    ax.set_title(SHORT[name], fontsize=8)
    ax.tick_params(labelsize=6)
  axes.flat[0].legend(fontsize=6)
  fig.suptitle(f"{problem}: task weights in the optimizer state", fontsize=9)
  fig.tight_layout()
  paths.append(out / f"{problem}_weights.png")
  fig.savefig(paths[-1], dpi=70)
  plt.close(fig)

  # Condition number of the trunk's per-task gradients.
  fig, ax = plt.subplots(figsize=(6.0, 3.4))
  for name, color in zip(names, colors):
    ax.plot(results["methods"][name]["history"][0]["step"], mean_over_seeds(name, "cond"), color=color,
            lw=1, label=SHORT[name])
  ax.set_yscale("log")
  ax.set_xlabel("step", fontsize=8)
  ax.set_ylabel("condition number", fontsize=8)
  ax.set_title(f"{problem}: sqrt(λmax/λmin) of the trunk's per-task Gram (fixed batch of 512)", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  paths.append(out / f"{problem}_condition.png")
  fig.savefig(paths[-1], dpi=70)
  plt.close(fig)
  return paths


def write(results: dict, out: pathlib.Path, command: str) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``<problem>.json`` and ``<problem>.md`` (the table and the command) under ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  results = dict(results, command=command)
  json_path, md_path = out / f"{results['problem']}.json", out / f"{results['problem']}.md"
  json_path.write_text(json.dumps(results, indent=1))
  md_path.write_text(markdown(results) + f"\nProduced by `{command}` in {results['wall_s']:.0f} s.\n")
  return json_path, md_path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problem", choices=sorted(datasets.PROBLEMS), nargs="+", default=["multimnist"])
  parser.add_argument("--methods", choices=sorted(METHODS), nargs="+", default=list(METHODS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--eval-every", type=int, default=100, help="steps per jitted call and between evaluations")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("mtl_results"))
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  chunk = min(args.eval_every, args.steps)
  command = "python examples/mtl_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
  for problem in args.problem:
    results = run(problem, args.methods, args.seeds, args.steps, batch=args.batch,
                  chunk=chunk, lr=args.lr)
    json_path, md_path = write(results, args.out, command)
    print(md_path.read_text())
    if not args.no_plots:
      plot(results, args.out)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
  main()
