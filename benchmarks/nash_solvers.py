"""Nash-MTL weight-solve time and accuracy against K, against TorchJD's NashMTL.

For each K, two gradient matrices: Gaussian rows, and rows of norms
``logspace(-3, 3)`` (the scale disparity where the official CCP fails). Each
solver gets the same Gram matrix; the time is the median of repeated calls
after compilation (JAX: a jitted call, dispatch included; TorchJD: the
aggregator's weighting on the same matrix, cvxpy problem already built, as in
training). Accuracy: the relative residual ``||M a - 1/a|| / ||1/a||`` in
float64 of the returned (unclipped) weights.

  python benchmarks/nash_solvers.py          # writes results/nash_solvers_<platform>.json and .png
  python benchmarks/nash_solvers.py --tiny --out /tmp/x.json

TorchJD (PyTorch + cvxpy + ECOS) is optional: ``pip install torch==2.13.0
"torchjd[nash_mtl]==0.18.0"``; without it the peer column is recorded as
unavailable.
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

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

KS = (2, 3, 5, 10, 20, 40, 100)
SOLVERS = ("newton", "ccp", "jaxopt")


def gradient_matrix(kind: str, k: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  d = max(64, 4 * k)
  g = rng.normal(size=(k, d))
  if kind == "scale":
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * rng.permutation(np.logspace(-3, 3, k))[:, None]
  return g


def relative_residual(gram: np.ndarray, a: np.ndarray) -> float:
  a = np.asarray(a, np.float64)
  if not np.all(np.isfinite(a)) or np.any(a <= 0):
    return float("inf")
  return float(np.linalg.norm(gram @ a - 1.0 / a) / np.linalg.norm(1.0 / a))


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


def torchjd_weighting(k: int):
  """TorchJD's NashMTL weighting, or None when torchjd is not installed."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      import torch  # noqa: F401
      from torchjd.aggregation import NashMTL
  except ImportError:
    return None
  return NashMTL(n_tasks=k).weighting


def run(args) -> dict:
  solvers = {name: jax.jit(functools.partial(optax_mtl.weighting.nash, solver=name)) for name in args.solvers}
  rows = []
  for k in args.ks:
    for kind in ("gaussian", "scale"):
      g = gradient_matrix(kind, k, seed=k)
      gram64 = g @ g.T
      gram32 = jnp.asarray(gram64, jnp.float32)
      row = {"K": k, "matrix": kind, "d": g.shape[1], "solvers": {}}
      for name, solve in solvers.items():
        a = np.asarray(solve(gram32).block_until_ready())
        timing = time_calls(lambda solve=solve: solve(gram32).block_until_ready(), args.repeats)
        row["solvers"][name] = {**timing, "relative_residual": relative_residual(gram64, a)}
      weighting = torchjd_weighting(k)
      if weighting is not None:
        import torch

        with warnings.catch_warnings():
          warnings.simplefilter("ignore")  # cvxpy's "not DPP" warning on every solve
          matrix = torch.as_tensor(g)
          weighting.max_norm = 0.0  # the unclipped alpha, comparable to ours
          first = weighting(matrix).numpy()  # cold start from ones, as in the fixtures
          timing = time_calls(lambda: weighting(matrix), max(3, args.repeats // 10), warmup=1)
        row["solvers"]["torchjd"] = {**timing, "relative_residual": relative_residual(gram64, first)}
      if "torchjd" in row["solvers"] and "newton" in row["solvers"]:
        row["newton_speedup_vs_torchjd"] = row["solvers"]["torchjd"]["median_ms"] / row["solvers"]["newton"]["median_ms"]
      rows.append(row)
      summary = "  ".join(f"{n} {v['median_ms']:.3f}ms/{v['relative_residual']:.1e}" for n, v in row["solvers"].items())
      print(f"K={k:<4d}{kind:<9s}{summary}", flush=True)
  return {
      "benchmark": "nash_solvers",
      "environment": common.environment(),
      "torchjd": _torchjd_version(),
      "timing": "median of repeated calls after compilation; JAX calls include dispatch",
      "residual": "||M a - 1/a|| / ||1/a|| in float64 (inf: non-positive or non-finite weights)",
      "rows": rows,
  }


def _torchjd_version():
  try:
    import importlib.metadata as metadata

    return {"torchjd": metadata.version("torchjd"), "torch": metadata.version("torch"),
            "cvxpy": metadata.version("cvxpy")}
  except Exception:  # pylint: disable=broad-except
    return None


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
  names = sorted({n for row in result["rows"] for n in row["solvers"]})
  for name in names:
    for kind, style in (("gaussian", "-"), ("scale", "--")):
      rows = [r for r in result["rows"] if r["matrix"] == kind and name in r["solvers"]]
      ks = [r["K"] for r in rows]
      ax_t.plot(ks, [r["solvers"][name]["median_ms"] for r in rows], style, marker="o", label=f"{name} ({kind})")
      ax_r.plot(ks, [max(r["solvers"][name]["relative_residual"], 1e-12) for r in rows], style, marker="o",
                label=f"{name} ({kind})")
  ax_t.set(xscale="log", yscale="log", xlabel="K", ylabel="ms per weight solve", title="Nash-MTL solve time")
  ax_r.set(xscale="log", yscale="log", xlabel="K", ylabel="||Ma - 1/a|| / ||1/a||", title="accuracy")
  ax_r.axhline(1e-3, color="grey", linewidth=0.8)
  ax_t.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="*", default=list(KS))
  parser.add_argument("--solvers", nargs="*", default=list(SOLVERS), choices=SOLVERS)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.tiny:
    args.ks, args.repeats = [2, 3], 3
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  result = run(args)
  path = common.write(result, args.out, f"nash_solvers_{result['environment']['platform']}.json")
  plot(result, path.with_suffix(".png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")
  return result


if __name__ == "__main__":
  main()
