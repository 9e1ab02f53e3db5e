"""The real-data benchmark (examples/mtl_benchmark.py) and its data (examples/datasets.py)."""

import json

import numpy as np
import pytest

import scripts

datasets = scripts.load("examples", "datasets")
benchmark = scripts.load("examples", "mtl_benchmark")


@pytest.mark.parametrize("build", [datasets.multimnist, datasets.digits_attributes])
def test_problem_shapes_label_ranges_and_determinism(build):
  problem = build(seed=3)
  side = problem.image_shape[0] * problem.image_shape[1]
  for split in problem.splits.values():
    n = split["x"].shape[0]
    assert split["x"].shape == (n, side) and split["x"].dtype == np.float32
    assert len(split["y"]) == len(problem.tasks)
    for y, task in zip(split["y"], problem.tasks):
      if task.kind == "classification":
        assert y.shape == (n,) and y.min() >= 0 and y.max() < task.size
        assert len(np.unique(y)) == task.size  # every class occurs
      else:
        assert y.shape == (n, task.size) and np.all(np.isfinite(y))
  again = build(seed=3)
  other = build(seed=4)
  for name, split in problem.splits.items():
    np.testing.assert_array_equal(split["x"], again.splits[name]["x"])
    for a, b in zip(split["y"], again.splits[name]["y"]):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(split["source"], other.splits[name]["source"])


@pytest.mark.parametrize("build", [datasets.multimnist, datasets.digits_attributes])
def test_splits_use_disjoint_source_images(build):
  sources = {name: set(split["source"].ravel()) for name, split in build(seed=1).splits.items()}
  assert not sources["train"] & sources["val"]
  assert not sources["train"] & sources["test"]
  assert not sources["val"] & sources["test"]


def test_multimnist_pairs_two_distinct_digits_at_the_corners():
  images = datasets.load_digits().images / 16.0
  split = datasets.multimnist(seed=0).splits["test"]
  left, right = split["source"].T
  assert np.all(left != right)
  canvas = split["x"].reshape(-1, 12, 12)
  np.testing.assert_allclose(canvas[:, :4, :8], images[left][:, :4], atol=1e-6)  # left digit alone
  np.testing.assert_allclose(canvas[:, 8:, 4:], images[right][:, 4:], atol=1e-6)  # right digit alone
  np.testing.assert_allclose(canvas[:, 4:8, 4:8], np.maximum(images[left][:, 4:, 4:], images[right][:, :4, :4]),
                             atol=1e-6)


def test_digits_attribute_targets():
  split = datasets.digits_attributes(seed=0).splits["train"]
  digit, parity, large, ink, centre = split["y"]
  np.testing.assert_array_equal(parity, digit % 2)
  np.testing.assert_array_equal(large, digit >= 5)
  assert np.all(ink > 0) and np.all((centre >= 0) & (centre <= 9))


def test_delta_m_by_hand():
  # (-(90 - 100) / 100 - (80 - 80) / 80 + (2 - 1) / 1) / 3 = 1.1 / 3.
  got = benchmark.delta_m([90.0, 80.0, 2.0], [100.0, 80.0, 1.0], [True, True, False])
  np.testing.assert_allclose(got, 110.0 / 3.0)
  assert benchmark.delta_m([1.0, 5.0], [1.0, 5.0], [True, False]) == 0.0


def test_mean_rank_by_hand_with_ties_and_divergence():
  table = [[90.0, 1.0], [80.0, 2.0], [90.0, 3.0]]
  np.testing.assert_allclose(benchmark.mean_ranks(table, [True, False]), [1.25, 2.5, 2.25])
  np.testing.assert_allclose(benchmark.mean_ranks([[np.nan, 1.0], [80.0, 2.0]], [True, False]), [1.5, 1.5])


def test_condition_number_ignores_the_null_space():
  np.testing.assert_allclose(benchmark.condition_number(np.diag([4.0, 1.0, 0.0])), 2.0)
  assert np.isnan(benchmark.condition_number(np.zeros((2, 2))))


@pytest.mark.slow
def test_benchmark_end_to_end_writes_json_markdown_and_plots(tmp_path):
  benchmark.main(["--problem", "multimnist", "--methods", "linear_scalarization", "mgda", "--seeds", "0",
                  "--steps", "20", "--eval-every", "10", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "multimnist.json").read_text())
  assert set(results["methods"]) == {"linear_scalarization", "mgda"}
  assert np.asarray(results["stl"]["test"]).shape == (1, 2)
  for entry in results["methods"].values():
    assert np.all(np.isfinite(entry["test"])) and np.isfinite(entry["delta_m"])
    assert entry["sec_per_step"] > 0 and entry["mean_rank"] in (1.0, 1.5, 2.0)
    history = entry["history"][0]
    assert history["step"] == [10, 20]
    assert np.asarray(history["weights"]).shape == (2, 2) and np.all(np.asarray(history["cond"]) >= 1)
  table = (tmp_path / "multimnist.md").read_text()
  assert "| STL |" in table and "| MGDA |" in table and "Δm%" in table
  for kind in ("curves", "weights", "condition"):
    assert (tmp_path / f"multimnist_{kind}.png").stat().st_size > 5_000
