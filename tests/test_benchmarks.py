"""Smoke tests of the benchmark scripts at tiny sizes (no timing thresholds)."""

import json

import pytest

import scripts

pytestmark = pytest.mark.slow  # each test runs a script


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
  source = result["environment"]["source"]
  assert source["commit"] is None or len(source["commit"]) == 40
  expected = {"ls", "jacobian", "jacobian_chunked", "lazy_refresh", "streamed_gram", "cached", "feature_level"}
  assert set(result["results"]) == expected
  assert result["results"]["ls"]["ratio_to_ls"] == 1.0
  for entry in result["results"].values():
    assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
  assert result["sizes"]["num_tasks"] == 3


def test_source_without_git_reads_the_commit_from_the_environment(monkeypatch):
  common = load("common")
  monkeypatch.setenv("PATH", "")  # no git: as on a lent device, which receives the tree without .git
  monkeypatch.setenv("OPTAX_MTL_COMMIT", "0123abc")
  assert common.source() == {"commit": "0123abc", "uncommitted_changes": None}


def test_package_versions_marks_missing_packages():
  versions = load("common").package_versions(("numpy", "no-such-distribution-xyz"))
  assert versions["numpy"] and versions["no-such-distribution-xyz"] is None


def test_weight_solvers_writes_json_and_plot(tmp_path):
  out = tmp_path / "weight_solvers.json"
  load("weight_solvers").main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  assert {row["K"] for row in result["rows"]} == {2, 3}
  assert result["settings"]["repeats"] == 3 and result["settings"]["ks"] == [2, 3]
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
    assert {f"task_gradients_nash_mtl_every_{k}_host" for k in (5, 50)} <= set(row["cheap_paths"])
    assert "task_gradients_nash_mtl_every_1_host" not in row["cheap_paths"]
    for suffix in ("", "_host"):
      assert row["cheap_paths"][f"task_gradients_nash_mtl_every_50{suffix}"]["steps_per_call"] == 50
    assert {f"feature_level_{m}{s}" for m in ("mgda", "aligned_mtl") for s in ("", "_per_task_heads")} <= set(
        row["cheap_paths"])
    assert {f"through_representation_{m}" for m in load("train_step").THROUGH_REPRESENTATION} <= set(
        row["cheap_paths"])
    # --only checks its names against this list.
    assert sorted({**row["methods"], **row["references"], **row["cheap_paths"]}) == sorted(
        load("train_step").variant_names((1, 5, 50)))
    breakdown = row["breakdown"]
    assert set(breakdown["methods"]) == {"linear_scalarization", "nash_mtl", "mgda", "upgrad", "cagrad"}
    for name, stages in breakdown["methods"].items():
      assert stages["step_ms"] == row["methods"][name]["median_ms"]
      assert all(math.isfinite(v) and v > 0 for v in stages.values()), (name, stages)
    for entry in breakdown["stages"].values():
      assert 0 < entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
    cached = breakdown["cached"]
    assert cached["update_weights_every"] == 50
    for prefix, kind in (("", "cached"), ("host_", "host")):
      assert cached[f"{prefix}refresh_step_ms"] == breakdown["stages"][f"{kind}_refresh_step"]["median_ms"]
      assert cached[f"{prefix}reuse_over_ls"] == cached[f"{prefix}reuse_step_ms"] / cached["ls_step_ms"]
      assert cached[f"{prefix}cycle_over_ls"] == pytest.approx(
          (cached[f"{prefix}refresh_over_ls"] + 49 * cached[f"{prefix}reuse_over_ls"]) / 50)
  assert out.with_suffix(".png").stat().st_size > 0


def test_train_step_breakdown_of_a_subset(tmp_path):
  # --only with --breakdown-ks: every weighting's stages, the step time of the methods that ran.
  out = tmp_path / "subset.json"
  result = load("train_step").main(["--tiny", "--only", "nash_mtl", "--breakdown-ks", "3", "--out", str(out)])
  (row,) = result["rows"]
  methods = row["breakdown"]["methods"]
  assert methods["nash_mtl"]["step_ms"] == row["methods"]["nash_mtl"]["median_ms"]
  assert "step_ms" not in methods["mgda"] and methods["mgda"]["weighting_ms"] > 0


def test_train_step_cached_split_refreshes_then_reuses():
  # The two timed kinds of the cached step: from count 0 the weights are solved (they leave
  # their initial uniform value), from count 1 the last ones are reused as they are.
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  ts = load("train_step")
  args = ts.parse(["--tiny"])
  k = 3
  params = ts.MODELS["mlp"].init_for(args, k)
  x, y = (jnp.asarray(a) for a in ts.make_batches(args, k)[0])
  calls = ts.cached_step_calls(jax.jit, optax.adam(1e-3), k, 50, ts.MODELS["mlp"], None, params, x, y)
  assert set(calls) == {"ls_step", "cached_refresh_step", "cached_reuse_step", "host_refresh_step",
                        "host_reuse_step"}
  _, refreshed = calls["cached_refresh_step"]()
  _, reused = calls["cached_reuse_step"]()
  assert int(refreshed[0].count) == 1 and int(reused[0].count) == 2
  assert not np.allclose(refreshed[0].weights, np.ones(k))  # solved at count 0
  # At count 1 the state carries the weights solved at count 0 on the same batch: kept bit for bit.
  np.testing.assert_array_equal(reused[0].weights, refreshed[0].weights)
  # The loop's two steps do the same from the same states, the count deciding nothing.
  _, host_refreshed = calls["host_refresh_step"]()
  _, host_reused = calls["host_reuse_step"]()
  np.testing.assert_allclose(host_refreshed[0].weights, refreshed[0].weights, rtol=1e-5)
  np.testing.assert_array_equal(host_reused[0].weights, reused[0].weights)
  assert int(host_refreshed[0].count) == 1 and int(host_reused[0].count) == 2


def test_train_step_rejects_unknown_names_for_only(capsys):
  with pytest.raises(SystemExit):
    load("train_step").parse(["--tiny", "--only", "nash_mtl", "nash"])
  assert "unknown name(s) nash;" in capsys.readouterr().err


@pytest.mark.parametrize("model, image_size", [("mlp", None), ("conv", 8), ("conv", 7)])
def test_the_peers_trunk_computes_our_representation(model, image_size):
  # Same weights, same function: the peers time the model we time (an odd image side is padded
  # differently by XLA's SAME).
  torch = pytest.importorskip("torch")
  import numpy as np

  train_step = load("train_step")
  args = train_step.parse(["--tiny", "--model", model])
  args.image_size = image_size or args.image_size
  net = train_step.MODELS[model]
  params = net.init_for(args, 2)
  (x, y), = train_step.make_batches(args, 2)[:1]
  trunk, heads = train_step.torch_model(torch, params, "cpu", net)
  with torch.no_grad():
    z = trunk(torch.as_tensor(net.torch_inputs(x))).numpy()
    outputs = np.stack([head(torch.as_tensor(z)).numpy() for head in heads], axis=1)
  expected = np.asarray(net.encoder(params, x, y))
  assert z.shape == expected.shape == (args.batch, args.width)
  np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
  for i, head in enumerate(params["heads"]):
    np.testing.assert_allclose(outputs[:, i], expected @ np.asarray(head["w"]) + np.asarray(head["b"]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_train_step_times_the_peers_against_a_subset(tmp_path, model):
  # The peers are the benchmark extra, not the test extra: this runs where they are installed.
  pytest.importorskip("torchjd")
  out = tmp_path / "train_step.json"
  load("train_step").main(["--tiny", "--model", model, "--peers", "--torch-device", "cpu", "--only", "mgda",
                           "through_representation_upgrad", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["sizes"]["model"] == model
  assert result["peers"]["torch_device"] == "cpu"
  (row,) = result["rows"]
  assert set(row["methods"]) == {"linear_scalarization", "mgda"}
  assert set(row["cheap_paths"]) == {"through_representation_upgrad"}
  peers = {name: entry for name, entry in row["peers"].items() if "median_ms" in entry}
  assert {"torch_sum", "torchjd_mean", "torchjd_mgda", "torchjd_upgrad"} <= set(peers)
  for name, entry in peers.items():
    timed = entry["method"] in row["methods"]
    assert ("speedup_of_ours" in entry) == timed, name
    if timed:
      assert entry["speedup_of_ours"] == entry["median_ms"] / row["methods"][entry["method"]]["median_ms"]
  assert "speedup_of_ours_through_representation" in peers["torchjd_upgrad"]
  assert "speedup_of_ours_through_representation" not in peers["torchjd_mgda"]


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
      assert 0 <= entry["data_dependent_loops"] <= entry["while_loops"]
    # One backward pass has no loop; Nash-MTL's solver stops on convergence.
    assert row["steps"]["sum_grad"]["while_loops"] == row["steps"]["linear_scalarization"]["while_loops"] == 0
    assert row["steps"]["nash_mtl"]["data_dependent_loops"] >= 1


def test_gpu_suite_jobs_parse_with_their_scripts():
  suite = load("gpu_suite")
  outputs = set()
  for stage in suite.STAGES.values():
    for job in stage.jobs:
      assert job.output not in outputs  # two jobs writing one file would skip each other
      outputs.add(job.output)
      argv = job.command(suite.RESULTS)[2:]
      if job.script == "pytest":
        assert dict(job.env)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # eight processes, one GPU
        continue
      args = load(job.script.removesuffix(".py")).parse(argv)
      assert args.out.endswith(job.output) and "_gpu" in job.output
      # PyTorch in the same process, or memory.py's fresh child processes, need JAX not to take 75%.
      if getattr(args, "peers", False) or getattr(args, "measure", False):
        assert dict(job.env)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false", job
    for merge in stage.merges:
      assert any(job.output.startswith(f"{merge}_k") for job in stage.jobs)


def test_gpu_suite_times_device_loops_against_the_same_jobs_as_by_default():
  suite = load("gpu_suite")
  jobs = {job.output: job for job in suite.STAGES["solvers"].jobs}
  device = [name for name in jobs if "device_loops" in name]
  assert len(device) == 2
  for name in device:
    assert "+WHILE" in dict(jobs[name].env)["XLA_FLAGS"]
    twin = jobs.get(name.replace("_device_loops", "_host_loops")) or jobs[name.replace("_device_loops", "")]
    assert "XLA_FLAGS" not in dict(twin.env)
    # The same problems both ways (the default weight-solver job covers every method and K).
    if twin.args:
      assert twin.args == jobs[name].args


def test_gpu_suite_compares_each_weighting_with_its_loops_on_host_and_device(tmp_path, capsys):
  suite = load("gpu_suite")
  rows = [{"method": "nash", "K": 10, "matrix": "random", "d": 8,
           "solvers": {"newton": {"median_ms": 2.0}, "ccp": {"median_ms": 9.0}}},
          {"method": "mgda", "K": 40, "matrix": "random", "d": 8, "solvers": {"fw": {"median_ms": 3.0}}}]
  (tmp_path / "weight_solvers_gpu.json").write_text(json.dumps({"rows": rows}))
  device = [dict(rows[0], solvers={"newton": {"median_ms": 0.5}, "ccp": {"median_ms": 1.0}})]
  (tmp_path / "weight_solvers_device_loops_gpu.json").write_text(json.dumps({"rows": device}))
  suite.compare_loops(tmp_path)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and lines[1].split() == ["nash", "K=10", "random", "2.000", "->", "0.500"]


def test_gpu_suite_runs_merges_and_packs_a_stage(tmp_path, monkeypatch):
  import tarfile

  suite = load("gpu_suite")
  tiny = ("--tiny", "--only", "mgda")
  jobs = suite.train_step_jobs("train_step_tiny_gpu", (2, 3), tiny, peers=False)
  monkeypatch.setitem(suite.STAGES, "tiny", suite.Stage(600, tuple(jobs), ("train_step_tiny_gpu",)))
  results, archive = tmp_path / "results", tmp_path / "out"
  results.mkdir()
  (results / "older.json").write_text("{}")  # a result of an earlier call: not packed again
  report = suite.run_stage("tiny", results, archive, budget_s=None)
  assert [entry["status"] for entry in report] == ["exit 0", "exit 0"], report
  merged = json.loads((results / "train_step_tiny_gpu.json").read_text())
  assert [row["K"] for row in merged["rows"]] == merged["sizes"]["ks"] == [2, 3]
  assert merged["merged_from"] == ["train_step_tiny_gpu_k2.json", "train_step_tiny_gpu_k3.json"]
  assert (results / "train_step_tiny_gpu.png").stat().st_size > 0
  with tarfile.open(archive / "gpu_tiny.tar.gz") as tar:
    assert set(tar.getnames()) == {"train_step_tiny_gpu_k2.json", "train_step_tiny_gpu_k3.json",
                                   "train_step_tiny_gpu.json", "train_step_tiny_gpu.png", "gpu_suite_tiny.log"}
  # Parts from different devices are not merged into one result; the archive comes all the same.
  part = json.loads((results / "train_step_tiny_gpu_k3.json").read_text())
  part["environment"]["device_kind"] = "another device"
  (results / "train_step_tiny_gpu_k3.json").write_text(json.dumps(part))
  with pytest.raises(ValueError, match="device_kind"):
    suite.merge_train_step(results, "train_step_tiny_gpu")
  report = suite.run_stage("tiny", results, archive, budget_s=None)
  assert report[-1]["status"].startswith("failed: merge_train_step") and "device_kind" in report[-1]["status"]
  with tarfile.open(archive / "gpu_tiny.tar.gz") as tar:
    assert "gpu_suite_tiny.log" in tar.getnames()
  # A second call skips what is there; an exhausted budget starts nothing.
  again = suite.run_stage("tiny", results, None, budget_s=None, dry_run=True)
  assert [entry["status"] for entry in again] == ["done before", "done before"]
  (results / "train_step_tiny_gpu_k3.json").unlink()
  spent = suite.run_stage("tiny", results, None, budget_s=0, dry_run=True)
  assert [entry["status"] for entry in spent] == ["done before", "skipped: budget spent"]


def test_gpu_suite_wheels_cover_the_peers_requirements():
  # Every package the peers import beyond the GPU image's (numpy, scipy, torch, setuptools, jinja2,
  # joblib) travels as a wheel; the ones left out (suite.LEFT_OUT) are not needed to solve.
  pytest.importorskip("torchjd")
  import subprocess
  import sys
  from importlib import metadata

  import packaging.requirements

  suite = load("gpu_suite")
  pinned = {pin.split("==")[0].lower() for pin in suite.PEER_WHEELS}
  in_image = {"numpy", "scipy", "torch", "setuptools", "jinja2", "joblib", "jax", "jaxlib"}
  needed = set()
  for package, extras in (("torchjd", {"nash-mtl", "cagrad", "quadprog-projector"}), ("cvxpy", set()),
                          ("osqp", set()), ("qpsolvers", set()), ("jaxopt", set()), ("clarabel", set())):
    for text in metadata.requires(package) or []:
      requirement = packaging.requirements.Requirement(text)
      if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
        needed.add(requirement.name.lower())
  assert needed - in_image - set(suite.LEFT_OUT) <= pinned, needed - in_image - pinned
  # The peers' solves without the packages left out.
  script = f"""
import sys, warnings
for name in {list(suite.LEFT_OUT)!r}:
  sys.modules[name] = None
warnings.simplefilter("ignore")
import torch
from torchjd import aggregation
g = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
for aggregator in (aggregation.NashMTL(n_tasks=4), aggregation.CAGrad(c=0.4), aggregation.UPGrad()):
  assert torch.isfinite(aggregator(g)).all()
print("solved")
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert done.stdout.strip() == "solved", done.stderr


def test_nash_official_records_a_trace_and_redoes_the_digits_row_without_torch(tmp_path):
  # The compare phase needs cvxpy (and torch for TorchJD's class): no smoke test for it here.
  import numpy as np

  nash_official = load("nash_official")
  nash_official.main(["record", "--tiny", "--out", str(tmp_path)])
  trace = np.load(tmp_path / nash_official.TRACE)
  assert trace["gram"].shape == (100, 5, 5) and trace["weights"].shape == (100, 5)
  assert json.loads(str(trace["meta_json"]))["config"]["steps"] == 100
  # The recorded weights solve a_i (M a)_i = 1 for the recorded Grams.
  np.testing.assert_allclose(nash_official.residual(trace["gram"], trace["weights"].astype(np.float64)), 0.0,
                             atol=1e-4)
  factor = nash_official.gram_factor(trace["gram"][-1])
  np.testing.assert_allclose(factor @ factor.T, trace["gram"][-1], rtol=1e-5, atol=1e-7)
  nash_official.main(["digits", "--tiny", "--seeds", "0", "--variants", "regularization", "--out", str(tmp_path)])
  result = json.loads((tmp_path / nash_official.RESULT).read_text())
  row = result["digits"]["runs"]["regularization"]
  assert row["options"] == {"regularization": 1e-6} and row["seeds"] == [0] and np.isfinite(row["delta_m"])
  assert "regularization=1e-06" in nash_official.markdown(result)
