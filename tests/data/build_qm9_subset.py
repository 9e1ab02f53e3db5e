"""Builds tests/data/qm9_subset/qm9_part1.csv: 300 QM9 molecules in qm9pack's CSV format.

The rows are qm9pack 1.0.3's (``pip install qm9pack``; its data folder is found
without importing the package, whose ``__init__`` needs ``pkg_resources``),
with only the columns ``benchmarks/qm9_data.py`` reads. Kept: the first 10
molecules (methane is index 1), two zwitterions whose coordinates interleave
hydrogens with heavy atoms (130382, 84327), two molecules whose coordinates
do not list the heavy atoms in SMILES order (23, 52466: the rdDetermineBonds
fallback), and 284 more drawn with ``numpy.random.default_rng(0)``.

  python tests/data/build_qm9_subset.py
"""

import csv
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import qm9_data  # noqa: E402

SIZE = 300
KEEP = [*range(1, 11), 130382, 84327, 23, 52466]


def main():
  rows = qm9_data.read_raw(qm9_data.default_source_dir())
  chosen = rows.index[rows["Index"].isin(KEEP)].tolist()
  rest = np.setdiff1d(np.arange(len(rows)), chosen)
  chosen += np.random.default_rng(0).choice(rest, SIZE - len(chosen), replace=False).tolist()
  subset = rows.loc[sorted(chosen), list(qm9_data.COLUMNS)]
  out = pathlib.Path(__file__).parent / "qm9_subset" / "qm9_part1.csv"
  out.parent.mkdir(exist_ok=True)
  subset.to_csv(out, index=False, quoting=csv.QUOTE_NONNUMERIC)
  print(f"wrote {len(subset)} molecules to {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
