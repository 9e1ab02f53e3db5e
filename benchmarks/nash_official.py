"""Nash-MTL under vanishing gradients: our weights against the official code's on one training run.

On the five-task digits problem of ``examples/mtl_benchmark.py`` (``digits_attributes``), the
weight of a task whose trunk gradient vanishes runs away under ``optax_mtl.nash_mtl`` (the exact
solution of ``a_i (M a)_i = 1`` grows like ``1 / ||g_i||``). Does the official implementation
(AvivNavon/nash-mtl ``NashMTL``, packaged by TorchJD 0.18 as ``torchjd.aggregation.NashMTL``) do
the same? Three phases:

1. ``record`` (the project's environment with the examples extra: flax, scikit-learn): trains the
   example's network with ``optax_mtl.nash_mtl`` (exact weights, ``regularization=0``) for one
   seed, with the example's data order and key schedule (seed 0 reproduces the example's run),
   and records at every step the float32 Gram of the trunk's per-task gradients (what the
   weighting saw), our weights, the losses and our solver's diagnostics, into
   ``nash_official_trace_cpu.npz``.
2. ``compare`` (an environment with the ``peers`` extra: torch, torchjd, cvxpy with ECOS and
   Clarabel; imported lazily): feeds that Gram sequence, step by step and open loop, to the
   official weighting with the official settings (CCP warm-started from the previous step's
   weights, ``optim_niter=20``, ECOS ``max_iters=100``, the fallback to the previous iterate,
   ``update_weights_every=1``, ``max_norm=1``): :class:`OfficialNashMTL`, a transcription that
   cvxpy canonicalises once (TorchJD's class re-canonicalises at every ECOS call, about 0.1 s,
   up to 20 calls per training step), checked against TorchJD's own class subproblem by subproblem and over
   windows of steps. It writes ``nash_official_cpu.json``: the per-step weights of both (and
   of ``optax_mtl.weighting.nash(gram, regularization=...)``), the official solver's per-step
   ECOS statuses and stop reasons, summary statistics per window of steps, and an attribution
   run (more CCP steps; Clarabel instead of ECOS) at a few steps.
3. ``digits`` (the project's environment): the example's Nash-MTL row redone with
   ``regularization`` and with ``task_specific="unweighted"`` over seeds, Delta_m% against the
   STL means of the example's committed results (``docs/results/digits_attributes.json``),
   under the key ``digits`` of ``nash_official_cpu.json`` (kept when ``compare`` reruns).

``markdown(result)`` renders the JSON's tables (used by ``benchmarks/benchmarks_page.py``).

The official weighting depends on the matrix it is given only through ``M = G G^T`` (the
normalisation ``||M||_F``, the CCP on ``M / ||M||_F``, and ``max_norm`` through
``||G^T a||^2 = a^T M a``), so TorchJD's class is fed the ``K x K`` factor
``F = diag(n) V diag(sqrt(max(lam, 0)))`` of each recorded Gram (``n_i = sqrt(M_ii)``,
``V diag(lam) V^T`` the eigendecomposition of the cosine matrix, in float64): ``F F^T`` gives
``M_ij`` to float64 rounding relative to ``n_i n_j``, so a vanishing task's tiny row survives.

  python benchmarks/nash_official.py record --out benchmarks/results
  /work/venv-peer/bin/python benchmarks/nash_official.py compare --out benchmarks/results
  python benchmarks/nash_official.py digits --out benchmarks/results

(``--steps``, ``--seed`` and ``--seeds`` choose the runs; ``--tiny`` makes a smoke run.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import warnings

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

TRACE = "nash_official_trace_cpu.npz"
RESULT = "nash_official_cpu.json"
PROBLEM = "digits_attributes"


# ---------------------------------------------------------------------------------------------
# Phase 1: record our run (JAX, flax).


def record(steps: int, seed: int, chunk: int = 100, batch: int = 128, lr: float = 1e-3) -> dict:
  """Trains ``nash_mtl`` as ``examples/mtl_benchmark.py`` does and records every step's Gram."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import optax_mtl

  sys.path.insert(0, str(HERE.parent / "examples"))
  import datasets
  import mtl_benchmark

  problem = datasets.PROBLEMS[PROBLEM](seed=0)
  k = len(problem.tasks)
  make = lambda s: optax_mtl.nash_mtl(k, shared=mtl_benchmark.trunk_only, regularization=0.0)  # exact
  trainer = mtl_benchmark.Trainer(problem, make, batch=batch, chunk=chunk, lr=lr)
  graphdef, rest, tasks = trainer.graphdef, trainer.rest, problem.tasks

  def losses_of(params, x, ys):
    return mtl_benchmark.task_losses(nnx.merge(graphdef, params, rest)(x), ys, tasks)

  tx = trainer.tx(seed)

  @jax.jit
  def run_chunk(params, opt_state, key, x, ys):
    # The example's Trainer.run_chunk step, with the Gram and the solver's diagnostics recorded.
    def step(carry, key):
      params, opt_state = carry
      idx = jax.random.randint(key, (batch,), 0, x.shape[0])
      losses, jac = optax_mtl.value_and_jacobian(losses_of)(params, x[idx], [y[idx] for y in ys])
      gram = optax_mtl.gram(jac, mask=mtl_benchmark.trunk_only(params))
      updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
      params = optax.apply_updates(params, updates)
      info = opt_state[0].weighting_state.info
      trunk_norm = optax.tree.norm(updates["trunk"])
      return (params, opt_state), dict(gram=gram, weights=optax.tree.get(opt_state, "weights"), losses=losses,
                                       residual=info.residual, solvable=info.solvable,
                                       iterations=info.iterations, trunk_update_norm=trunk_norm)

    return jax.lax.scan(step, (params, opt_state), jax.random.split(key, chunk))

  splits = {name: (jnp.asarray(s["x"]), [jnp.asarray(y) for y in s["y"]]) for name, s in problem.splits.items()}
  x_train, ys_train = splits["train"]
  params = nnx.as_pure(nnx.state(trainer.new_model(seed), nnx.Param))
  opt_state = tx.init(params)
  key = jax.random.key(10_000 + seed)  # as Trainer.train
  records = []
  tic = time.perf_counter()
  for _ in range(0, steps, chunk):
    key, sub = jax.random.split(key)
    (params, opt_state), out = run_chunk(params, opt_state, sub, x_train, ys_train)
    records.append(jax.tree.map(np.asarray, out))
  wall = time.perf_counter() - tic
  trace = {name: np.concatenate([r[name] for r in records]) for name in records[0]}
  static = (graphdef, tuple(dataclasses.replace(t, name="") for t in tasks))
  test = np.asarray(mtl_benchmark.evaluate(*static, params, rest, *splits["test"]))
  return {"trace": trace, "test": test, "tasks": [t.name for t in tasks], "wall_s": wall,
          "config": {"problem": PROBLEM, "seed": seed, "steps": steps, "batch": batch, "lr": lr, "chunk": chunk,
                     "method": "optax_mtl.nash_mtl(5, shared=trunk_only, regularization=0.0) (exact), then optax.adam(lr)"}}


def write_trace(result: dict, path: pathlib.Path, command: str) -> None:
  meta = {"command": command, "config": result["config"], "tasks": result["tasks"],
          "test_metrics": result["test"].tolist(), "wall_s": result["wall_s"], "environment": common.environment()}
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, meta_json=np.array(json.dumps(meta)), **result["trace"])


# ---------------------------------------------------------------------------------------------
# Phase 2: the official weighting on the recorded Grams (torch, torchjd, cvxpy; lazy imports).


def gram_factor(gram: np.ndarray) -> np.ndarray:
  """``F`` with ``F F^T = gram`` to float64 rounding relative to ``n_i n_j`` (see the module doc)."""
  gram = np.asarray(gram, np.float64)
  norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
  safe = np.where(norms > 0, norms, 1.0)
  cosines = gram / np.outer(safe, safe)
  lam, vectors = np.linalg.eigh(cosines)
  return norms[:, None] * (vectors * np.sqrt(np.maximum(lam, 0.0)))


class OfficialNashMTL:
  """AvivNavon/nash-mtl ``NashMTL``'s weight solve (as TorchJD's ``_NashMTLWeighting``), in DPP form.

  The authors' class rebuilds the cvxpy problem's canonical form at every ECOS call (the problem
  is not DPP: it multiplies parameters), 0.1 s a call here, 20 calls a step. This transcription
  solves the same subproblem with the linearisation's gradient as a parameter,

    min_a  sum(G a) + c^T (a - a_prev)   s.t.  -log(a_i nf) - log((G a)_i) <= 0,  a >= 0,
    c = (1 / a_prev + (1 / (G a_prev)) G) / nf,

  (``G`` the Gram divided by its Frobenius norm ``nf``), so that cvxpy canonicalises once;
  everything else is the official loop line by line: the warm start from the previous step's
  weights (initially ones, float32), at most ``optim_niter`` CCP steps, ECOS with
  ``max_iters=100``, the fallback to the previous iterate when the solve raises, the stop
  criteria (no value, ``||G a - 1/(a + 1e-10)|| < 1e-3`` on the normalised Gram, or a change
  below 1e-6), and the new iterate discarded on the step that stops. ``compare`` checks it
  against TorchJD's class subproblem by subproblem and over a window of steps.
  """

  def __init__(self, k: int, optim_niter: int = 20, solver: str = "ECOS"):
    import cvxpy as cp

    self.cp, self.k, self.optim_niter, self.solver = cp, k, optim_niter, solver
    self.prvs_alpha = np.ones(k, dtype=np.float32)
    self.alpha = cp.Variable(shape=(k,), nonneg=True)
    self.gram = cp.Parameter(shape=(k, k), value=np.eye(k))
    self.slope = cp.Parameter(shape=(k,), value=np.zeros(k))
    self.offset = cp.Parameter(value=0.0)
    self.nf = cp.Parameter(shape=(1,), value=np.ones(1), nonneg=True)
    g_alpha = self.gram @ self.alpha
    constraints = [-cp.log(self.alpha[i] * self.nf) - cp.log(g_alpha[i]) <= 0 for i in range(k)]
    self.prob = cp.Problem(cp.Minimize(cp.sum(g_alpha) + self.slope @ self.alpha - self.offset), constraints)

  def subproblem(self, gtg: np.ndarray, nf: float, prvs: np.ndarray):
    """One CCP step: ``(solution or None, status)``; an exception gives ``prvs`` back."""
    cp = self.cp
    self.gram.value, self.nf.value = gtg, np.array([nf])
    tag = 1 / prvs + (1 / (gtg @ prvs)) @ gtg
    self.slope.value, self.offset.value = tag / nf, float(tag @ prvs / nf)
    self.alpha.value = prvs
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Solution may be inaccurate": the status records it
        if self.solver == "ECOS":
          self.prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
        else:  # the attribution runs only: another conic solver, its defaults
          self.prob.solve(solver=self.solver)
      status = str(self.prob.status)
    except Exception as error:  # noqa: BLE001  (the official code catches everything)
      self.alpha.value = prvs
      status = f"exception: {type(error).__name__}"
    return self.alpha.value, status

  def __call__(self, gram: np.ndarray) -> tuple[np.ndarray, dict]:
    """The weights for one raw Gram (before ``max_norm``) and a log of the solve."""
    nf = float(np.linalg.norm(gram))
    gtg = gram / nf
    log = {"statuses": [], "stop": "optim_niter", "nf": nf}
    alpha_t = self.prvs_alpha
    for _ in range(self.optim_niter):
      value, status = self.subproblem(gtg, nf, alpha_t)
      log["statuses"].append(status)
      if value is None:
        log["stop"] = "no_value"
      elif np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3:
        log["stop"] = "residual"
      elif np.linalg.norm(value - alpha_t) < 1e-6:
        log["stop"] = "no_change"
      else:
        alpha_t = value
        continue
      break
    self.prvs_alpha = alpha_t
    return np.asarray(self.prvs_alpha, np.float64), log


def torchjd_weighting(k: int, prvs_alpha=None, **options):
  """TorchJD's NashMTL weighting (the official solve, cvxpy + ECOS), optionally warm-started."""
  from torchjd.aggregation import _nash_mtl

  weighting = _nash_mtl._NashMTLWeighting(n_tasks=k, **options)
  if prvs_alpha is not None:
    weighting.prvs_alpha = np.asarray(prvs_alpha)
  return weighting


def run_official(grams: np.ndarray, *, optim_niter=20, prvs_alpha=None, solver="ECOS") -> dict:
  """Steps the transcription through the Grams; per-step raw weights and solve logs."""
  solver = OfficialNashMTL(grams.shape[1], optim_niter, solver)
  if prvs_alpha is not None:
    solver.prvs_alpha = np.asarray(prvs_alpha)
  weights, logs = [], []
  for gram in grams:
    w, log = solver(np.asarray(gram, np.float64))
    weights.append(w)
    logs.append(log)
  return {"raw": np.stack(weights), "logs": logs}


def run_torchjd(grams: np.ndarray, *, max_norm=1.0, prvs_alpha=None) -> dict:
  """Steps TorchJD's weighting through the Grams (fed their factors); raw and clipped weights."""
  import torch

  weighting = torchjd_weighting(grams.shape[1], prvs_alpha, max_norm=max_norm, update_weights_every=1,
                                optim_niter=20)
  raw, clipped = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for gram in grams:
      clipped.append(weighting(torch.from_numpy(gram_factor(gram))).numpy().astype(np.float64))
      raw.append(np.asarray(weighting.prvs_alpha, np.float64))  # before the max_norm rescaling
  return {"raw": np.stack(raw), "clipped": np.stack(clipped)}


def subproblem_check(grams: np.ndarray, states: np.ndarray, steps) -> dict:
  """One CCP subproblem at each of ``steps``, by TorchJD's problem and by the transcription.

  Both start from the transcription's weights of the step before. Per subproblem: the
  transcription's ECOS status and the largest relative difference of the two solutions (None
  where either has no solution; ``agreeing_outcomes`` counts the subproblems where both or
  neither have one).
  """
  import torch

  ours_solver = OfficialNashMTL(grams.shape[1])
  rows, agree = [], 0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for t in steps:
      prvs = states[t - 1] if t > 0 else np.ones(grams.shape[1], np.float32)
      tjd = torchjd_weighting(grams.shape[1], prvs, max_norm=0.0, update_weights_every=1, optim_niter=1)
      tjd(torch.from_numpy(gram_factor(grams[t])))
      theirs = tjd.alpha_param.value
      nf = float(np.linalg.norm(grams[t]))
      mine, status = ours_solver.subproblem(grams[t] / nf, nf, np.asarray(prvs))
      agree += int((theirs is None) == (mine is None))
      difference = (None if theirs is None or mine is None
                    else float(np.max(np.abs(mine - theirs) / np.abs(theirs))))
      rows.append({"step": int(t) + 1, "status": status, "relative_difference": difference})
  differences = [r["relative_difference"] for r in rows if r["relative_difference"] is not None]
  optimal = [r["relative_difference"] for r in rows if r["relative_difference"] is not None and r["status"] == "optimal"]
  return {"subproblems": rows, "agreeing_outcomes": agree,
          "median_relative_difference": float(np.median(differences)) if differences else None,
          "max_relative_difference": float(np.max(differences)) if differences else None,
          "max_relative_difference_where_ecos_optimal": float(np.max(optimal)) if optimal else None}


def ours(grams: np.ndarray, **options) -> np.ndarray:
  """Our weighting on each Gram (no warm start; the exact solve does not depend on it)."""
  import jax
  import jax.numpy as jnp

  import optax_mtl

  solve = jax.jit(jax.vmap(lambda m: optax_mtl.weighting.nash(m, **options)))
  return np.asarray(solve(jnp.asarray(grams, jnp.float32)), np.float64)


def residual(grams: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """``max_i |a_i (M a)_i - 1|`` per step, in float64 (0 at the bargaining solution)."""
  grams = np.asarray(grams, np.float64)
  return np.max(np.abs(weights * np.einsum("tij,tj->ti", grams, weights) - 1.0), axis=1)


def clipped(grams: np.ndarray, weights: np.ndarray, max_norm: float = 1.0) -> np.ndarray:
  """TorchJD's ``max_norm``: ``a`` rescaled so that ``||J^T a|| <= max_norm``."""
  norm = np.sqrt(np.einsum("ti,tij,tj->t", weights, np.asarray(grams, np.float64), weights))
  return weights * np.minimum(1.0, max_norm / np.maximum(norm, 1e-300))[:, None]


WINDOWS = ((1, 400), (401, 700), (701, 1000), (1001, 1500), (1501, 2000))  # 1-based, inclusive


def window_stats(grams, weights: dict, logs) -> list:
  """Per window of steps: max weight, residual and the official solver's outcomes."""
  rows = []
  for lo, hi in WINDOWS:
    if lo > len(grams):
      break
    sl = slice(lo - 1, min(hi, len(grams)))
    row = {"steps": [lo, min(hi, len(grams))],
           "min_gradient_norm": float(np.sqrt(np.einsum("tii->ti", grams[sl])).min())}
    for name, w in weights.items():
      row[name] = {"max_weight": float(w[sl].max()), "median_residual": float(np.median(residual(grams[sl], w[sl])))}
    change = np.max(np.abs(weights["ours_regularized"][sl] / weights["ours"][sl] - 1.0), axis=1)
    row["ours_regularized_relative_change"] = {"median": float(np.median(change)), "max": float(np.max(change))}
    ratio = weights["ours"][sl].max(axis=1) / weights["official"][sl].max(axis=1)
    row["median_ratio_of_max_weights_ours_over_official"] = float(np.median(ratio))
    statuses = [st for log in logs[sl] for st in log["statuses"]]
    row["official_ecos_status_fractions"] = {k: statuses.count(k) / len(statuses) for k in sorted(set(statuses))}
    stops = [log["stop"] for log in logs[sl]]
    row["official_stop_fractions"] = {k: stops.count(k) / len(stops) for k in sorted(set(stops))}
    rows.append(row)
  return rows


def torchjd_checks(grams: np.ndarray, official: np.ndarray, windows) -> dict:
  """TorchJD's own class against the transcription: single subproblems, and windows of steps."""
  every = max(1, len(grams) // 40)
  checks = {"subproblems": subproblem_check(grams, official, range(0, len(grams), every)), "windows": []}
  for lo, hi in windows:
    lo, hi = min(lo, len(grams)), min(hi, len(grams))
    start = official[lo - 2] if lo > 1 else None
    tjd = run_torchjd(grams[lo - 1:hi], prvs_alpha=start)
    rel = np.max(np.abs(tjd["raw"] / official[lo - 1:hi] - 1.0), axis=1)
    ours_clipped = clipped(grams[lo - 1:hi], official[lo - 1:hi])
    checks["windows"].append({
        "steps": [lo, hi], "started_from": "ones" if start is None else "the transcription's weights of the step before",
        "max_relative_difference_per_step": rel.tolist(),
        "steps_within_1e-4": int(np.sum(rel < 1e-4)),
        "max_weight_per_step": {"torchjd": tjd["raw"].max(axis=1).tolist(),
                                "transcription": official[lo - 1:hi].max(axis=1).tolist()},
        "torchjd_residual_per_step": residual(grams[lo - 1:hi], tjd["raw"]).tolist(),
        "clipped_weights_max_relative_difference": float(np.max(np.abs(tjd["clipped"] / ours_clipped - 1.0)))})
  return checks


def attribution(grams: np.ndarray, official: np.ndarray, ours_w: np.ndarray, steps, niter: int) -> list:
  """Why the official weights stay bounded: more CCP steps, or an accurate conic solver (Clarabel)."""
  rows = []
  for t in steps:
    row = {"step": t, "ours": {"max_weight": float(ours_w[t - 1].max()),
                               "residual": float(residual(grams[t - 1:t], ours_w[t - 1:t])[0])},
           "official": {"max_weight": float(official[t - 1].max()),
                        "residual": float(residual(grams[t - 1:t], official[t - 1:t])[0])}}
    for solver, n in (("ECOS", niter), ("CLARABEL", 20)):
      r = run_official(grams[t - 1:t], optim_niter=n, prvs_alpha=official[t - 2], solver=solver)
      a, log = r["raw"][0], r["logs"][0]
      row[f"{solver}_optim_niter_{n}"] = {
          "max_weight": float(a.max()), "residual": float(residual(grams[t - 1:t], r["raw"])[0]),
          "ccp_steps": len(log["statuses"]), "stop": log["stop"],
          "statuses": {k: log["statuses"].count(k) for k in sorted(set(log["statuses"]))}}
    rows.append(row)
  return rows


def compare(trace_path: pathlib.Path, out: pathlib.Path, command: str, regularization: float,
            torchjd_windows=((1, 10), (101, 120), (701, 720)), attribution_steps=(600, 700, 800, 900, 1000),
            attribution_niter: int = 200) -> dict:
  import importlib.metadata as md

  z = np.load(trace_path)
  meta = json.loads(str(z["meta_json"]))
  grams, our_weights = z["gram"].astype(np.float64), z["weights"].astype(np.float64)
  factor_error = max(float(np.max(np.abs(f @ f.T - g) / np.maximum(np.outer(np.sqrt(np.diag(g)), np.sqrt(np.diag(g))),
                                                                    1e-300)))
                     for g in grams for f in (gram_factor(g),))
  tic = time.perf_counter()
  run = run_official(grams)
  official_s = time.perf_counter() - tic
  official, logs = run["raw"], np.asarray(run["logs"], dtype=object)
  regularized = ours(grams, regularization=regularization)
  tic = time.perf_counter()
  checks = torchjd_checks(grams, official, torchjd_windows)
  checks["seconds"] = time.perf_counter() - tic
  checks["factor_max_relative_error"] = factor_error
  steps = [t for t in attribution_steps if 1 < t <= len(grams)]
  statuses = [st for log in logs for st in log["statuses"]]
  stops = [log["stop"] for log in logs]
  ratio = our_weights / official
  rel = np.max(np.abs(ratio - 1.0), axis=1)
  result = {
      "command": command,
      "question": "Does the official Nash-MTL weighting run away like optax_mtl's when a task's gradient vanishes?",
      "trace": {"file": trace_path.name, **meta},
      "official": {
          "implementation": "OfficialNashMTL: AvivNavon/nash-mtl NashMTL's solve (= TorchJD 0.18 _NashMTLWeighting) "
                            "in DPP form; checked against TorchJD's class in torchjd_check",
          "options": {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20, "solver": "ECOS, max_iters=100"},
          "seconds": official_s, "ecos_solves": len(statuses),
          "ecos_status_counts": {k: statuses.count(k) for k in sorted(set(statuses))},
          "stop_reason_counts": {k: stops.count(k) for k in sorted(set(stops))},
          "ccp_steps_per_training_step": float(len(statuses) / len(grams))},
      "torchjd_check": checks,
      "versions": {"torch": md.version("torch"), "torchjd": md.version("torchjd"), "cvxpy": md.version("cvxpy"),
                   "ecos": md.version("ecos"), "clarabel": md.version("clarabel"), "numpy": np.__version__,
                   **{k: v for k, v in common.environment().items() if k in ("jax", "jaxlib", "optax_mtl", "python")}},
      "regularization": regularization,
      "summary": {
          "max_weight": {"ours": float(our_weights.max()), "official": float(official.max()),
                         "ours_regularized": float(regularized.max())},
          "step_of_max_weight": {"ours": int(np.argmax(our_weights.max(axis=1))) + 1,
                                 "official": int(np.argmax(official.max(axis=1))) + 1},
          "max_over_median_weight": {name: float(np.max(w.max(axis=1) / np.median(w, axis=1)))
                                     for name, w in (("ours", our_weights), ("official", official),
                                                     ("ours_regularized", regularized))},
          "ratio_ours_over_official": {"max": float(np.max(ratio)), "median": float(np.median(ratio)),
                                       "min": float(np.min(ratio))},
          "steps_agreeing_within": {f"{tol:g}": int(np.sum(rel <= tol)) for tol in (1e-4, 1e-2, 0.1)},
          "first_step_differing_by_more_than": {f"{tol:g}": (int(np.argmax(rel > tol)) + 1 if np.any(rel > tol) else None)
                                                for tol in (1e-2, 0.1, 1.0, 10.0)},
          "residual": {name: {"median": float(np.median(r)), "max": float(np.max(r)),
                              "fraction_below_1e-3": float(np.mean(r < 1e-3))}
                       for name, r in (("ours", residual(grams, our_weights)),
                                       ("official", residual(grams, official)))},
          "windows": window_stats(grams, {"ours": our_weights, "official": official,
                                          "ours_regularized": regularized}, logs),
      },
      "attribution": attribution(grams, official, our_weights, steps, attribution_niter),
      "per_step": {
          "ours": our_weights.tolist(), "official": official.tolist(),
          "official_clipped": clipped(grams, official).tolist(), "ours_regularized": regularized.tolist(),
          "gradient_norms": np.sqrt(np.einsum("tii->ti", grams)).tolist(),
          "official_stop": stops, "official_ccp_steps": [len(log["statuses"]) for log in logs],
          "official_ecos_statuses": [{k: log["statuses"].count(k) for k in sorted(set(log["statuses"]))}
                                     for log in logs],
      },
  }
  out.mkdir(parents=True, exist_ok=True)
  if (out / RESULT).exists():  # the digits phase's rows, kept
    previous = json.loads((out / RESULT).read_text())
    if "digits" in previous:
      result["digits"] = previous["digits"]
  (out / RESULT).write_text(dump(result))
  return result


def dump(result: dict) -> str:
  """JSON text: indented, except ``per_step``'s arrays (7 significant digits), one per line."""
  def rounded(value):
    if isinstance(value, float):
      return float(f"{value:.7g}")
    if isinstance(value, list):
      return [rounded(v) for v in value]
    return value

  head = json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1)
  if "per_step" not in result:
    return head + "\n"
  rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(rounded(value), separators=(',', ':'))}"
                     for name, value in result["per_step"].items())
  return head[:-2] + ',\n "per_step": {\n' + rows + "\n }\n}\n"


# ---------------------------------------------------------------------------------------------
# Phase 3: the example's digits result for Nash-MTL with and without the option.


def digits(seeds, steps: int, options: dict, stl_json: pathlib.Path) -> dict:
  """Trains ``nash_mtl(**options)`` as the example does; Delta_m% against the example's STL."""
  sys.path.insert(0, str(HERE.parent / "examples"))
  import datasets
  import mtl_benchmark

  import optax_mtl

  problem = datasets.PROBLEMS[PROBLEM](seed=0)
  k = len(problem.tasks)
  trainer = mtl_benchmark.Trainer(
      problem, lambda seed: optax_mtl.nash_mtl(k, shared=mtl_benchmark.trunk_only, **options),
      batch=128, chunk=100, lr=1e-3)
  reference = json.loads(stl_json.read_text())
  stl = np.asarray(reference["stl"]["mean"])
  higher = [t["higher_is_better"] for t in reference["tasks"]]
  runs = [trainer.train(seed, steps, progress=False) for seed in seeds]
  test = np.asarray([r["test"] for r in runs])
  per_seed = [mtl_benchmark.delta_m(row, stl, higher) for row in test]
  return {"options": options, "seeds": list(seeds), "steps": steps, "stl_from": str(stl_json),
          "stl_mean": stl.tolist(), "test": test.tolist(), "mean": test.mean(axis=0).tolist(),
          "std": test.std(axis=0).tolist(), "delta_m": mtl_benchmark.delta_m(test.mean(axis=0), stl, higher),
          "delta_m_std": float(np.std(per_seed)), "delta_m_per_seed": per_seed,
          "max_weight_per_seed": [float(np.max(r["history"]["weights"])) for r in runs],
          "sec_per_step": float(np.mean([r["sec_per_step"] for r in runs]))}


def _g(value) -> str:
  return "-" if value is None else f"{value:.3g}"


def _percent(fractions: dict, key: str) -> str:
  return f"{100 * fractions.get(key, 0.0):.0f}%"


def markdown(result: dict) -> str:
  """The tables of ``nash_official_cpu.json``: per window of steps, the attribution, the digits rows."""
  lines = []
  if "summary" in result:
    s, official = result["summary"], result["official"]
    lines += ["**Weights along the recorded run** (ours: exact `nash_mtl`; official: the authors' CCP with ECOS on"
              " the same Grams, open loop; residual: median over steps of max_i abs(a_i (M a)_i - 1); ridge:"
              f" `regularization={result.get('regularization'):g}` on the same Grams)", "",
              "| steps | smallest gradient norm | ours: max weight | official: max weight | ridge: max weight |"
              " ours / official (median of the max weights) | official residual | official ECOS"
              " \"optimal_inaccurate\" | official steps at 20 CCP iterations |",
              "|---|---|---|---|---|---|---|---|---|"]
    for w in s["windows"]:
      lines.append(f"| {w['steps'][0]}-{w['steps'][1]} | {_g(w['min_gradient_norm'])} |"
                   f" {_g(w['ours']['max_weight'])} | {_g(w['official']['max_weight'])} |"
                   f" {_g(w['ours_regularized']['max_weight'])} |"
                   f" {_g(w['median_ratio_of_max_weights_ours_over_official'])} |"
                   f" {_g(w['official']['median_residual'])} |"
                   f" {_percent(w['official_ecos_status_fractions'], 'optimal_inaccurate')} |"
                   f" {_percent(w['official_stop_fractions'], 'optim_niter')} |")
    counts = official["ecos_status_counts"]
    lines += ["", f"Whole run: largest weight ours {_g(s['max_weight']['ours'])} (step"
              f" {s['step_of_max_weight']['ours']}), official {_g(s['max_weight']['official'])} (step"
              f" {s['step_of_max_weight']['official']}), ridge {_g(s['max_weight']['ours_regularized'])}; residual"
              f" median ours {_g(s['residual']['ours']['median'])}, official {_g(s['residual']['official']['median'])};"
              f" {official['ecos_solves']} ECOS solves: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."]
    check = result.get("torchjd_check")
    if check:
      sub = check["subproblems"]
      lines += ["", f"TorchJD's class against the transcription: {sub['agreeing_outcomes']} of"
                f" {len(sub['subproblems'])} sampled subproblems with the same outcome, largest relative difference"
                f" {_g(sub['max_relative_difference_where_ecos_optimal'])} where ECOS reports \"optimal\""
                f" ({_g(sub['max_relative_difference'])} overall); stepped through steps "
                + ", ".join(f"{w['steps'][0]}-{w['steps'][1]}: within {_g(max(w['max_relative_difference_per_step']))}"
                            for w in check["windows"]) + "."]
    if result.get("attribution"):
      lines += ["", "**Attribution** (one step, from the official weights of the step before: max weight /"
                " residual)", "", "| step | ours | official (ECOS, 20 CCP steps) | ECOS, more CCP steps |"
                " Clarabel, 20 CCP steps |", "|---|---|---|---|---|"]
      for row in result["attribution"]:
        more = next(v for k, v in row.items() if k.startswith("ECOS_optim_niter_"))
        clarabel = row["CLARABEL_optim_niter_20"]
        cell = lambda d: f"{_g(d['max_weight'])} / {_g(d['residual'])}"  # noqa: E731
        lines.append(f"| {row['step']} | {cell(row['ours'])} | {cell(row['official'])} |"
                     f" {cell(more)} ({more['ccp_steps']} steps) | {cell(clarabel)} |")
  if "digits" in result:
    runs = result["digits"]["runs"]
    first = next(iter(runs.values()))
    lines += ["", f"**The example's Nash-MTL row** ({len(first['seeds'])} seeds, {first['steps']} steps; Δm% against"
              " the STL means of the example's results, lower is better)", "",
              "| Nash-MTL | digit acc | parity acc | >= 5 acc | ink MSE | centre MSE | Δm% | largest weight |",
              "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
      label = ", ".join(f"{k}={v!r}" for k, v in run["options"].items()) or "exact (the default)"
      cells = [f"{m:.2f}" if i < 3 else f"{m:.3g}" for i, m in enumerate(run["mean"])]
      lines.append(f"| {label} | " + " | ".join(cells) + f" | {run['delta_m']:.2f} ± {run['delta_m_std']:.2f} |"
                   f" {_g(max(run['max_weight_per_seed']))} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("phase", choices=("record", "compare", "digits"))
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0, help="record: the run's seed")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="digits: the seeds")
  parser.add_argument("--regularization", type=float, default=1e-6,
                      help="compare: our option run on the same Grams; digits: the option trained")
  parser.add_argument("--stl", type=pathlib.Path, default=HERE.parent / "docs" / "results" / f"{PROBLEM}.json",
                      help="digits: the example's results JSON whose STL means Delta_m%% is taken against")
  parser.add_argument("--variants", nargs="+", choices=("exact", "regularization", "unweighted"),
                      default=["regularization", "unweighted"],
                      help="digits: nash_mtl as is, with --regularization, or with task_specific='unweighted'")
  parser.add_argument("--tiny", action="store_true", help="a smoke run (record: 100 steps; compare: few checks)")
  args = parser.parse_args(argv)
  command = "python benchmarks/nash_official.py " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.phase == "record":
    steps = 100 if args.tiny else args.steps
    result = record(steps, args.seed, chunk=min(100, steps))
    write_trace(result, args.out / TRACE, command)
    weights = result["trace"]["weights"]
    print(f"{steps} steps in {result['wall_s']:.1f} s; max weight {weights.max():.3g}; "
          f"test {np.round(result['test'], 3).tolist()}; wrote {args.out / TRACE}")
  elif args.phase == "compare":
    extra = dict(torchjd_windows=((1, 3),), attribution_steps=(50,), attribution_niter=5) if args.tiny else {}
    result = compare(args.out / TRACE, args.out, command, args.regularization, **extra)
    print(json.dumps({k: result[k] for k in ("official", "summary")}, indent=1)[:6000])
    print(f"wrote {args.out / RESULT}")
  else:
    steps = 100 if args.tiny else args.steps
    variants = {"exact": {}, "regularization": {"regularization": args.regularization},
                "unweighted": {"task_specific": "unweighted"}}
    rows = {name: dict(digits(args.seeds, steps, variants[name], args.stl), name=name) for name in args.variants}
    path = args.out / RESULT  # one results file: the digits rows go under "digits" of compare's JSON
    result = json.loads(path.read_text()) if path.exists() else {}
    result["digits"] = {"command": command, "problem": PROBLEM, "environment": common.environment(), "runs": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(result))
    for name, row in rows.items():
      print(f"{name} {row['options']}: Delta_m% {row['delta_m']:.2f} +- {row['delta_m_std']:.2f} over seeds "
            f"{row['seeds']}; max weight {max(row['max_weight_per_seed']):.3g}")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
