"""Builds ``reference_subset.npz`` from the project's shared reference fixtures.

Source: ``shared/fixtures/reference_aggregations.npz`` (41 cases, produced by
running the authors' official PyTorch code and TorchJD 0.18.0 on seeded
gradient matrices; see that folder's README for every key). The tests must run
from a plain clone, so they read this compact subset instead:

- every per-task array (shape ``(K,)``, ``(K, K)``) and scalar of every case;
- ``caseNN_gram`` = ``G @ G.T`` in float64 for every case (all Gram-based
  weightings depend on ``G`` only through it);
- ``G`` and the ``(d,)`` directions of methods that store no weights (and
  Nash-MTL's clipped ones) only for cases with ``d <= 64``; elsewhere a
  direction is ``w @ G``;
- ``index_json``: the case list with ``K, d, regime, variant, seed`` and the
  per-method ``status`` / Nash ``stop_reason`` / IMTL-G fallback flags.

Run: ``python tests/data/build_reference_subset.py ../shared/fixtures/reference_aggregations.npz``
"""

import json
import pathlib
import sys

import numpy as np

MAX_D_WITH_MATRIX = 64


def main(src: str) -> None:
  z = np.load(src, allow_pickle=False)
  index = json.loads(str(z["index_json"]))
  out = {}
  cases = []
  for case in index["cases"]:
    prefix, k, d = case["prefix"], case["K"], case["d"]
    g = z[f"{prefix}_G"]
    out[f"{prefix}_gram"] = g @ g.T
    for key in z.files:
      if not key.startswith(prefix + "_"):
        continue
      value = z[key]
      keep_vectors = d <= MAX_D_WITH_MATRIX
      if value.ndim == 0 or value.shape in ((k,), (k, k), (k, k - 1)):
        out[key] = value
      elif keep_vectors and value.shape == (k, d):
        out[key] = value
      elif keep_vectors and value.shape == (d,):
        # A direction with stored weights is w @ G to rounding: keep only
        # the directions of methods that store no weights (or clip).
        stem = key[: -len("_dir")] if key.endswith("_dir") else None
        if stem is None or f"{stem}_w" not in z.files or stem.startswith("nash"):
          out[key] = value
    methods = {
        name: {
            field: info[field]
            for field in ("status", "stop_reason", "solver_status")
            if field in info
        }
        for name, info in case["methods"].items()
    }
    cases.append({
        "case": case["case"], "prefix": prefix, "K": k, "d": d,
        "regime": case["regime"], "variant": case["variant"],
        "seed": case["seed"], "info": case["info"], "methods": methods,
    })
  out["index_json"] = np.array(json.dumps({"source": "shared/fixtures/reference_aggregations.npz",
                                           "versions": index["versions"], "cases": cases}))
  dest = pathlib.Path(__file__).with_name("reference_subset.npz")
  np.savez_compressed(dest, **out)
  print(f"wrote {dest} ({dest.stat().st_size / 1e6:.2f} MB, {len(out)} keys)")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures/reference_aggregations.npz")
