"""The GPU figures of issue 7 in a few calls of a lent GPU machine: the plan, the wheels, the runs.

A lent machine (H100/H200) runs one command of at most 10 minutes at a time,
30 minutes of device time a session, reaches no package registry, and ships
its own Python 3.12 with JAX (CUDA), optax, flax, PyTorch (CUDA), matplotlib
and the test suite's packages (pytest, pytest-xdist, hypothesis, orbax,
scikit-learn, SciPy; the device tool's KINDS.md lists the image) but not
TorchJD, cvxpy, ECOS, quadprog or jaxopt. So the work is cut into stages,
each sized for one call, and the missing packages travel as wheels. Five
stages and the machines' start-up take more than one session's device time:
run ``mlp`` and ``scaling`` first (the issue's targets), then ``memory``,
``solvers`` (likely two calls: a second call skips the jobs already done) and
``tests``.

  python benchmarks/gpu_suite.py wheels             # here: download them into .whl/ (git-ignored)
  python benchmarks/gpu_suite.py plan               # print every stage's jobs

and on the GPU machine, with ``.whl`` carried and the repository as the
working directory::

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
    && PYTHONPATH=/tmp/site:$PWD OPTAX_MTL_COMMIT=<git rev-parse HEAD, here> \\
       python3 benchmarks/gpu_suite.py run mlp --archive $OUT

(the device receives the working tree without ``.git``: the commit, typed into
the command here, is recorded in every JSON's ``environment.source``)

Each job is one benchmark process writing its JSON under ``benchmarks/results``
(the ``*_gpu*`` names); ``run`` gives a stage a time budget, starts a job only
while the budget has room, skips a job whose JSON already exists (results
fetched from an earlier call travel back with the working tree), merges the
per-``K`` train-step files into one, prints a summary and packs every new
result and log into ``--archive``/``gpu_<stage>.tar.gz`` (also when a merge
or the summary fails), to be unpacked in the repository here. Stages (each
budget leaves 60 s of the call's 600 for the wheels' install, the merges and
the archive):

- ``mlp``: ``train_step.py`` on the 0.92M MLP, K = 2, 3, 10, 40, every method,
  the breakdown, the cheap paths and the peers (TorchJD and the official
  Nash-MTL step, PyTorch on CUDA), one process per K;
- ``scaling``: the 10M trunk (K = 2, 10, 40, with the peers) and the 100M
  trunk (K = 2, 10), the aggregation share at K = 10 from their breakdown;
- ``solvers``: ``weight_solvers.py``; the weightings with data-dependent loops and their 10M steps at
  K = 10 once more with those loops kept on the device (``DEVICE_LOOPS``) and once as by default,
  with Nash-MTL's cached step both ways (the cond, and the loop's ``refresh_weights``);
  the conv trunk; ``compile_time.py``;
- ``memory``: ``memory.py``, the compiled and measured peaks at K = 2, 10, 40,
  then the largest trunk at K = 10 (compiled peaks only);
- ``tests``: the test suite with ``pytest -n 8`` on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import train_step  # noqa: E402  (its plot, for the merged results)

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WHEELS = ROOT / ".whl"

# The peers' packages that the GPU image lacks, pinned to the versions of the committed CPU runs.
PEER_WHEELS = ("torchjd==0.18.0", "cvxpy==1.9.3", "ecos==2.0.14", "clarabel==0.11.1", "osqp==1.1.3",
               "qdldl==0.1.9.post1", "quadprog==0.1.14", "qpsolvers==4.13.0", "jaxopt==0.8.5")
# Requirements of cvxpy and Clarabel that the peers' solves do without (tested): cvxpy imports its
# solvers and its differentiation engine only when installed, and SCS alone is 43 MB of the 64 MB
# that a device call carries.
LEFT_OUT = ("scs", "highspy", "sparsediffpy", "cffi")
WHEEL_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")
WHEEL_PYTHON = "3.12"  # the GPU image's

MLP_10M = ["--width", "1792"]  # 10.1M trunk parameters
MLP_100M = ["--width", "5760"]  # 101M


@dataclasses.dataclass(frozen=True)
class Job:
  """One benchmark process: ``script args --out results/<output>``."""

  output: str
  script: str
  args: tuple[str, ...] = ()
  env: tuple[tuple[str, str], ...] = ()

  def command(self, results: pathlib.Path) -> list[str]:
    if self.script == "pytest":
      return [sys.executable, "-m", "pytest", *self.args, f"--junitxml={results / self.output}"]
    return [sys.executable, str(HERE / self.script), *self.args, "--out", str(results / self.output)]


# JAX preallocates 75% of the GPU; the PyTorch peers share the process and need their own memory.
SHARE_GPU = (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)


# XLA:GPU runs a while_loop whose trip count it cannot infer (a solver's convergence test) from the
# host, copying the predicate back and waiting for the stream at every iteration (WhileThunk). Command
# buffers that may hold loops and conditionals keep them on the device (CUDA graph conditional nodes,
# CUDA >= 12.3), but XLA leaves WHILE and CONDITIONAL out of its default command buffers; the solvers
# stage times the weightings and a 10M step both ways.
DEVICE_LOOPS = (("XLA_FLAGS", "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"),)
LOOPING_WEIGHTINGS = ("nash", "mgda", "cagrad", "upgrad", "dualproj")  # those with such loops
LOOPING_STEPS = ("nash_mtl", "mgda", "cagrad", "upgrad", "dualproj", "aligned_mtl")  # Aligned-MTL: none
# The cached step's lax.cond (ConditionalThunk: a predicate copied back every step) against the loop's
# static choice (refresh_weights), with and without conditionals in the command buffers.
CACHED_STEPS = ("task_gradients_nash_mtl_every_50", "task_gradients_nash_mtl_every_50_host")


def train_step_jobs(name: str, ks, args=(), peers=True, env=()) -> list[Job]:
  """One process per K (a timeout then costs one K, not the run); merged into ``<name>.json``."""
  peer_args = ("--peers",) if peers else ("--no-peers",)
  return [Job(f"{name}_k{k}.json", "train_step.py", ("--ks", str(k), *peer_args, *args),
              (SHARE_GPU if peers else ()) + tuple(env)) for k in ks]


@dataclasses.dataclass(frozen=True)
class Stage:
  budget_s: float  # for the jobs: a command may run 600 s, which also covers the install and the archive
  jobs: tuple[Job, ...]
  merges: tuple[str, ...] = ()  # train-step names whose per-K files are merged


STAGES = {
    "mlp": Stage(540, tuple(train_step_jobs("train_step_gpu", (2, 3, 10, 40))), ("train_step_gpu",)),
    "scaling": Stage(540, tuple(
        train_step_jobs("train_step_10m_gpu", (10, 2, 40), MLP_10M)
        + train_step_jobs("train_step_100m_gpu", (10, 2), (*MLP_100M, "--repeats", "10"), peers=False)),
        ("train_step_10m_gpu", "train_step_100m_gpu")),
    "solvers": Stage(540, (
        Job("weight_solvers_gpu.json", "weight_solvers.py"),
        Job("weight_solvers_device_loops_gpu.json", "weight_solvers.py",
            ("--ks", "2", "10", "40", "--methods", *LOOPING_WEIGHTINGS), DEVICE_LOOPS),
        *train_step_jobs("train_step_10m_host_loops_gpu", (10,), (*MLP_10M, "--only", *LOOPING_STEPS, *CACHED_STEPS),
                         peers=False),
        *train_step_jobs("train_step_10m_device_loops_gpu", (10,),
                         (*MLP_10M, "--only", *LOOPING_STEPS, *CACHED_STEPS),
                         peers=False, env=DEVICE_LOOPS),
        *train_step_jobs("train_step_conv_gpu", (2, 10, 40), ("--model", "conv", "--repeats", "10")),
        Job("compile_time_gpu.json", "compile_time.py"),
    ), ("train_step_10m_host_loops_gpu", "train_step_10m_device_loops_gpu", "train_step_conv_gpu")),
    # The measured peaks come from fresh child processes, which must not each preallocate 75%.
    "memory": Stage(540, (Job("memory_gpu.json", "memory.py", ("--search-ks",), SHARE_GPU),
                          Job("memory_largest_trunk_gpu.json", "memory.py", ("--ks", "10", "--no-measure")))),
    # Eight test processes share the GPU.
    "tests": Stage(540, (Job("tests_gpu.xml", "pytest", ("-q", "-n", "8", "-p", "no:cacheprovider"),
                             SHARE_GPU),)),
}


# What must agree between the per-K files of one merged result (they may come from different calls).
MERGE_KEYS = {"environment": ("platform", "device_kind", "jax", "jaxlib", "optax", "optax_mtl"),
              "sizes": ("model", "batch", "input_shape", "width", "depth", "head_dim", "trunk_params")}


def merge_train_step(results: pathlib.Path, name: str) -> pathlib.Path | None:
  """``<name>_k*.json`` -> ``<name>.json`` (rows sorted by K) and its plot; None if none ran.

  Raises ``ValueError`` if the parts differ in device, versions, model or settings.
  """
  parts = sorted(results.glob(f"{name}_k*.json"), key=lambda path: int(path.stem.rsplit("_k", 1)[1]))
  if not parts:
    return None
  loaded = [json.loads(path.read_text()) for path in parts]
  for path, result in zip(parts[1:], loaded[1:]):
    for group, keys in MERGE_KEYS.items():
      for key in keys:
        if result[group].get(key) != loaded[0][group].get(key):
          raise ValueError(f"{path.name} and {parts[0].name} differ in {group}.{key}")
    if result["settings"] != loaded[0]["settings"]:
      raise ValueError(f"{path.name} and {parts[0].name} differ in their settings")
  merged = dict(loaded[0])
  merged["rows"] = sorted((row for result in loaded for row in result["rows"]), key=lambda row: row["K"])
  merged["sizes"] = {**merged["sizes"], "ks": [row["K"] for row in merged["rows"]]}
  merged["merged_from"] = [path.name for path in parts]
  path = common.write(merged, results / f"{name}.json", f"{name}.json")
  train_step.plot(merged, path.with_suffix(".png"))
  for part in parts:  # each job's plot of its one K, superseded by the merged one
    part.with_suffix(".png").unlink(missing_ok=True)
  return path


def run_stage(name: str, results: pathlib.Path, archive: pathlib.Path | None, budget_s: float | None,
              dry_run: bool = False) -> list[dict]:
  stage = STAGES[name]
  budget = stage.budget_s if budget_s is None else budget_s
  results.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  before = {path: path.stat().st_mtime for path in results.iterdir()}
  log_path = results / f"gpu_suite_{name}.log"
  report = []
  with open(log_path, "a") as log:
    for job in stage.jobs:
      left = budget - (time.monotonic() - start)
      entry = {"job": job.output, "command": " ".join(job.command(results)[1:])}
      if (results / job.output).exists():
        entry["status"] = "done before"
      elif left < 30:
        entry["status"] = "skipped: budget spent"
      elif dry_run:
        entry["status"] = "would run"
      else:
        log.write(f"\n=== {entry['command']}\n")
        log.flush()
        job_start = time.monotonic()
        try:
          code = subprocess.run(job.command(results), stdout=log, stderr=subprocess.STDOUT, timeout=left,
                                env={**os.environ, **dict(job.env)}, cwd=ROOT).returncode
          entry["status"] = f"exit {code}"
        except subprocess.TimeoutExpired:
          entry["status"] = f"killed after {left:.0f} s"
        entry["seconds"] = round(time.monotonic() - job_start, 1)
      report.append(entry)
      print(f"{entry['job']:<32}{entry['status']:<24}{entry.get('seconds', '')}", flush=True)
  if dry_run:
    return report
  try:
    # A failed merge or summary is reported and logged; the jobs' own files are packed regardless.
    for step in [functools.partial(merge_train_step, results, merge) for merge in stage.merges] + [
        functools.partial(summarize, results, name)]:
      try:
        path = step()
        if path is not None:
          print(f"merged {path.name}")
      except Exception as err:  # pylint: disable=broad-except
        message = f"{step.func.__name__}{step.args[1:]}: {type(err).__name__}: {err}"
        report.append({"job": step.func.__name__, "status": f"failed: {message}"})
        print(f"FAILED {message}", flush=True)
        with open(log_path, "a") as log:
          log.write(f"\nFAILED {message}\n")
  finally:
    if archive is not None:
      new = [path for path in sorted(results.iterdir())
             if path.is_file() and before.get(path) != path.stat().st_mtime]
      archive.mkdir(parents=True, exist_ok=True)
      with tarfile.open(archive / f"gpu_{name}.tar.gz", "w:gz") as tar:
        for path in new:
          tar.add(path, arcname=path.name)
      print(f"packed {len(new)} files into {archive / f'gpu_{name}.tar.gz'}")
  return report


def compare_loops(results: pathlib.Path) -> None:
  """Each looping weighting's default solver with its loops run from the host and kept on the device."""
  host, device = (results / f"weight_solvers{tag}_gpu.json" for tag in ("", "_device_loops"))
  if not (host.exists() and device.exists()):
    return
  by_problem = {(row["method"], row["K"], row["matrix"]): row for row in json.loads(host.read_text())["rows"]}
  print("weightings, host loops -> device loops (median ms):")
  for row in json.loads(device.read_text())["rows"]:
    solver = next(iter(row["solvers"]))  # the default solver comes first
    base = by_problem.get((row["method"], row["K"], row["matrix"]))
    if base is not None:
      print(f"  {row['method']:<9}K={row['K']:<3}{row['matrix']:<9}"
            f"{base['solvers'][solver]['median_ms']:.3f} -> {row['solvers'][solver]['median_ms']:.3f}")


def summarize(results: pathlib.Path, name: str) -> None:
  """The figures the targets are read from, printed last (the device call returns the end of the output)."""
  if name == "solvers":
    compare_loops(results)
  for merge in STAGES[name].merges:
    path = results / f"{merge}.json"
    if not path.exists():
      continue
    result = json.loads(path.read_text())
    print(f"{merge}: {result['environment']['device_kind']}, trunk {result['sizes']['trunk_params']:,}")
    for row in result["rows"]:
      ls = row["methods"]["linear_scalarization"]["median_ms"]
      ratios = {key: row["methods"].get(key, {}).get("ratio_to_ls") for key in ("nash_mtl", "mgda", "upgrad")}
      ratios.update({key: row["cheap_paths"].get(key, {}).get("ratio_to_ls") for key in (
          *CACHED_STEPS, "feature_level_mgda_per_task_heads")})
      text = "  ".join(f"{key} {value:.2f}" for key, value in ratios.items() if value is not None)
      print(f"  K={row['K']:<3} LS {ls:.2f} ms  {text}")
      stages = row.get("breakdown", {}).get("methods", {}).get("nash_mtl")
      if stages:
        aggregation = stages["gram_ms"] + stages["weighting_ms"] + stages["combine_ms"]
        print(f"        Nash-MTL aggregation {aggregation:.2f} ms = {aggregation / stages['step_ms']:.1%} of the step")
      cached = row.get("breakdown", {}).get("cached")
      if cached:
        print("        cached split (refresh, reuse x LS): cond"
              f" {cached['refresh_over_ls']:.2f}, {cached['reuse_over_ls']:.3f}; host"
              f" {cached['host_refresh_over_ls']:.2f}, {cached['host_reuse_over_ls']:.3f}")
      peers = row.get("peers", {})
      for peer in ("torchjd_nash_mtl", "nash_mtl_official", "torchjd_mgda"):
        entry = peers.get(peer, {})
        if "median_ms" in entry:
          through = entry.get("speedup_of_ours_through_representation")
          print(f"        {peer} {entry['median_ms']:.2f} ms: ours {entry.get('speedup_of_ours', float('nan')):.2f}x"
                + (f", {through:.2f}x through z" if through else ""))


def download_wheels(dest: pathlib.Path, dry_run: bool = False) -> list[str]:
  """``pip download`` of the peers' wheels for the GPU image's Python and processor."""
  command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", WHEEL_PYTHON, "--implementation", "cp", "-d", str(dest)]
  for platform in WHEEL_PLATFORMS:
    command += ["--platform", platform]
  command += list(PEER_WHEELS)
  if not dry_run:
    subprocess.run(command, check=True)
  return command


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="verb", required=True)
  sub.add_parser("plan", help="print each stage's jobs")
  wheels = sub.add_parser("wheels", help="download the peers' wheels into .whl/ (run here, not there)")
  wheels.add_argument("--dest", default=str(WHEELS))
  run = sub.add_parser("run", help="run one stage (on the GPU machine)")
  run.add_argument("stage", choices=sorted(STAGES))
  run.add_argument("--results", default=str(RESULTS))
  run.add_argument("--archive", default=None, help="a folder for gpu_<stage>.tar.gz (the device call's $OUT)")
  run.add_argument("--budget-s", type=float, default=None, help="override the stage's time budget")
  run.add_argument("--dry-run", action="store_true", help="say what would run")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  if args.verb == "plan":
    for name, stage in STAGES.items():
      print(f"{name} (budget {stage.budget_s:.0f} s)")
      for job in stage.jobs:
        print(f"  {' '.join(job.command(RESULTS)[1:])}")
  elif args.verb == "wheels":
    download_wheels(pathlib.Path(args.dest))
  else:
    run_stage(args.stage, pathlib.Path(args.results), args.archive and pathlib.Path(args.archive),
              args.budget_s, dry_run=args.dry_run)


if __name__ == "__main__":
  main()
