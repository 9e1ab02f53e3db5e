"""Main demo: multi-task methods on MultiMNIST-style digits, scored against single-task models.

A short run of ``examples/mtl_benchmark.py``: two overlapping 8x8 digits from
scikit-learn's ``load_digits`` on a 12x12 canvas (tasks: the left and the
right digit, as in MGDA-UB's MultiMNIST), a Flax NNX network with a shared MLP
trunk and one head per task, each method chained in front of Adam, one seed.
It prints the test accuracies, Delta_m% against the single-task baselines
(STL; lower is better, nash-mtl's sign), the mean rank and the time per step.
About two minutes on a 2-core CPU; ``examples/mtl_benchmark.py`` runs every
method over several seeds and also writes JSON, Markdown and plots.

  python examples/demo.py [--steps 500] [--methods linear_scalarization nash_mtl ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mtl_benchmark  # noqa: E402  (a sibling module, importable however this script is run)

DEMO_METHODS = ["linear_scalarization", "nash_mtl", "mgda", "aligned_mtl", "cagrad", "imtl_g", "pcgrad",
                "upgrad"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--methods", choices=sorted(mtl_benchmark.METHODS), nargs="+", default=DEMO_METHODS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=None, help="also write JSON and Markdown there")
  args = parser.parse_args()
  print(f"optax_mtl {optax_mtl.__version__} | jax {jax.__version__} on {jax.devices()[0].platform}"
        f" | MultiMNIST (load_digits) | {len(args.methods)} methods + STL | {args.steps} steps, seed {args.seed}")
  results = mtl_benchmark.run("multimnist", args.methods, [args.seed], args.steps,
                              chunk=min(100, args.steps))
  print(mtl_benchmark.markdown(results))
  print(f"total {results['wall_s']:.0f} s (including compilation)")
  if args.out is not None:
    command = "python examples/demo.py " + " ".join(sys.argv[1:])
    for path in mtl_benchmark.write(results, args.out, command):
      print("wrote", path)


if __name__ == "__main__":
  main()
