"""QM9 multi-task regression (Nash-MTL paper, section 6.1 and appendix D.1) with every optax_mtl method.

The benchmark of Navon et al. (2022), built on PyTorch Geometric's
``examples/qm9_nn_conv.py`` as the official code (AvivNavon/nash-mtl,
``experiments/quantum_chemistry``) uses it, in pure JAX:

- data (``qm9_data.py``): the 130,831 molecules of qm9pack's CSV files, the 11
  node and 5 edge features of PyG's QM9 on the complete graph of each
  molecule (padded to 29 atoms), 11 targets in the official units; after a
  seeded shuffle test = the first 10,000, val = the next 10,000, train = the
  rest (``--train-size``/``--val-size``/``--test-size`` keep prefixes of those
  parts); targets standardised with the training mean and std.
- model: Gilmer et al.'s MPNN as the example builds it (dim 64): ``lin0`` +
  ReLU; three rounds of ``m = relu(NNConv(out))``, ``out, h = GRU(m, h)`` with
  one NNConv (edge network ``Linear(5, 128), ReLU, Linear(128, dim * dim)``,
  mean aggregation, root weight and bias) and one GRU; ``Set2Set(dim, 3)``;
  ``lin1`` + ReLU; a ``Linear(dim, 1)`` head per task (stored together as the
  ``heads`` subtree: the task-specific parameters; everything else is shared).
  PyTorch's initialisation (uniform +-1/sqrt(fan_in); NNConv's bias zero).
  The edge network is never formed per edge: with ``a_ij = relu(Linear1(e_ij))``
  (128 values, the same in the three rounds), ``W(e_ij) h_j = sum_k a_ijk
  (W2_k h_j) + B2 h_j``, so each round forms ``U_j = W2 h_j`` (128 x dim) per
  atom and contracts it with ``a_ij`` (``--measure-edge-network`` times both).
- training as the paper: per-task MSE on the standardised targets; the
  method's transform chained before Adam (lr 1e-3, batch 120); PyTorch's
  ``ReduceLROnPlateau(mode="min", factor=0.7, patience=5, min_lr=1e-5)``
  stepped on the validation Delta_m% after every epoch (the learning rate is
  an ``optax.inject_hyperparams`` hyperparameter set from the host); the test
  MAEs are those of the parameters with the best validation Delta_m%. Each
  epoch is one jitted ``lax.scan`` over its batches (compiled ahead of time:
  the seconds per step exclude compilation); the last partial batch of an
  epoch is dropped (the next epoch's shuffle differs), evaluation pads the
  last batch with masked molecules.
- gradients: the methods that read only the losses (LS, SI, RLW, DWA, UW) and
  Nash-MTL with cached weights (``nash_mtl_every_5``/``_50``) take
  ``optax_mtl.task_gradients`` (one backward pass; the 11 only on a refresh),
  the others ``optax_mtl.value_and_jacobian`` (11 backward passes).
  ``nash_mtl_ccp``: Nash-MTL with the paper's CCP solver. ``stl``: 11
  single-task networks (one head each), trained side by side (``lax.map``)
  on the same batches, each with its own plateau schedule on its own task's
  validation MAE and selected at its best.
- metrics: test MAE per task in ``qm9_data.UNITS``; ``delta_m`` = nash-mtl's
  Delta_m% (lower is better, a flat mean over the 11 MAEs) against the
  paper's STL MAEs ``BASE``; with ``stl`` in the same invocation (or
  ``--stl-from`` an earlier ``qm9.json``) also ``delta_m_own`` against our
  STL and ``mr``, the mean rank over the 11 MAEs among the multi-task methods
  of the table.

Outputs: ``DIR/qm9.json`` (the pinned keys: ``protocol`` and, per method,
``mae``, ``delta_m``, ``delta_m_own``, ``mr``, ``seconds_per_step``,
``per_seed``), ``DIR/qm9.md`` and, with matplotlib, ``DIR/qm9_val_delta_m.png``,
``DIR/qm9_weights.png`` and ``DIR/qm9_gram_condition.png``.

  # the paper's protocol (needs a GPU: the paper reports 0.54 min per LS epoch, 6.8 for Nash-MTL; 3 seeds)
  python benchmarks/qm9.py --methods linear_scalarization scale_invariant random_weighting dwa \\
      uncertainty_weighting mgda pcgrad cagrad imtl_g nash_mtl nash_mtl_every_5 nash_mtl_every_50 stl \\
      --seeds 0 1 2 --epochs 300 --out qm9_results
  # the reduced CPU protocol of benchmarks/results/qm9_cpu.json (docs/qm9.md), split by method and merged
  python benchmarks/qm9.py --methods all --seeds 0 --train-size 4800 --val-size 1000 --test-size 2000 \\
      --epochs 3 --dim 16 --out qm9_cpu
  python benchmarks/qm9.py --merge run1 run2 steps/qm9_step_times.json --out qm9_cpu   # runs split by method/seed
  python benchmarks/qm9.py --tiny --methods linear_scalarization nash_mtl stl --out /tmp/qm9_tiny   # smoke
  python benchmarks/qm9.py --measure-edge-network --dim 64 --batch 120   # naive vs factored NNConv
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import qm9_data  # noqa: E402

K = len(qm9_data.TARGETS)
EDGE_HIDDEN = 128
ROUNDS = 3
SET2SET_STEPS = 3
SHARED = {"shared": True, "heads": False}  # a prefix mask of the params
BASE = np.asarray(qm9_data.PAPER_STL)
# The paper's Table 6 (3 seeds, the full protocol): Delta_m% and MR (mean rank over the 11 MAEs among these 10).
PAPER_TABLE_6 = {
    "linear_scalarization": (177.6, 6.8), "scale_invariant": (77.8, 4.0), "random_weighting": (203.8, 8.2),
    "dwa": (175.3, 6.4), "uncertainty_weighting": (108.0, 5.3), "mgda": (120.5, 5.9), "pcgrad": (125.7, 5.0),
    "cagrad": (112.8, 5.7), "imtl_g": (77.2, 4.7), "nash_mtl": (62.0, 2.5),
}
# The paper's Table 7: minutes per epoch on its GPU.
PAPER_MINUTES_PER_EPOCH = {"linear_scalarization": 0.54, "mgda": 7.25, "pcgrad": 7.47, "cagrad": 6.85,
                           "nash_mtl": 6.76, "nash_mtl_every_5": 1.81, "nash_mtl_every_50": 0.69}

# name -> (factory (num_tasks, seed) -> transform, gradient path)
METHODS = {
    "linear_scalarization": (lambda k, s: optax_mtl.linear_scalarization(k), "lazy"),
    "scale_invariant": (lambda k, s: optax_mtl.scale_invariant(k), "lazy"),
    "random_weighting": (lambda k, s: optax_mtl.random_weighting(k, key=s), "lazy"),
    "dwa": (lambda k, s: optax_mtl.dwa(k), "lazy"),
    "uncertainty_weighting": (lambda k, s: optax_mtl.uncertainty_weighting(k), "lazy"),
    "nash_mtl": (lambda k, s: optax_mtl.nash_mtl(k, shared=SHARED), "jacobian"),
    "nash_mtl_every_5": (lambda k, s: optax_mtl.nash_mtl(k, shared=SHARED, update_weights_every=5), "lazy"),
    "nash_mtl_every_50": (lambda k, s: optax_mtl.nash_mtl(k, shared=SHARED, update_weights_every=50), "lazy"),
    "nash_mtl_ccp": (lambda k, s: optax_mtl.nash_mtl(k, shared=SHARED, solver="ccp"), "jacobian"),
    "mgda": (lambda k, s: optax_mtl.mgda(k, shared=SHARED), "jacobian"),
    "aligned_mtl": (lambda k, s: optax_mtl.aligned_mtl(k, shared=SHARED), "jacobian"),
    "cagrad": (lambda k, s: optax_mtl.cagrad(k, c=0.4, shared=SHARED), "jacobian"),
    "imtl_g": (lambda k, s: optax_mtl.imtl_g(k, shared=SHARED), "jacobian"),
    "pcgrad": (lambda k, s: optax_mtl.pcgrad(k, key=s, shared=SHARED), "jacobian"),
    "gradvac": (lambda k, s: optax_mtl.gradvac(k, key=s, shared=SHARED), "jacobian"),
    "graddrop": (lambda k, s: optax_mtl.graddrop(k, key=s, shared=SHARED), "jacobian"),
    "upgrad": (lambda k, s: optax_mtl.upgrad(k, shared=SHARED), "jacobian"),
    "dualproj": (lambda k, s: optax_mtl.dualproj(k, shared=SHARED), "jacobian"),
    "gradnorm": (lambda k, s: optax_mtl.gradnorm(k, shared=SHARED), "jacobian"),
}
STL = "stl"
SHORT = {"linear_scalarization": "LS", "scale_invariant": "SI", "random_weighting": "RLW", "dwa": "DWA",
         "uncertainty_weighting": "UW", "nash_mtl": "Nash-MTL", "nash_mtl_every_5": "Nash-MTL-5",
         "nash_mtl_every_50": "Nash-MTL-50", "nash_mtl_ccp": "Nash-MTL (CCP)", "mgda": "MGDA",
         "aligned_mtl": "Aligned-MTL", "cagrad": "CAGrad", "imtl_g": "IMTL-G", "pcgrad": "PCGrad",
         "gradvac": "GradVac", "graddrop": "GradDrop", "upgrad": "UPGrad", "dualproj": "DualProj",
         "gradnorm": "GradNorm", STL: "STL"}
ALL = [STL, *METHODS]


# ----------------------------------------------------------------------------- model


def _bias(b, ndim):
  return b.reshape((1,) * (ndim - 1) + b.shape)


def dense(p, x):
  y = jnp.tensordot(x, p["w"], axes=1)
  return y + _bias(p["b"], y.ndim)


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _linear_init(key, fan_in, fan_out):
  """PyTorch's ``nn.Linear`` initialisation: weight and bias uniform in +-1/sqrt(fan_in); ``w`` is (in, out)."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(fan_in)
  return {"w": _uniform(kw, (fan_in, fan_out), bound), "b": _uniform(kb, (fan_out,), bound)}


def _recurrent_init(key, fan_in, hidden, gates):
  """PyTorch's GRU/LSTM initialisation: every weight and bias uniform in +-1/sqrt(hidden)."""
  keys = jax.random.split(key, 4)
  bound = 1.0 / math.sqrt(hidden)
  return {"w_ih": _uniform(keys[0], (fan_in, gates * hidden), bound),
          "w_hh": _uniform(keys[1], (hidden, gates * hidden), bound),
          "b_ih": _uniform(keys[2], (gates * hidden,), bound),
          "b_hh": _uniform(keys[3], (gates * hidden,), bound)}


def init_params(key, dim: int = 64, num_heads: int = K) -> dict:
  """``{"shared": ..., "heads": ...}`` of the MPNN; ``heads`` is one ``Linear(dim, num_heads)``."""
  keys = jax.random.split(key, 8)
  conv = {"edge1": _linear_init(keys[1], qm9_data.NUM_EDGE_FEATURES, EDGE_HIDDEN),
          "edge2": _linear_init(keys[2], EDGE_HIDDEN, dim * dim),
          # PyG's NNConv: root weight Linear(in, out, bias=False, weight_initializer="uniform"), bias zeros.
          "root": _uniform(keys[3], (dim, dim), 1.0 / math.sqrt(dim)),
          "bias": jnp.zeros((dim,), jnp.float32)}
  shared = {"lin0": _linear_init(keys[0], qm9_data.NUM_NODE_FEATURES, dim), "conv": conv,
            "gru": _recurrent_init(keys[4], dim, dim, 3),
            "set2set": _recurrent_init(keys[5], 2 * dim, dim, 4),
            "lin1": _linear_init(keys[6], 2 * dim, dim)}
  return {"shared": shared, "heads": _linear_init(keys[7], dim, num_heads)}


def _recurrent_inputs(p, x, h):
  return dense({"w": p["w_ih"], "b": p["b_ih"]}, x), dense({"w": p["w_hh"], "b": p["b_hh"]}, h)


def gru(p, x, h):
  """PyTorch's GRU cell (gates r, z, n)."""
  gi, gh = _recurrent_inputs(p, x, h)
  ir, iz, in_ = jnp.split(gi, 3, axis=-1)
  hr, hz, hn = jnp.split(gh, 3, axis=-1)
  r, z = jax.nn.sigmoid(ir + hr), jax.nn.sigmoid(iz + hz)
  n = jnp.tanh(in_ + r * hn)
  return (1.0 - z) * n + z * h


def lstm(p, x, h, c):
  """PyTorch's LSTM cell (gates i, f, g, o)."""
  gi, gh = _recurrent_inputs(p, x, h)
  i, f, g, o = jnp.split(gi + gh, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def set2set(p, x, mask, steps: int = SET2SET_STEPS):
  """PyG's ``Set2Set``: ``steps`` LSTM queries attending over each molecule's atoms; ``(B, 2 dim)``."""
  batch, _, dim = x.shape
  h = c = jnp.zeros((batch, dim), x.dtype)
  q_star = jnp.zeros((batch, 2 * dim), x.dtype)
  for _ in range(steps):
    h, c = lstm(p, q_star, h, c)
    scores = jnp.where(mask, jnp.einsum("bnd,bd->bn", x, h), -1e30)
    attention = jax.nn.softmax(scores, axis=1) * mask
    q_star = jnp.concatenate([h, jnp.einsum("bn,bnd->bd", attention, x)], axis=-1)
  return q_star


EDGE_NETWORKS = ("factored", "factored_t", "naive")


def nnconv(p, x, a, pair, degree, edge_network: str = "factored"):
  """PyG's ``NNConv(dim, dim, nn, aggr="mean")`` on the complete graph of each molecule.

  ``x`` ``(B, N, dim)``; ``a`` ``(B, N, N, 128)`` the edge network's hidden
  layer (zero on masked pairs); ``pair`` ``(B, N, N)`` the valid ordered pairs
  (message from ``j`` to ``i``); ``degree`` ``(B,)`` neighbours per atom.
  ``edge_network``: ``"factored"`` forms ``U_j = W2 x_j`` per atom and
  contracts it with ``a_ij``; ``"factored_t"`` contracts ``a_ij`` with ``x_j``
  first, then with ``W2``; ``"naive"`` forms the ``dim x dim`` matrix of every
  edge as PyG does (for tests and measurements only).
  """
  dim = x.shape[-1]
  hidden = a.shape[-1]
  w2 = p["edge2"]["w"].reshape(hidden, dim, dim)  # [k, in, out], PyTorch's view(-1, in, out)
  b2 = p["edge2"]["b"].reshape(dim, dim)
  pair = pair.astype(x.dtype)
  if edge_network == "naive":
    weights = jnp.einsum("bijk,kq->bijq", a, p["edge2"]["w"]) + _bias(p["edge2"]["b"], 4)
    weights = weights.reshape(*weights.shape[:3], dim, dim)
    messages = jnp.einsum("bij,bjc,bijco->bio", pair, x, weights)
  else:
    # Plain (batched) matrix products: XLA:CPU runs their gradients about twice as fast as the
    # equivalent einsums (dim 64, batch 120: 0.71 s against 1.51 s for one round's forward+backward).
    batch, n = x.shape[:2]
    if edge_network == "factored":
      # U_j = W2 x_j for every atom: (B N, dim) @ (dim, 128 dim), laid out (B, N 128, dim).
      u = jnp.matmul(x.reshape(batch * n, dim), jnp.transpose(w2, (1, 0, 2)).reshape(dim, hidden * dim))
      messages = jnp.matmul(a.reshape(batch, n, n * hidden), u.reshape(batch, n * hidden, dim))
    elif edge_network == "factored_t":
      # T_i = sum_j a_ij x_j^T (128 x dim) per atom, then one (B N, 128 dim) @ (128 dim, dim) product.
      t = jnp.matmul(jnp.transpose(a, (0, 1, 3, 2)).reshape(batch, n * hidden, n), x)
      messages = jnp.matmul(t.reshape(batch * n, hidden * dim), w2.reshape(hidden * dim, dim)).reshape(batch, n, dim)
    else:
      raise ValueError(f"edge_network must be one of {EDGE_NETWORKS}, got {edge_network!r}")
    messages = messages + jnp.tensordot(jnp.einsum("bij,bjc->bic", pair, x), b2, axes=1)
  mean = messages / degree.reshape(-1, 1, 1)
  return mean + jnp.tensordot(x, p["root"], axes=1) + _bias(p["bias"], 3)


def graph_inputs(graph, pyg_sdf: bool = False):
  """Masks and features of a batch: ``(mask, pair, degree, node features, edge features)``."""
  n = graph["atoms"].shape[1]
  mask = jnp.arange(n).reshape(1, n) < graph["num_atoms"].astype(jnp.int32).reshape(-1, 1)
  pair = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
  degree = jnp.maximum(graph["num_atoms"].astype(jnp.float32) - 1.0, 1.0)
  nodes = qm9_data.node_features(graph["atoms"], jnp, pyg_sdf=pyg_sdf)
  edges = qm9_data.edge_features(graph["bonds"], graph["positions"], jnp)
  return mask, pair, degree, nodes, edges


def encode(shared, graph, *, pyg_sdf: bool = False, edge_network: str = "factored"):
  """The shared representation ``(B, dim)`` (the output of ``lin1`` + ReLU)."""
  mask, pair, degree, nodes, edges = graph_inputs(graph, pyg_sdf)
  out = jax.nn.relu(dense(shared["lin0"], nodes))
  h = out
  # The edge network's hidden layer is the same in the three rounds.
  a = jax.nn.relu(dense(shared["conv"]["edge1"], edges)) * pair[..., None].astype(out.dtype)
  for _ in range(ROUNDS):
    m = jax.nn.relu(nnconv(shared["conv"], out, a, pair, degree, edge_network))
    out = h = gru(shared["gru"], m, h)
  return jax.nn.relu(dense(shared["lin1"], set2set(shared["set2set"], out, mask)))


def predict(params, graph, **options):
  """``(B, num_heads)`` standardised predictions."""
  return dense(params["heads"], encode(params["shared"], graph, **options))


def task_losses(params, graph, **options):
  """``(K,)`` per-task MSE on the standardised targets over the batch's real molecules."""
  err = (predict(params, graph, **options) - graph["targets"]) ** 2
  weight = graph["weight"]
  return jnp.sum(err * weight[:, None], axis=0) / jnp.maximum(jnp.sum(weight), 1.0)


# ----------------------------------------------------------------------------- data on the device


def prepare(data: dict, args) -> dict:
  """Splits, standardises and moves the arrays to the device: ``{"train", "val", "test", "std", ...}``."""
  parts = qm9_data.split(len(data["targets"]), args.split_seed, train_size=args.train_size,
                         val_size=args.val_size, test_size=args.test_size)
  train_targets = data["targets"][parts["train"]]
  mean, std = train_targets.mean(axis=0), train_targets.std(axis=0, ddof=1)
  bonds = data["bonds_kekule"] if args.pyg_sdf_features else data["bonds"]

  def arrays(indices, pad_to=None):
    n = len(indices)
    size = n if pad_to is None else -(-n // pad_to) * pad_to
    take = np.concatenate([indices, np.full(size - n, indices[0])]) if size > n else indices
    weight = np.zeros(size, np.float32)
    weight[:n] = 1.0
    num_atoms = data["num_atoms"][take].copy()
    num_atoms[n:] = 0  # masked molecules: no atoms
    return {"atoms": jnp.asarray(data["atoms"][take]), "bonds": jnp.asarray(bonds[take]),
            "positions": jnp.asarray(data["positions"][take]), "num_atoms": jnp.asarray(num_atoms),
            "targets": jnp.asarray(((data["targets"][take] - mean) / std).astype(np.float32)),
            "weight": jnp.asarray(weight)}

  return {"train": arrays(parts["train"]), "val": arrays(parts["val"], args.eval_batch),
          "test": arrays(parts["test"], args.eval_batch), "mean": mean, "std": std,
          "sizes": {name: int(len(p)) for name, p in parts.items()}}


def take(split, idx):
  return jax.tree.map(lambda a: a[idx], split)


# ----------------------------------------------------------------------------- training


class ReduceLROnPlateau:
  """PyTorch's ``ReduceLROnPlateau`` (mode min, relative threshold 1e-4, no cooldown) on the host."""

  def __init__(self, lr, factor=0.7, patience=5, min_lr=1e-5, threshold=1e-4, eps=1e-8):
    self.lr, self.factor, self.patience, self.min_lr = lr, factor, patience, min_lr
    self.threshold, self.eps = threshold, eps
    self.best, self.bad_epochs = math.inf, 0

  def step(self, value: float) -> float:
    if value < self.best * (1.0 - self.threshold):
      self.best, self.bad_epochs = value, 0
    else:
      self.bad_epochs += 1
    if self.bad_epochs > self.patience:
      new = max(self.lr * self.factor, self.min_lr)
      if self.lr - new > self.eps:
        self.lr = new
      self.bad_epochs = 0
    return self.lr


def delta_m(mae, base) -> float:
  """nash-mtl's Delta_m% (every metric lower-is-better): ``100 mean((M - M_STL) / M_STL)``."""
  mae, base = np.asarray(mae, np.float64), np.asarray(base, np.float64)
  return float(100.0 * np.mean((mae - base) / base))


def mean_ranks(table) -> np.ndarray:
  """Mean rank of each row of a (methods, metrics) table, lower is better; ties share their mean rank."""
  table = np.where(np.isfinite(table), np.asarray(table, np.float64), np.inf)
  ranks = np.empty_like(table)
  for j in range(table.shape[1]):
    column = table[:, j]
    for i, value in enumerate(column):
      ranks[i, j] = 1 + np.sum(column < value) + 0.5 * (np.sum(column == value) - 1)
  return ranks.mean(axis=1)


def rank_correlation(x, y) -> float:
  """Spearman's rank correlation of two sequences (ties share their mean rank)."""
  rx, ry = (mean_ranks(np.asarray(v, np.float64)[:, None]) for v in (x, y))
  rx, ry = rx - rx.mean(), ry - ry.mean()
  return float(np.sum(rx * ry) / np.sqrt(np.sum(rx**2) * np.sum(ry**2)))


def paper_comparison(results: dict) -> dict | None:
  """Our Delta_m% and MR next to the paper's Table 6 on the methods both have, and the rank correlation.

  MR is recomputed among those methods only (the paper ranks its 10), so the two MR columns compare.
  """
  methods = results["methods"]
  common = [name for name in PAPER_TABLE_6 if name in methods]
  if len(common) < 2:
    return None
  ours = [methods[name]["delta_m"] for name in common]
  paper = [PAPER_TABLE_6[name][0] for name in common]
  ranks = mean_ranks(np.asarray([methods[name]["mae"] for name in common]))
  rows = {name: {"delta_m": d, "delta_m_paper": PAPER_TABLE_6[name][0], "mr": float(r),
                 "mr_paper": PAPER_TABLE_6[name][1], "delta_m_own": methods[name].get("delta_m_own")}
          for name, d, r in zip(common, ours, ranks)}
  return {"methods": rows, "spearman_delta_m": rank_correlation(ours, paper),
          "spearman_mr": rank_correlation(ranks, [PAPER_TABLE_6[name][1] for name in common])}


def merge(paths) -> dict:
  """One result from several ``qm9.json`` of the same protocol (runs split by method or seed).

  A ``qm9_step_times.json`` (``--time-steps``) among them is kept as ``step_times``: the table's time per step.
  """
  merged = None
  step_times = None
  for path in paths:
    path = pathlib.Path(path)
    part = json.loads((path / "qm9.json" if path.is_dir() else path).read_text())
    if part.get("benchmark") == "qm9_step_times":
      step_times = part
      continue
    if merged is None:
      merged = dict(part, methods={}, commands=[], wall_s=0.0)
    same = {k: v for k, v in part["protocol"].items() if k not in ("seeds", "paths")}
    if same != {k: v for k, v in merged["protocol"].items() if k not in ("seeds", "paths")}:
      raise ValueError(f"{path}: another protocol than the first file's; only the seeds and methods may differ")
    merged["commands"].append(part["command"])
    merged["wall_s"] += part.get("wall_s", 0.0)
    merged["protocol"]["paths"].update(part["protocol"]["paths"])
    merged["protocol"]["seeds"] = sorted(set(merged["protocol"]["seeds"]) | set(part["protocol"]["seeds"]))
    for name, entry in part["methods"].items():
      runs = merged["methods"].setdefault(name, {"per_seed": []})["per_seed"]
      if {r["seed"] for r in runs} & {r["seed"] for r in entry["per_seed"]}:
        raise ValueError(f"{path}: {name} has a seed that an earlier file already holds")
      runs.extend(entry["per_seed"])
      runs.sort(key=lambda r: r["seed"])
  merged["command"] = " && ".join(merged.pop("commands"))
  merged.pop("stl_mae", None)
  if step_times is not None:
    if step_times["protocol"]["dim"] != merged["protocol"]["dim"]:
      raise ValueError(f"step times at dim {step_times['protocol']['dim']}, the runs at {merged['protocol']['dim']}")
    merged["step_times"] = step_times
  return summarize(merged)


def condition_number(gram) -> tuple[float, float]:
  """``(sqrt(lambda_max / lambda_min), lambda_min)`` of the Gram (eigenvalues below ``lambda_max K eps`` dropped)."""
  eigenvalues = np.linalg.eigvalsh(np.asarray(gram, np.float64))
  if not np.all(np.isfinite(eigenvalues)) or eigenvalues[-1] <= 0:
    return float("nan"), float("nan")
  kept = eigenvalues[eigenvalues > eigenvalues[-1] * len(eigenvalues) * np.finfo(np.float32).eps]
  return float(np.sqrt(kept[-1] / kept[0])), float(eigenvalues[0])


def subsample(values, max_points: int = 100):
  """``(epochs, values)`` at most ``max_points`` evenly spaced epochs (1-based), the last one included."""
  n = len(values)
  keep = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)) if n else np.zeros(0, int)
  return [int(i) + 1 for i in keep], [values[i] for i in keep]


class Runner:
  """One method's (or STL's) compiled epoch, evaluation and Gram probe, shared by its seeds."""

  def __init__(self, method: str, data: dict, args):
    self.method, self.data, self.args = method, data, args
    self.options = {"pyg_sdf": args.pyg_sdf_features, "edge_network": args.edge_network}
    self.stl = method == STL
    self.steps = data["sizes"]["train"] // args.batch
    if self.steps < 1:
      raise ValueError(f"--train-size {data['sizes']['train']} is below one batch of {args.batch}")
    losses_of = functools.partial(task_losses, **self.options)
    self.adam = adam = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr)
    if not self.stl:
      self.factory, self.path = METHODS[method]
    grad_kwargs = {"batch_size": args.jacobian_batch_size}

    def mtl_step(tx, carry, idx):
      params, opt_state = carry
      graph = take(data["train"], idx)
      if self.path == "lazy":
        grads = optax_mtl.task_gradients(losses_of, **grad_kwargs)(params, graph)
        losses = grads.losses
      else:
        losses, grads = optax_mtl.value_and_jacobian(losses_of, **grad_kwargs)(params, graph)
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (losses, optax.tree.get(opt_state, "weights"))

    def stl_step(carry, idx):
      params, opt_state = carry
      graph = take(data["train"], idx)

      def one(p, state, task):
        def loss(p):
          pred = predict(p, graph, **self.options)[:, 0]
          return jnp.mean((pred - jnp.take(graph["targets"], task, axis=1)) ** 2)

        value, grads = jax.value_and_grad(loss)(p)
        updates, state = adam.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

      # One network after the other: on a CPU, 2.6x faster than vmapping the 11 (dim 16, batch 120).
      params, opt_state, losses = jax.lax.map(lambda args: one(*args), (params, opt_state, jnp.arange(K)))
      return (params, opt_state), (losses, jnp.ones((K,), jnp.float32))

    def run_epoch(params, opt_state, idx, seed_tx=None):
      step = stl_step if self.stl else functools.partial(mtl_step, seed_tx)
      (params, opt_state), (losses, weights) = jax.lax.scan(step, (params, opt_state), idx)
      return params, opt_state, losses.mean(axis=0), weights.mean(axis=0)

    self._run_epoch = run_epoch
    self._compiled = {}

    @jax.jit
    def eval_batch(params, graph):
      if self.stl:  # model t's prediction of task t
        pred = jax.vmap(lambda p: predict(p, graph, **self.options)[:, 0])(params).T
      else:
        pred = predict(params, graph, **self.options)
      return jnp.sum(jnp.abs(pred - graph["targets"]) * graph["weight"][:, None], axis=0)

    self._eval_batch = eval_batch

    @jax.jit
    def probe_gram(params, graph):
      _, jac = optax_mtl.value_and_jacobian(losses_of, **grad_kwargs)(params, graph)
      return optax_mtl.gram(jac, mask=SHARED)

    self._probe_gram = probe_gram
    n_probe = min(args.batch, data["sizes"]["train"])
    self.probe = take(data["train"], jnp.arange(n_probe))

  def tx(self, seed):
    """The method's transform chained before Adam (STL: Adam alone, per network)."""
    return self.adam if self.stl else optax.chain(self.factory(K, seed), self.adam)

  def init(self, seed):
    key = jax.random.key(seed)
    if self.stl:
      params = jax.vmap(lambda k: init_params(k, self.args.dim, 1))(jax.random.split(key, K))
      return params, jax.vmap(self.adam.init)(params)
    params = init_params(key, self.args.dim, K)
    return params, self.tx(seed).init(params)

  def compiled_epoch(self, seed, params, opt_state, idx):
    """The epoch compiled ahead of time (once per method: the random transforms keep their key in the state)."""
    if "epoch" not in self._compiled:
      tx = None if self.stl else self.tx(seed)
      fn = jax.jit(functools.partial(self._run_epoch, seed_tx=tx))
      start = time.perf_counter()
      self._compiled["epoch"] = fn.lower(params, opt_state, idx).compile()
      self._compiled["compile_s"] = time.perf_counter() - start
    return self._compiled["epoch"]

  def evaluate(self, params, split) -> np.ndarray:
    """MAE per task in ``qm9_data.UNITS``."""
    graph = self.data[split]
    n, batch = graph["weight"].shape[0], self.args.eval_batch
    total = sum(self._eval_batch(params, take(graph, slice(i, i + batch))) for i in range(0, n, batch))
    count = float(jnp.sum(graph["weight"]))
    return np.asarray(total, np.float64) / count * self.data["std"]

  def gram_probe(self, params):
    if self.stl:
      return float("nan"), float("nan")
    return condition_number(self._probe_gram(params, self.probe))

  def train(self, seed: int, progress: bool = True) -> dict:
    args = self.args
    params, opt_state = self.init(seed)
    rng = np.random.default_rng(10_000 + seed)
    n_train = self.data["sizes"]["train"]
    schedulers = [ReduceLROnPlateau(args.lr) for _ in range(K if self.stl else 1)]
    best_value = np.full(K if self.stl else 1, np.inf)
    best_params = [None] * len(best_value)
    history = {"val_delta_m": [], "val_mae": [], "lr": [], "train_loss": [], "weights": [], "gram_cond": [],
               "gram_min_eigenvalue": [], "nonfinite_count": [], "epoch_seconds": []}
    best_epoch = [0] * len(best_value)
    bar = tqdm(range(args.epochs), desc=f"{self.method} seed {seed}", unit="epoch", leave=False,
               disable=not progress)
    for epoch in bar:
      idx = jnp.asarray(rng.permutation(n_train)[:self.steps * args.batch].reshape(self.steps, args.batch))
      epoch_fn = self.compiled_epoch(seed, params, opt_state, idx)
      start = time.perf_counter()
      params, opt_state, losses, weights = epoch_fn(params, opt_state, idx)
      losses.block_until_ready()
      history["epoch_seconds"].append(time.perf_counter() - start)
      val = self.evaluate(params, "val")
      val_delta = delta_m(val, BASE)
      history["val_mae"].append(val.tolist())
      history["val_delta_m"].append(val_delta)
      history["train_loss"].append(np.asarray(losses).tolist())
      history["weights"].append(np.asarray(weights).tolist())
      cond, lam_min = self.gram_probe(params)
      history["gram_cond"].append(cond)
      history["gram_min_eigenvalue"].append(lam_min)
      if not self.stl:
        count = int(optax.tree.get(opt_state, "nonfinite_count"))
        if history["nonfinite_count"] and count > history["nonfinite_count"][-1]:
          warnings.warn(f"{self.method} seed {seed}: {count - history['nonfinite_count'][-1]} step(s) skipped"
                        f" for non-finite gradients in epoch {epoch + 1} (nonfinite_count {count})")
        history["nonfinite_count"].append(count)
      # Selection and the plateau schedule: on the validation Delta_m% (STL: each model on its own task's MAE).
      criteria = val if self.stl else np.array([val_delta])
      host = None
      for i, value in enumerate(criteria):
        if value <= best_value[i]:
          best_value[i], best_epoch[i] = value, epoch + 1
          host = host if host is not None else jax.device_get(params)
          best_params[i] = jax.tree.map(lambda a, i=i: a[i], host) if self.stl else host
      lrs = [s.step(float(v)) for s, v in zip(schedulers, criteria)]
      opt_state = optax.tree.set(opt_state, learning_rate=jnp.asarray(lrs if self.stl else lrs[0], jnp.float32))
      history["lr"].append(lrs if self.stl else lrs[0])
      bar.set_postfix(val_delta_m=f"{val_delta:.1f}", lr=f"{lrs[0]:.2g}")
    if self.stl:
      best = jax.tree.map(lambda *leaves: jnp.stack(leaves), *best_params)
    else:
      best = best_params[0]
    test = self.evaluate(best, "test")
    epochs_axis, weights = subsample(history["weights"])
    cond_axis, cond = subsample(history["gram_cond"])
    seconds = history["epoch_seconds"]
    return {
        "seed": seed, "mae": test.tolist(), "delta_m": delta_m(test, BASE),
        "best_epoch": best_epoch if self.stl else best_epoch[0],
        "val_delta_m": history["val_delta_m"], "val_mae": history["val_mae"], "lr": history["lr"],
        "train_loss": history["train_loss"],
        "weights": {"epochs": epochs_axis, "values": weights},
        "gram_condition": {"epochs": cond_axis, "values": cond,
                           "min_eigenvalue": subsample(history["gram_min_eigenvalue"])[1]},
        "nonfinite_count": history["nonfinite_count"],
        "seconds_per_step": float(np.median(seconds) / self.steps), "steps_per_epoch": self.steps,
        "epoch_seconds": seconds, "compile_s": self._compiled["compile_s"],
    }


# ----------------------------------------------------------------------------- results


def summarize(results: dict, stl_mae=None) -> dict:
  """Means over seeds, Delta_m% against the paper's and our STL, and the mean rank of the MTL methods."""
  methods = results["methods"]
  for entry in methods.values():
    runs = entry["per_seed"]
    maes = np.asarray([r["mae"] for r in runs])
    entry["mae"] = maes.mean(axis=0).tolist()
    entry["mae_std"] = maes.std(axis=0).tolist()
    entry["delta_m"] = float(np.mean([r["delta_m"] for r in runs]))
    entry["delta_m_std"] = float(np.std([r["delta_m"] for r in runs]))
    entry["seconds_per_step"] = float(np.mean([r["seconds_per_step"] for r in runs]))
  if STL in methods:
    stl_mae = methods[STL]["mae"]
  results["stl_mae"] = stl_mae
  mtl = [name for name in methods if name != STL]
  if stl_mae is not None:
    for name, entry in methods.items():
      per_seed = [delta_m(r["mae"], stl_mae) for r in entry["per_seed"]]
      entry["delta_m_own"] = float(np.mean(per_seed))
      for run, value in zip(entry["per_seed"], per_seed):
        run["delta_m_own"] = value
  if stl_mae is not None and mtl:
    ranks = mean_ranks(np.asarray([methods[name]["mae"] for name in mtl]))
    for name, rank in zip(mtl, ranks):
      methods[name]["mr"] = float(rank)
  results["paper_comparison"] = paper_comparison(results)
  return results


PAPER_PROTOCOL = {"train_size": 110_831, "val_size": 10_000, "test_size": 10_000, "epochs": 300, "dim": 64,
                  "batch": 120}


def markdown(results: dict) -> str:
  p = results["protocol"]
  reduced = [f"{k} {p[k]} (paper {v})" for k, v in PAPER_PROTOCOL.items() if p[k] != v]
  label = ("**Reduced protocol**: " + ", ".join(reduced) + ".") if reduced else "The paper's protocol."
  head = ["method", *(f"{t} ({u})" for t, u in zip(qm9_data.TARGETS, qm9_data.UNITS)), "Δm% ↓", "Δm% own ↓",
          "MR ↓", "seeds", "s/step"]
  lines = [f"**QM9** (train/val/test {p['train_size']}/{p['val_size']}/{p['test_size']}, {p['epochs']} epochs,"
           f" dim {p['dim']}, batch {p['batch']}, Adam lr {p['lr']}; test MAE at the best validation Δm%, mean over"
           " seeds; Δm% ± std over seeds against the paper's STL, Δm% own against ours; MR among the multi-task"
           f" methods of this table). {label}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = sorted(results["methods"].items(), key=lambda item: (item[0] != STL, item[1]["delta_m"]))
  for name, entry in order:
    own = entry.get("delta_m_own")
    row = [SHORT.get(name, name), *(f"{v:.4g}" for v in entry["mae"]),
           f"{entry['delta_m']:.1f} ± {entry['delta_m_std']:.1f}",
           "-" if own is None else f"{own:.1f}", f"{entry['mr']:.2f}" if "mr" in entry else "-",
           str(len(entry["per_seed"])), f"{entry['seconds_per_step']:.3f}"]
    lines.append("| " + " | ".join(row) + " |")
  lines.append("| paper STL | " + " | ".join(f"{v:.4g}" for v in BASE) + " | 0.0 | - | - | - | - |")
  comparison = results.get("paper_comparison")
  if comparison:
    lines += ["", "**Against the paper's Table 6** (ours under the protocol above; MR among these methods only)", "",
              "| method | Δm% (ours) | Δm% (paper) | MR (ours) | MR (paper) |", "|---|---|---|---|---|"]
    for name, row in sorted(comparison["methods"].items(), key=lambda item: item[1]["delta_m_paper"]):
      lines.append(f"| {SHORT[name]} | {row['delta_m']:.1f} | {row['delta_m_paper']:.1f} | {row['mr']:.2f} |"
                   f" {row['mr_paper']:.1f} |")
    lines += ["", f"Spearman rank correlation with the paper: {comparison['spearman_delta_m']:.2f} on Δm%,"
              f" {comparison['spearman_mr']:.2f} on MR ({len(comparison['methods'])} methods)."]
  step_times = results.get("step_times")
  if step_times:
    seconds = {name: t["seconds_per_step"] for name, t in step_times["timings"].items()}
    sp = step_times["protocol"]
    source = (f"timed round-robin in one process, median of {next(iter(step_times['timings'].values()))['repeats']},"
              f" dim {sp['dim']}, batch {sp['batch']}; `{step_times['command']}`")
  else:
    seconds = {name: entry["seconds_per_step"] for name, entry in results["methods"].items()}
    source = "the training runs' median epoch over its steps"
  if "linear_scalarization" in seconds:
    ls = seconds["linear_scalarization"]
    paper_ls = PAPER_MINUTES_PER_EPOCH["linear_scalarization"]
    lines += ["", f"**Time per step against LS** (ours: seconds per training step, {source}; the paper: its"
              " Table 7, minutes per epoch on its GPU)", "", "| method | s/step | × LS | paper × LS |",
              "|---|---|---|---|"]
    for name, t in seconds.items():
      paper = PAPER_MINUTES_PER_EPOCH.get(name)
      lines.append(f"| {SHORT.get(name, name)} | {t:.3f} | {t / ls:.1f} |"
                   f" {'-' if paper is None else f'{paper / paper_ls:.1f}'} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = results["methods"]
  names = list(methods)
  colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
  paths = []

  fig, ax = plt.subplots(figsize=(7, 4))
  for i, name in enumerate(names):
    curve = np.mean([r["val_delta_m"] for r in methods[name]["per_seed"]], axis=0)
    ax.plot(np.arange(1, len(curve) + 1), curve, color=colors[i % 20], lw=1.2, label=SHORT.get(name, name))
  ax.set(xlabel="epoch", ylabel="validation Δm% (vs paper STL)", yscale="symlog")
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  paths.append(out / "qm9_val_delta_m.png")
  fig.savefig(paths[-1], dpi=80)
  plt.close(fig)

  mtl = [n for n in names if n != STL]
  if mtl:
    cols = 4
    rows = -(-len(mtl) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(mtl):]:
      ax.axis("off")
    for ax, name in zip(axes.flat, mtl):
      run = methods[name]["per_seed"][0]
      weights = np.asarray(run["weights"]["values"])
      for j, task in enumerate(qm9_data.TARGETS):
        ax.plot(run["weights"]["epochs"], weights[:, j], lw=1, label=task)
      if np.all(weights > 0) and weights.max() > 1e3 * weights.min():
        ax.set_yscale("log")
      ax.set_title(f"{SHORT.get(name, name)} (seed {run['seed']})", fontsize=8)
      ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=5, ncol=2)
    fig.suptitle("QM9: task weights (mean over each epoch's steps)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "qm9_weights.png")
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(mtl):
      run = methods[name]["per_seed"][0]
      ax.plot(run["gram_condition"]["epochs"], run["gram_condition"]["values"], color=colors[i % 20], lw=1.2,
              label=SHORT.get(name, name))
    ax.set(xlabel="epoch", ylabel="sqrt(λmax/λmin)", yscale="log",
           title="condition number of the shared parameters' per-task Gram (one training batch)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    paths.append(out / "qm9_gram_condition.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
  return paths


# ----------------------------------------------------------------------------- the edge network's cost


def measure_edge_network(dim: int = 64, batch: int = 120, repeats: int = 5, seed: int = 0) -> dict:
  """Forward time and FLOPs of the MPNN with each form of the edge network on a full random batch.

  Every molecule has 29 atoms (the padded worst case, what a padded batch
  computes anyway). FLOPs count the multiply-adds of the edge network's
  contractions only, times 2, for the three rounds.
  """
  rng = np.random.default_rng(seed)
  n = qm9_data.MAX_ATOMS
  graph = {"atoms": jnp.asarray(np.stack([rng.choice([1, 6, 7, 8], (batch, n)), rng.integers(0, 2, (batch, n)),
                                          rng.integers(0, 4, (batch, n)), rng.integers(0, 4, (batch, n))], -1),
                                jnp.int8),
           "bonds": jnp.asarray(rng.integers(0, 5, (batch, n, n)), jnp.int8),
           "positions": jnp.asarray(rng.normal(size=(batch, n, 3)) * 2, jnp.float32),
           "num_atoms": jnp.full((batch,), n, jnp.int8)}
  params = init_params(jax.random.key(seed), dim)
  edges = batch * n * (n - 1)
  flops = {
      # W(e) formed once per edge (a is the same in the three rounds), then applied in each round.
      "naive": 2 * edges * EDGE_HIDDEN * dim * dim + ROUNDS * 2 * edges * dim * dim,
      "factored": ROUNDS * 2 * (batch * n * dim * EDGE_HIDDEN * dim + batch * n * n * EDGE_HIDDEN * dim),
      "factored_t": ROUNDS * 2 * (batch * n * n * EDGE_HIDDEN * dim + batch * n * EDGE_HIDDEN * dim * dim),
  }
  calls = {name: (lambda f: lambda: f(params["shared"], graph))(
      jax.jit(functools.partial(encode, edge_network=name))) for name in EDGE_NETWORKS}
  grad = jax.jit(jax.grad(lambda p, g: jnp.sum(task_losses(p, g))))
  train_graph = dict(graph, targets=jnp.zeros((batch, K), jnp.float32), weight=jnp.ones((batch,), jnp.float32))
  calls["factored_forward_backward"] = lambda: grad(params, train_graph)
  start = time.perf_counter()
  common.block(calls["naive"]())
  naive_compile_and_first = time.perf_counter() - start
  timings = common.time_interleaved(calls, repeats=repeats, warmup=1, settle=0)
  out = {"dim": dim, "batch": batch, "atoms": n, "edges": edges, "flops": flops, "timings": timings,
         "naive_first_call_s": naive_compile_and_first,
         "speedup_forward": {name: timings["naive"]["median_ms"] / timings[name]["median_ms"]
                             for name in ("factored", "factored_t")},
         "naive_weight_tensor_bytes": edges * dim * dim * 4,
         "environment": common.environment()}
  return out


# ----------------------------------------------------------------------------- time per step

CYCLES = {"nash_mtl_every_5": 5, "nash_mtl_every_50": 50}


def time_steps(data: dict, args, repeats: int = 3) -> dict:
  """Seconds per training step of each of ``args.methods``, timed round-robin on the same batches.

  A method is timed as its compiled epoch over a cycle of steps, divided by
  the cycle's length: 5 steps, or ``k`` for Nash-MTL with
  ``update_weights_every = k`` (one refresh and ``k - 1`` steps that reuse the
  weights), so that every method's time includes the same per-call overhead
  spread over several steps.
  """
  calls, cycle = {}, {}
  for name in args.methods:
    runner = Runner(name, data, args)
    params, opt_state = runner.init(0)
    cycle[name] = CYCLES.get(name, 5)
    idx = jnp.arange(cycle[name] * args.batch).reshape(cycle[name], args.batch) % data["sizes"]["train"]
    fn = runner.compiled_epoch(0, params, opt_state, idx)
    calls[name] = functools.partial(fn, params, opt_state, idx)
  timings = common.time_interleaved(calls, repeats=repeats, warmup=1, settle=0)
  ls = timings.get("linear_scalarization")
  for name, t in timings.items():
    t["steps_per_call"] = cycle[name]
    t["seconds_per_step"] = t["median_ms"] / 1e3 / cycle[name]
  if ls is not None:
    for t in timings.values():
      t["ratio_to_ls"] = t["seconds_per_step"] / ls["seconds_per_step"]
  return timings


# ----------------------------------------------------------------------------- driver


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="+", default=["linear_scalarization", "nash_mtl", STL],
                      help=f"any of: all, {', '.join(ALL)}")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--epochs", type=int, default=300)
  parser.add_argument("--train-size", type=int, default=None, help="a prefix of the training part (default: all)")
  parser.add_argument("--val-size", type=int, default=None)
  parser.add_argument("--test-size", type=int, default=None)
  parser.add_argument("--split-seed", type=int, default=0,
                      help="seed of the shuffle that makes the split (the official code reshuffles with each"
                      " training seed; here the split is fixed and the seeds vary the initialisation and order)")
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=120)
  parser.add_argument("--eval-batch", type=int, default=500)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--edge-network", choices=EDGE_NETWORKS, default="factored")
  parser.add_argument("--jacobian-batch-size", type=int, default=None,
                      help="backward passes at once in the per-task gradients (default: 1 on a CPU, where the 11"
                      " sequential passes took 11 s against 22.6 s vectorised at dim 32, batch 120; all 11,"
                      " vectorised, elsewhere)")
  parser.add_argument("--pyg-sdf-features", action="store_true",
                      help="PyG's own features: aromatic and sp/sp2/sp3 zero, kekulised bonds (see qm9_data.py)")
  parser.add_argument("--data-dir", default=None, help="folder of qm9_part*.csv (default: qm9pack's)")
  parser.add_argument("--cache-dir", default=None, help="default: $OPTAX_MTL_QM9_CACHE or ~/.cache/optax_mtl/qm9")
  parser.add_argument("--stl-from", default=None, help="a qm9.json whose stl MAEs serve as our STL baseline")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("qm9_results"))
  parser.add_argument("--time-steps", action="store_true",
                      help="time one step of each of --methods round-robin (a cycle of k for nash_mtl_every_k),"
                      " write qm9_step_times.json under --out and exit")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds of --time-steps")
  parser.add_argument("--merge", nargs="+", type=pathlib.Path, default=None, metavar="DIR_OR_JSON",
                      help="merge the qm9.json of runs of one protocol split by method or seed into --out and exit")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--tiny", action="store_true",
                      help="smoke sizes: train 200, val 30, test 30, 2 epochs, dim 16, batch 20")
  parser.add_argument("--measure-edge-network", action="store_true",
                      help="time the naive and factored edge networks (--dim, --batch) and exit")
  args = parser.parse_args(argv)
  if args.tiny:
    args.train_size, args.val_size, args.test_size = 200, 30, 30
    args.epochs, args.dim, args.batch, args.eval_batch = 2, 16, 20, 30
  methods = []
  for name in args.methods:
    methods.extend(ALL if name == "all" else [name])
  unknown = sorted(set(methods) - set(ALL))
  if unknown:
    parser.error(f"unknown method(s) {', '.join(unknown)}; known: all, {', '.join(ALL)}")
  args.methods = list(dict.fromkeys(methods))
  if args.jacobian_batch_size is None and jax.default_backend() == "cpu":
    args.jacobian_batch_size = 1
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  command = "python benchmarks/qm9.py " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.measure_edge_network:
    result = measure_edge_network(args.dim, args.batch, repeats=3)
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "qm9_edge_network.json"
    path.write_text(json.dumps(common._strict(result), indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("flops", "speedup_forward")}, indent=1))
    for name, t in result["timings"].items():
      print(f"  {name:<28}{t['median_ms']:>10.1f} ms")
    print(f"wrote {path}")
    return result
  if args.merge:
    return write_outputs(merge(args.merge), args, command)
  start = time.perf_counter()
  raw = qm9_data.load(args.data_dir, args.cache_dir, progress=not args.no_progress)
  data = prepare(raw, args)
  if args.time_steps:
    timings = time_steps(data, args, args.repeats)
    result = {"benchmark": "qm9_step_times", "command": command, "environment": common.environment(),
              "protocol": {"dim": args.dim, "batch": args.batch, "edge_network": args.edge_network,
                           "jacobian_batch_size": args.jacobian_batch_size, "train_size": data["sizes"]["train"]},
              "timings": timings}
    path = common.write(result, args.out / "qm9_step_times.json", "qm9_step_times.json")
    for name, t in timings.items():
      print(f"  {name:<24}{t['seconds_per_step']:>10.3f} s/step  {t.get('ratio_to_ls', float('nan')):>7.2f} x LS")
    print(f"wrote {path}")
    return result
  results = {
      "benchmark": "qm9",
      "command": command,
      "environment": common.environment(),
      "protocol": {"train_size": data["sizes"]["train"], "val_size": data["sizes"]["val"],
                   "test_size": data["sizes"]["test"], "epochs": args.epochs, "dim": args.dim, "batch": args.batch,
                   "lr": args.lr, "seeds": args.seeds, "split_seed": args.split_seed,
                   "target_std": data["std"].tolist(), "target_mean": data["mean"].tolist(),
                   "tasks": list(qm9_data.TARGETS), "units": list(qm9_data.UNITS),
                   "scheduler": "ReduceLROnPlateau(min, factor 0.7, patience 5, min_lr 1e-5) on val Delta_m%",
                   "selection": "best validation Delta_m% (STL: each model's own task MAE)",
                   "last_partial_batch": "dropped in training; masked padding in evaluation",
                   "features": "pyg_sdf" if args.pyg_sdf_features else "rdkit_sanitised",
                   "edge_network": args.edge_network, "jacobian_batch_size": args.jacobian_batch_size,
                   "paths": {name: ("11 single-task networks (lax.map)" if name == STL else METHODS[name][1])
                             for name in args.methods}},
      "data": {"molecules": int(len(raw["targets"])), "cache_path": raw["cache_path"],
               "match_counts": qm9_data.match_counts(raw)},
      "paper_stl": BASE.tolist(),
      "methods": {},
  }
  for name in tqdm(args.methods, desc="QM9", unit="method", disable=args.no_progress):
    runner = Runner(name, data, args)
    runs = [runner.train(seed, progress=not args.no_progress) for seed in args.seeds]
    results["methods"][name] = {"per_seed": runs}
    jax.clear_caches()  # each method compiles its own epoch; free the last one's executables
  stl_mae = None
  if args.stl_from and STL not in results["methods"]:
    stl_mae = json.loads(pathlib.Path(args.stl_from).read_text())["methods"][STL]["mae"]
  summarize(results, stl_mae)
  results["wall_s"] = time.perf_counter() - start
  return write_outputs(results, args, command)


def write_outputs(results: dict, args, command: str) -> dict:
  """``qm9.json``, ``qm9.md`` and the plots under ``--out``."""
  args.out.mkdir(parents=True, exist_ok=True)
  json_path = common.write(results, args.out / "qm9.json", "qm9.json")
  md_path = args.out / "qm9.md"
  produced = f"Produced by `{results['command']}` in {results['wall_s']:.0f} s"
  if args.merge:
    produced += f", merged by `{command}`"
  md_path.write_text(markdown(results) + f"\n{produced}.\n")
  print(md_path.read_text())
  if not args.no_plots:
    try:
      plot(results, args.out)
    except ImportError:
      print("matplotlib not installed: no plots")
  print(f"wrote {json_path} and {md_path}")
  return results


if __name__ == "__main__":
  main()
