"""Access to tests/data/reference_subset.npz (official and TorchJD outputs).

The file is a compact subset of the project's shared reference fixtures; see
tests/data/build_reference_subset.py for its provenance and contents.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest

PATH = pathlib.Path(__file__).parent / "data" / "reference_subset.npz"


@functools.lru_cache(maxsize=None)
def _load():
  z = np.load(PATH, allow_pickle=False)
  data = {k: z[k] for k in z.files}
  index = json.loads(str(data.pop("index_json")))
  return data, index


def cases() -> list[dict]:
  """The case index: ``case, prefix, K, d, regime, variant, seed, info, methods``."""
  return _load()[1]["cases"]


def get(case: dict, field: str) -> np.ndarray:
  """``field`` of a case, e.g. ``get(case, "nash_official_alpha")``."""
  return _load()[0][f"{case['prefix']}_{field}"]


def has(case: dict, field: str) -> bool:
  return f"{case['prefix']}_{field}" in _load()[0]


def case_id(case: dict) -> str:
  variant = f"-{case['variant']}" if case["variant"] else ""
  return f"{case['prefix']}-{case['regime']}{variant}-K{case['K']}".replace(" ", "")


# Each weighting compiles once per K: the quick tier (``pytest -m "not slow"``) runs the cases up
# to this K, the full suite every case.
QUICK_MAX_K = 3


def params(cases: list[dict]) -> list:
  """``cases`` as pytest params named by ``case_id``, those with ``K > QUICK_MAX_K`` marked ``slow``."""
  return [pytest.param(case, id=case_id(case), marks=pytest.mark.slow if case["K"] > QUICK_MAX_K else ())
          for case in cases]


def direction_error(gram: np.ndarray, w, w_ref: np.ndarray) -> float:
  """``||J^T (w - w_ref)||`` relative to the largest task gradient norm."""
  dw = np.asarray(w, np.float64) - w_ref
  return float(np.sqrt(max(dw @ gram @ dw, 0.0)) / np.sqrt(np.max(np.diag(gram))))
