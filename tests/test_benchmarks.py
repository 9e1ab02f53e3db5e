"""Smoke tests of the benchmark scripts at tiny sizes (no timing thresholds)."""

import json

import pytest

import scripts


def load(name):
  return scripts.load("benchmarks", name)


def test_gradient_paths_writes_json(tmp_path, monkeypatch):
  monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
  monkeypatch.setenv("OMP_NUM_THREADS_UNRELATED", "1")
  out = tmp_path / "gradient_paths.json"
  load("gradient_paths").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["environment"]["platform"] in ("cpu", "gpu", "tpu")
  assert {"jax", "optax", "device_kind", "optax_mtl"} <= set(result["environment"])
  # The allocator settings that change CPU step times travel with the result; other variables do not.
  process_env = result["environment"]["process_env"]
  assert process_env["MALLOC_TRIM_THRESHOLD_"] == "68719476736"
  assert "OMP_NUM_THREADS_UNRELATED" not in process_env
  expected = {"ls", "jacobian", "jacobian_chunked", "lazy_refresh", "streamed_gram", "cached", "feature_level"}
  assert set(result["results"]) == expected
  assert result["results"]["ls"]["ratio_to_ls"] == 1.0
  for entry in result["results"].values():
    assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
  assert result["sizes"]["num_tasks"] == 3


def test_weight_solvers_writes_json_and_plot(tmp_path):
  out = tmp_path / "weight_solvers.json"
  load("weight_solvers").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  assert {row["K"] for row in result["rows"]} == {2, 3}
  methods = {"nash": "newton", "mgda": "exact", "aligned": "eigh", "imtl_g": "pinv", "cagrad": "barrier",
             "upgrad": "qp", "dualproj": "qp", "pcgrad": "gram", "gradvac": "gram"}
  assert {row["method"] for row in result["rows"]} == set(methods)
  for row in result["rows"]:
    ours = row["solvers"][methods[row["method"]]]
    assert ours["median_ms"] > 0
    if row["method"] in ("pcgrad", "gradvac"):  # random orders: time only
      assert ours["error"] is None
    else:
      assert ours["error"] < 1e-5, row
  assert out.with_suffix(".png").exists()


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_train_step_writes_json(tmp_path, model):
  import math

  out = tmp_path / "train_step.json"
  load("train_step").main(["--tiny", "--model", model, "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["sizes"]["trunk_params"] > 0 and result["sizes"]["model"] == model
  assert "note" in result["peers"]  # --tiny skips the PyTorch peers

  def check_timing(entry):
    values = [entry["min_ms"], entry["median_ms"], entry["max_ms"]]
    assert all(math.isfinite(v) and v > 0 for v in values), entry
    assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
    assert math.isfinite(entry["ratio_to_ls"]) and entry["ratio_to_ls"] > 0

  assert [row["K"] for row in result["rows"]] == result["sizes"]["ks"]
  for row in result["rows"]:
    assert set(row["methods"]) == {
        "linear_scalarization", "nash_mtl", "mgda", "aligned_mtl", "cagrad", "imtl_g", "pcgrad", "gradvac",
        "graddrop", "upgrad", "dualproj", "scale_invariant", "random_weighting", "dwa", "uncertainty_weighting",
        "gradnorm"}
    assert row["methods"]["linear_scalarization"]["ratio_to_ls"] == 1.0
    for group in ("methods", "references", "cheap_paths"):
      for entry in row[group].values():
        check_timing(entry)
    assert {f"task_gradients_nash_mtl_every_{k}" for k in (1, 5, 50)} <= set(row["cheap_paths"])
    assert row["cheap_paths"]["task_gradients_nash_mtl_every_50"]["steps_per_call"] == 50
    assert {f"feature_level_{m}{s}" for m in ("mgda", "aligned_mtl") for s in ("", "_per_task_heads")} <= set(
        row["cheap_paths"])
    assert {"through_representation_nash_mtl", "through_representation_mgda"} <= set(row["cheap_paths"])
    breakdown = row["breakdown"]
    assert set(breakdown["methods"]) == {"linear_scalarization", "nash_mtl", "mgda", "upgrad", "cagrad"}
    for name, stages in breakdown["methods"].items():
      assert stages["step_ms"] == row["methods"][name]["median_ms"]
      assert all(math.isfinite(v) and v > 0 for v in stages.values()), (name, stages)
    for entry in breakdown["stages"].values():
      assert 0 < entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
  assert out.with_suffix(".png").stat().st_size > 0


def test_memory_writes_json(tmp_path):
  out = tmp_path / "memory.json"
  load("memory").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  paths = row["paths"]
  assert set(paths) == set(load("memory").PATHS)
  assert paths["sum_grad"]["ratio_to_sum_grad"] == 1.0
  # Storing the Jacobian costs more than one backward pass; streaming it does not store it.
  assert paths["jacobian"]["temp_bytes"] > paths["sum_grad"]["temp_bytes"]
  assert paths["streamed"]["temp_bytes"] < paths["jacobian"]["temp_bytes"]
  for entry in row["largest_trunk"].values():
    assert entry["width"] % 64 == 0 and entry["compiled_peak_bytes"] <= result["budget"]["bytes"]


def test_compile_time_writes_json(tmp_path):
  out = tmp_path / "compile_time.json"
  load("compile_time").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  assert [row["depth"] for row in result["rows"]] == [1, 3]
  assert [row["leaves"] for row in result["rows"]] == [2 * 1 + 2 * 2, 2 * 3 + 2 * 2]
  for row in result["rows"]:
    assert set(row["steps"]) == set(load("compile_time").STEPS)
    assert row["steps"]["sum_grad"]["ratio_to_sum_grad"] == 1.0
    for entry in row["steps"].values():
      assert entry["trace_s"] > 0 and entry["compile_s"] > 0 and entry["instructions"] > 0
