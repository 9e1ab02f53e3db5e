"""Weight-solve time and accuracy against K for every Gram weighting, against the PyTorch peers.

For each K, two gradient matrices: Gaussian rows, and rows of norms
``logspace(-3, 3)`` (the scale disparity that breaks the official solvers).
Every solver gets the same matrix (ours its float32 Gram). Time: the median of
repeated calls after compilation (JAX: a jitted call, dispatch included;
TorchJD: its weighting on the same matrix, solver state already built, as in
training). Accuracy, in float64, of the returned weights ``w``:

- Nash-MTL: ``||M a - 1/a|| / ||1/a||`` (0 at the bargaining solution);
- MGDA: the Frank-Wolfe gap ``(w^T M w - min_i (M w)_i) / max_i M_ii`` (0 at the
  min-norm point; ``w`` rescaled to sum 1);
- Aligned-MTL: ``||J^T (w - w*)|| / ||J^T w*||`` against the official algorithm
  run in float64, with the float32 rank threshold for ours (as the official
  training) and the float64 one for TorchJD (its convention; its mean
  preference rescaled by K);
- IMTL-G: the spread of the projections ``u_i^T d`` relative to their mean (0
  when they are equal, as the method requires);
- CAGrad, UPGrad, DualProj: ``||J^T (w - w*)|| / ||J^T w*||`` against the same
  problem solved in float64 (CAGrad ``c = 0.5``, no rescale, mean scale;
  UPGrad/DualProj: the exact projection for ours, TorchJD's trace-normalised
  ridge of 1e-4 for TorchJD);
- PCGrad, GradVac: random orders, time only.

  python benchmarks/weight_solvers.py          # writes results/weight_solvers_<platform>.json and .png
  python benchmarks/weight_solvers.py --tiny --out /tmp/x.json

TorchJD (PyTorch + cvxpy + ECOS + quadprog) is optional, the ``peers`` extra
(``pip install -e ".[benchmarks,peers]"``); without it the peer columns are
left out.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl
from optax_mtl._src import upgrad as upgrad_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

KS = (2, 3, 5, 10, 20, 40, 100)
FLOAT32_EPS = float(np.finfo(np.float32).eps)

OURS = {
    "nash": {name: functools.partial(optax_mtl.weighting.nash, solver=name) for name in ("newton", "ccp", "jaxopt")},
    "mgda": {name: functools.partial(optax_mtl.weighting.mgda, solver=name) for name in ("exact", "pgd", "fw")},
    "aligned": {"eigh": optax_mtl.weighting.aligned},
    "imtl_g": {"pinv": optax_mtl.weighting.imtl_g},
    "cagrad": {"barrier": functools.partial(optax_mtl.weighting.cagrad, c=0.5, rescale=0)},
    "upgrad": {"qp": optax_mtl.weighting.upgrad},
    "dualproj": {"qp": optax_mtl.weighting.dualproj},
    "pcgrad": {"gram": lambda gram: optax_mtl.weighting.pcgrad(gram, jax.random.key(0))},
    "gradvac": {"gram": lambda gram: optax_mtl.weighting.gradvac(gram, key=jax.random.key(0))[0]},
}
# The same problem in float64, as the accuracy reference (TorchJD's variant where it differs).
def _upgrad_sequential(gram, regularization=0.0):
  """UPGrad with its K projections one after the other (``lax.map``).

  The float64 reference: the batched (vmapped) projections deadlock in
  XLA:CPU under ``jax_enable_x64`` on the K = 40 scale matrix (jax 0.10.2);
  the sequential loop solves the same problems.
  """
  working = upgrad_lib._working_gram(gram, regularization)
  k = gram.shape[0]
  units = jnp.eye(k, dtype=gram.dtype) / k
  return jnp.sum(jax.lax.map(lambda u: upgrad_lib.project_to_dual_cone(working, u), units), axis=0)


REFERENCE64 = {
    "cagrad": (functools.partial(optax_mtl.weighting.cagrad, c=0.5, rescale=0),) * 2,
    "upgrad": (_upgrad_sequential, functools.partial(_upgrad_sequential, regularization=1e-4)),
    "dualproj": (optax_mtl.weighting.dualproj, functools.partial(optax_mtl.weighting.dualproj, regularization=1e-4)),
}


def gradient_matrix(kind: str, k: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  d = max(64, 4 * k)
  g = rng.normal(size=(k, d))
  if kind == "scale":
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * rng.permutation(np.logspace(-3, 3, k))[:, None]
  return g


def aligned_reference(gram: np.ndarray, eps: float = FLOAT32_EPS) -> np.ndarray:
  """The official Aligned-MTL weights in float64 with the rank threshold of ``eps``."""
  values, vectors = np.linalg.eigh(gram)
  kept = values > values.max() * len(values) * eps
  if not kept.any():
    return np.zeros(len(values))
  values, vectors = values[kept], vectors[:, kept]
  return (vectors * np.sqrt(values.min() / values)) @ vectors.T @ np.ones(len(gram))


def reference64(method: str, gram: np.ndarray, peer: bool) -> np.ndarray | None:
  if method == "aligned":
    return aligned_reference(gram, float(np.finfo(np.float64).eps) if peer else FLOAT32_EPS)
  if method not in REFERENCE64:
    return None
  with jax.enable_x64(True):
    return np.asarray(REFERENCE64[method][int(peer)](jnp.asarray(gram, jnp.float64)))


def accuracy(method: str, gram: np.ndarray, w: np.ndarray, reference=None) -> float:
  w = np.asarray(w, np.float64)
  if method in ("pcgrad", "gradvac"):
    return float("nan")
  if not np.all(np.isfinite(w)):
    return float("inf")
  if method == "imtl_g":
    projections = (gram @ w) / np.sqrt(np.diag(gram))
    return float(np.ptp(projections) / abs(np.mean(projections)))
  if method == "nash":
    if np.any(w <= 0):
      return float("inf")
    return float(np.linalg.norm(gram @ w - 1.0 / w) / np.linalg.norm(1.0 / w))
  if method == "mgda":
    w = w / w.sum()
    return float((w @ gram @ w - np.min(gram @ w)) / np.max(np.diag(gram)))
  dw = w - reference
  return float(np.sqrt(max(dw @ gram @ dw, 0.0)) / np.sqrt(reference @ gram @ reference))


def time_calls(call, repeats: int, warmup: int = 2) -> dict:
  for _ in range(warmup):
    call()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    samples.append(time.perf_counter() - start)
  return {"median_ms": 1e3 * float(np.median(samples)), "min_ms": 1e3 * min(samples),
          "max_ms": 1e3 * max(samples), "repeats": repeats}


def torchjd_weightings(method: str, k: int):
  """TorchJD's weighting for ``method`` (unclipped, rescaled like ours), or None."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from torchjd import aggregation
  except ImportError:
    return None
  if method == "nash":
    weighting = aggregation.NashMTL(n_tasks=k, max_norm=0.0).weighting  # the unclipped alpha
    return lambda g: weighting(g)
  if method == "mgda":
    weighting = aggregation.MGDA().weighting
    return lambda g: weighting(g)
  if method == "aligned":
    weighting = aggregation.AlignedMTL().weighting
    return lambda g: k * weighting(g)  # mean preference -> the official ones
  weighting = {
      "imtl_g": aggregation.IMTLG, "upgrad": aggregation.UPGrad, "dualproj": aggregation.DualProj,
      "pcgrad": aggregation.PCGrad, "gradvac": aggregation.GradVac,
      "cagrad": lambda: aggregation.CAGrad(c=0.5),
  }[method]().weighting
  return lambda g: weighting(g)


def run(args) -> dict:
  rows = []
  peer_repeats = max(3, args.repeats // 10)  # fewer: TorchJD's cvxpy solves are slow
  for method in args.methods:
    solvers = {name: jax.jit(fn) for name, fn in OURS[method].items()}
    for k in args.ks:
      for kind in ("gaussian", "scale"):
        g = gradient_matrix(kind, k, seed=k)
        gram64 = g @ g.T
        gram32 = jnp.asarray(gram64, jnp.float32)
        reference = reference64(method, gram64, peer=False)
        row = {"method": method, "K": k, "matrix": kind, "d": g.shape[1], "solvers": {}}
        for name, solve in solvers.items():
          w = np.asarray(solve(gram32).block_until_ready())
          timing = time_calls(lambda solve=solve: solve(gram32).block_until_ready(), args.repeats)
          row["solvers"][name] = {**timing, "error": accuracy(method, gram64, w, reference)}
        peer = torchjd_weightings(method, k)
        if peer is not None:
          import torch

          with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy's "not DPP" warning on every Nash solve
            matrix = torch.as_tensor(g)
            first = peer(matrix).numpy()  # Nash: cold start from ones, as in the fixtures
            timing = time_calls(lambda: peer(matrix), peer_repeats, warmup=1)
          # Each peer is measured against its own convention (rank threshold, ridge).
          peer_reference = reference64(method, gram64, peer=True)
          row["solvers"]["torchjd"] = {**timing, "error": accuracy(method, gram64, first, peer_reference)}
          default = next(iter(solvers))
          row["speedup_vs_torchjd"] = row["solvers"]["torchjd"]["median_ms"] / row["solvers"][default]["median_ms"]
        rows.append(row)
        summary = "  ".join(f"{n} {v['median_ms']:.3f}ms/{v['error']:.1e}" for n, v in row["solvers"].items())
        print(f"{method:<8s}K={k:<4d}{kind:<9s}{summary}", flush=True)
  return {
      "benchmark": "weight_solvers",
      "environment": common.environment(),
      "peers": common.package_versions(("torchjd", "torch", "cvxpy", "quadprog")),
      "timing": "median of repeated calls after compilation; JAX calls include dispatch",
      "settings": {"methods": args.methods, "ks": args.ks, "repeats": args.repeats,
                   "peer_repeats": peer_repeats},
      "error": {
          "nash": "||M a - 1/a|| / ||1/a|| (inf: non-positive or non-finite weights)",
          "mgda": "Frank-Wolfe gap (w^T M w - min_i (M w)_i) / max_i M_ii, w rescaled to sum 1",
          "aligned": ("||J^T (w - w_ref)|| / ||J^T w_ref||, w_ref the official algorithm in float64 with the"
                      " float32 rank threshold (ours, as the official training) or the float64 one (TorchJD's)"),
          "imtl_g": "spread of the projections u_i^T d over their mean",
          "cagrad/upgrad/dualproj": ("||J^T (w - w_ref)|| / ||J^T w_ref||, w_ref the same problem solved in float64"
                                     " (TorchJD's ridge variant for TorchJD)"),
          "pcgrad/gradvac": "random orders: no accuracy (NaN)",
      },
      "rows": rows,
  }


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = sorted({r["method"] for r in result["rows"]})
  fig, axes = plt.subplots(2, len(methods), figsize=(4.5 * len(methods), 8), squeeze=False)
  for col, method in enumerate(methods):
    rows = [r for r in result["rows"] if r["method"] == method]
    names = sorted({n for r in rows for n in r["solvers"]})
    for name in names:
      for kind, style in (("gaussian", "-"), ("scale", "--")):
        sel = [r for r in rows if r["matrix"] == kind and name in r["solvers"]]
        ks = [r["K"] for r in sel]
        axes[0][col].plot(ks, [r["solvers"][name]["median_ms"] for r in sel], style, marker="o",
                          label=f"{name} ({kind})")
        errors = [r["solvers"][name]["error"] for r in sel]
        if all(np.isfinite(e) or np.isinf(e) for e in errors) and not any(np.isnan(e) for e in errors):
          axes[1][col].plot(ks, [min(max(e, 1e-12), 1e3) for e in errors], style, marker="o", label=f"{name} ({kind})")
    axes[0][col].set(xscale="log", yscale="log", xlabel="K", ylabel="ms per solve", title=f"{method}: time")
    axes[1][col].set(xscale="log", yscale="log", xlabel="K", ylabel="error (see JSON)", title=f"{method}: accuracy")
    axes[0][col].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="*", default=list(OURS), choices=list(OURS))
  parser.add_argument("--ks", type=int, nargs="*", default=list(KS))
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.tiny:
    args.ks, args.repeats = [2, 3], 3
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  result = run(args)
  path = common.write(result, args.out, f"weight_solvers_{result['environment']['platform']}.json")
  plot(result, path.with_suffix(".png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")
  return result


if __name__ == "__main__":
  main()
