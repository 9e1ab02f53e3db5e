"""Builds ``nash_vanishing.npz``: Grams of a training run in which a task's gradient vanishes.

Source: ``benchmarks/results/nash_official_trace_cpu.npz``, written by
``python benchmarks/nash_official.py record --out benchmarks/results``: the five-task
``digits_attributes`` problem of ``examples/mtl_benchmark.py`` (seed 0, 2000 steps, batch 128,
Adam 1e-3) trained with ``optax_mtl.nash_mtl`` (exact weights), the float32 Gram of the
trunk's per-task gradients recorded at every step. The parity task's loss reaches 0 in float32
and its trunk gradient's norm falls from about 0.2 (step 400) to 1e-9..1e-11 (steps 800 to
1000), and the exact Nash-MTL weight on it, ``~ 1 / ||g||``, runs up to 5e10.

Kept: every 25th step from 400 to 1000 (25 Grams), float32, with the run's exact weights at
those steps (``weights``, from the transform's state) and the step numbers (1-based).

Run: ``python tests/data/build_nash_vanishing.py benchmarks/results/nash_official_trace_cpu.npz``
"""

import pathlib
import sys

import numpy as np

STEPS = np.arange(400, 1001, 25)  # 1-based training steps


def main(src: str) -> None:
  trace = np.load(src)
  index = STEPS - 1
  out = pathlib.Path(__file__).parent / "nash_vanishing.npz"
  np.savez_compressed(out, steps=STEPS.astype(np.int32), grams=trace["gram"][index].astype(np.float32),
                      weights=trace["weights"][index].astype(np.float32))
  print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
  main(sys.argv[1])
