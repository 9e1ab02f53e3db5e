"""Multi-task problems built only from data that ships with scikit-learn.

Both problems start from ``sklearn.datasets.load_digits`` (1,797 images of 8x8
pixels, intensities 0..16). The source images are split into train, validation
and test sets *before* anything is combined, so no test image (nor any part of
one) is seen in training.

- ``multimnist``: the MultiMNIST construction of Sener & Koltun (2018), shrunk
  to the digits: a digit at the top-left and another at the bottom-right of a
  12x12 canvas, overlapping in the middle 4x4 block (pixelwise maximum). Two
  tasks: classify the left and the right digit.
- ``digits_attributes``: each digit, shifted at random on a 10x10 canvas with
  Gaussian pixel noise, carries five targets of mixed losses and scales: the
  class (10-way), its parity and whether it is >= 5 (binary), its ink mass
  (regression in pixels, a loss hundreds of times larger at the start) and its
  centre of mass (2-D regression in pixels), both measured on the clean image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.datasets import load_digits

FRACTIONS = (0.6, 0.15, 0.25)  # train, validation, test shares of the source images


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its loss and the metric reported on it.

  Attributes:
    name: short name, used in the tables.
    kind: ``"classification"`` (cross-entropy, accuracy) or ``"regression"``
      (mean squared error, MSE).
    size: number of classes, or of regression outputs.
  """

  name: str
  kind: str
  size: int

  @property
  def metric(self) -> str:
    return "acc" if self.kind == "classification" else "mse"

  @property
  def higher_is_better(self) -> bool:
    return self.kind == "classification"


@dataclasses.dataclass(frozen=True)
class Problem:
  """A multi-task data set: inputs ``x`` (N, D) float32 and one target array per task.

  Attributes:
    name: the problem's name.
    tasks: the tasks, in the order of ``splits[...]["y"]``.
    splits: ``{"train"|"val"|"test": {"x": (N, D), "y": [per-task targets],
      "source": (N, S) indices into load_digits()}}``; classification targets
      are int32 (N,), regression targets float32 (N, size).
    image_shape: the shape of one input image (for plotting and CNNs).
  """

  name: str
  tasks: tuple[Task, ...]
  splits: dict
  image_shape: tuple[int, int]


def split_sources(num: int, seed: int) -> dict[str, np.ndarray]:
  """Disjoint train/val/test index sets of the source images, fixed by ``seed``."""
  order = np.random.default_rng(seed).permutation(num)
  n_train, n_val = int(FRACTIONS[0] * num), int(FRACTIONS[1] * num)
  return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:n_train + n_val]),
          "test": np.sort(order[n_train + n_val:])}


def _digits():
  digits = load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)


def multimnist(seed: int = 0, sizes: tuple[int, int, int] = (10_000, 1_000, 2_000)) -> Problem:
  """Two overlapping digits per 12x12 image; tasks: the left and the right digit.

  Args:
    seed: fixes the source split and the pairing.
    sizes: number of pairs in train, val and test. Each pair takes two distinct
      source images of its own split.

  Returns:
    The ``Problem``; ``x`` is the flattened canvas (N, 144) in [0, 1].
  """
  images, labels = _digits()
  rng = np.random.default_rng(seed + 1)
  splits = {}
  for (name, sources), size in zip(split_sources(len(images), seed).items(), sizes):
    left = rng.choice(sources, size)
    # A different second image: shift by a random non-zero offset within the split.
    offset = rng.integers(1, len(sources), size)
    right = sources[(np.searchsorted(sources, left) + offset) % len(sources)]
    canvas = np.zeros((size, 12, 12), np.float32)
    canvas[:, :8, :8] = images[left]
    canvas[:, 4:, 4:] = np.maximum(canvas[:, 4:, 4:], images[right])
    splits[name] = {"x": canvas.reshape(size, -1), "y": [labels[left], labels[right]],
                    "source": np.stack([left, right], axis=1)}
  tasks = (Task("left", "classification", 10), Task("right", "classification", 10))
  return Problem("multimnist", tasks, splits, (12, 12))


def digits_attributes(seed: int = 0, noise: float = 0.2) -> Problem:
  """Five targets of each noisy, shifted digit: class, parity, >= 5, ink, centre.

  Args:
    seed: fixes the source split, the shifts and the noise.
    noise: standard deviation of the Gaussian pixel noise (intensities in [0, 1]).

  Returns:
    The ``Problem``; ``x`` is the flattened 10x10 canvas (N, 100).
  """
  images, labels = _digits()
  rng = np.random.default_rng(seed + 2)
  splits = {}
  for name, sources in split_sources(len(images), seed).items():
    size = len(sources)
    shifts = rng.integers(0, 3, (size, 2))
    canvas = np.zeros((size, 10, 10), np.float32)
    for i, (src, (dr, dc)) in enumerate(zip(sources, shifts)):
      canvas[i, dr:dr + 8, dc:dc + 8] = images[src]
    ink = canvas.sum(axis=(1, 2))
    grid = np.arange(10, dtype=np.float32)
    centre = np.stack([(canvas.sum(axis=2) @ grid) / ink, (canvas.sum(axis=1) @ grid) / ink], axis=1)
    noisy = canvas + noise * rng.normal(size=canvas.shape).astype(np.float32)
    y = labels[sources]
    splits[name] = {"x": noisy.reshape(size, -1),
                    "y": [y, y % 2, (y >= 5).astype(np.int32), ink[:, None], centre.astype(np.float32)],
                    "source": sources[:, None]}
  tasks = (Task("digit", "classification", 10), Task("parity", "classification", 2),
           Task("large", "classification", 2), Task("ink", "regression", 1),
           Task("centre", "regression", 2))
  return Problem("digits_attributes", tasks, splits, (10, 10))


PROBLEMS = {"multimnist": multimnist, "digits_attributes": digits_attributes}
