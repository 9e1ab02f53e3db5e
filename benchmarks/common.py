"""Shared pieces of the benchmark scripts: environment facts, timing, JSON output."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


# Process settings that change step times: glibc's allocator (whether XLA's per-step buffers are
# mapped afresh and page-faulted in at every step, see the README's Performance), a preloaded
# allocator, XLA's flags, JAX's GPU allocator and options, and OpenMP's waiting (the PyTorch peers).
_RECORDED_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS", "XLA_PYTHON_CLIENT_", "JAX_",
                          "OMP_WAIT_POLICY")


def environment() -> dict:
  """Device kind, versions and the process settings that change timings, recorded with every result."""
  import jaxlib
  import numpy
  import optax

  import optax_mtl

  device = jax.devices()[0]
  return {
      "source": source(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "cpu_model": cpu_model(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "numpy": numpy.__version__,
      "optax_mtl": optax_mtl.__version__,
      "date": time.strftime("%Y-%m-%d"),
      "process_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_RECORDED_ENV_PREFIXES)},
  }


def source() -> dict:
  """The code a result was measured on: the git commit and whether the tree had changes.

  A lent device receives the working tree without ``.git``; there the commit comes from
  ``OPTAX_MTL_COMMIT``, set in the command sent to it (see ``gpu_suite.py``).
  """
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
    return {"commit": commit, "uncommitted_changes": bool(changed)}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": os.environ.get("OPTAX_MTL_COMMIT"), "uncommitted_changes": None}


def cpu_model() -> str | None:
  """The host CPU's model name (Linux), which ``device_kind`` does not give on CPU."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def package_versions(names) -> dict:
  """Installed version of each named distribution, None where it is missing."""
  import importlib.metadata as metadata

  versions = {}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     settle: int = 1) -> dict:
  """Median/min/max milliseconds of each call, measured round-robin after compilation.

  Interleaving the variants spreads slow drifts of the machine (other load,
  frequency changes) over all of them instead of biasing one. Each timed call
  follows ``settle`` untimed calls of the same callable, because a call
  right after a different, heavier one runs slower: on the 2-core CPU of the
  committed results, LS's step at K = 40 took 44 ms right after a Nash-MTL step
  and 26 ms right after a ``jax.grad`` step (medians of 10), so without
  settling a ratio depended on the variant before it in the round.
  """
  for call in calls.values():
    for _ in range(warmup):
      block(call())
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      for _ in range(settle):
        block(call())
      start = time.perf_counter()
      block(call())
      samples[name].append(time.perf_counter() - start)
  return {
      name: {
          "median_ms": 1e3 * statistics.median(values),
          "min_ms": 1e3 * min(values),
          "max_ms": 1e3 * max(values),
          "repeats": len(values),
          "settle_calls": settle,
      }
      for name, values in samples.items()
  }


def _strict(value):
  """NaN/inf as null (not applicable / failed), so the file is standard JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_strict(v) for v in value]
  return value


def write(result: dict, out: str | os.PathLike | None, default_name: str) -> pathlib.Path:
  path = pathlib.Path(out) if out else RESULTS / default_name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_strict(result), indent=2, sort_keys=False, allow_nan=False) + "\n")
  return path
