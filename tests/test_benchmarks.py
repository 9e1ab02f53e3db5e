"""Smoke tests of the benchmark scripts at tiny sizes (no timing thresholds)."""

import json

import scripts


def load(name):
  return scripts.load("benchmarks", name)


def test_gradient_paths_writes_json(tmp_path):
  out = tmp_path / "gradient_paths.json"
  load("gradient_paths").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["environment"]["platform"] in ("cpu", "gpu", "tpu")
  assert {"jax", "optax", "device_kind", "optax_mtl"} <= set(result["environment"])
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
  assert {row["method"] for row in result["rows"]} == {"nash", "mgda", "aligned"}
  default = {"nash": "newton", "mgda": "exact", "aligned": "eigh"}
  for row in result["rows"]:
    ours = row["solvers"][default[row["method"]]]
    assert ours["error"] < 1e-5 and ours["median_ms"] > 0
  assert out.with_suffix(".png").exists()
