"""docs/benchmarks.md is what benchmarks/benchmarks_page.py makes of the current results files."""

import json

import pytest

import scripts

page = scripts.load("benchmarks", "benchmarks_page")


def test_page_matches_the_results_files(capsys):
  """Fails when a results JSON changed (or came, or went) without `python benchmarks/benchmarks_page.py`."""
  status = page.main(["--check"])
  assert status == 0, capsys.readouterr().out


def test_check_fails_on_a_stale_page(tmp_path, capsys):
  stale = tmp_path / "benchmarks.md"
  stale.write_text("# Benchmarks\n\nan old table\n")
  assert page.main(["--check"], page=stale) == 1
  assert "out of date" in capsys.readouterr().out
  assert stale.read_text() == "# Benchmarks\n\nan old table\n"  # --check writes nothing


# A train-step result as benchmarks/train_step.py writes it, cut to two K, LS, one Gram method, the
# plain step, one cached path and two peers.
def _timing(median, ratio):
  return {"median_ms": median, "min_ms": median, "max_ms": median, "repeats": 3, "settle_calls": 1,
          "ratio_to_ls": ratio}


TINY = {
    "benchmark": "train_step",
    "environment": {"platform": "cpu", "device_kind": "cpu", "device_count": 1, "cpu_count": 2,
                    "machine": "x86_64", "python": "3.11.7", "jax": "0.10.2", "jaxlib": "0.10.2",
                    "optax": "0.2.8", "numpy": "2.4.6", "optax_mtl": "0.1.0", "date": "2026-01-01",
                    "process_env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "peers": {"versions": {"torch": "2.13.0", "torchjd": "0.18.0"}, "torch_threads": 2, "torch_device": "cpu",
              "torch_float32_matmul_precision": "highest"},
    "sizes": {"model": "mlp", "ks": [2, 10], "batch": 64, "input_shape": [256], "width": 128, "depth": 4,
              "head_dim": 8, "trunk_params": 115200, "head_params_per_task": 1032},
    "settings": {"optimizer": "adam(0.0001)", "jacobian_batch_size": 1, "repeats": 3, "peer_repeats": 10,
                 "batches_rotated": 8, "only": None,
                 "paths": {"linear_scalarization": "lazy", "nash_mtl": "jacobian"}},
    "rows": [
        {"K": 2, "methods": {"linear_scalarization": _timing(10.0, 1.0), "nash_mtl": _timing(18.0, 1.8)},
         "references": {"sum_grad": _timing(9.5, 0.95)},
         "cheap_paths": {"task_gradients_nash_mtl_every_50": _timing(10.5, 1.05)},
         "peers": {"torch_sum": {"median_ms": 12.0, "method": "linear_scalarization", "speedup_of_ours": 1.2},
                   "torchjd_nash_mtl": {"median_ms": 36.0, "method": "nash_mtl", "speedup_of_ours": 2.0,
                                        "speedup_of_ours_through_representation": 2.25}}},
        {"K": 10, "methods": {"linear_scalarization": _timing(123.4, 1.0), "nash_mtl": _timing(864.0, 7.0)},
         "references": {"sum_grad": _timing(120.0, 0.9724)},
         "cheap_paths": {},
         "peers": {"torch_sum": {"median_ms": 150.0, "method": "linear_scalarization", "speedup_of_ours": 1.2156}}},
    ],
}


def test_train_step_tables_on_a_tiny_result():
  rows, settings = TINY["rows"], TINY["settings"]
  assert page.train_step_ratio_table(rows, settings) == [
      "| step | gradients | K = 2 | K = 10 |",
      "|---|---|---|---|",
      "| LS step | lazy | 10.0 ms | 123 ms |",
      "| `jax.grad` of the sum | one backward pass, no optax_mtl | 0.95 | 0.97 |",
      "| Nash-MTL | Jacobian | 1.80 | 7.00 |",
      "| Nash-MTL, k = 50 | lazy, cached weights, `lax.cond` | 1.05 | - |",
      "",
  ]
  assert page.train_step_peer_table(rows) == [
      "| peer | ours | K = 2 | K = 10 |",
      "|---|---|---|---|",
      "| PyTorch `sum().backward()` | LS | 12.0 ms (1.20x) | 150 ms (1.22x) |",
      "| TorchJD Nash-MTL | Nash-MTL | 36.0 ms (2.00x / 2.25x) | - |",
      "",
  ]
  # The command rebuilt from the sizes and settings, without the flags that equal train_step.py's defaults.
  assert page.train_step_command(TINY, page.RESULTS / "train_step_tiny_cpu.json") == (
      "OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --batch 64 --width 128 --ks 2 10 --repeats 3"
      " --lazy-every 50 --jacobian-batch-size 1 --peers --breakdown-ks"
      " --out benchmarks/results/train_step_tiny_cpu.json")
  assert page.train_step_command(dict(TINY, command="python x.py"), page.RESULTS / "x.json") == "python x.py"


def test_every_results_file_needs_a_section(tmp_path, monkeypatch):
  results, docs = tmp_path / "results", tmp_path / "docs"
  results.mkdir()
  docs.mkdir()
  monkeypatch.setattr(page, "RESULTS", results)
  monkeypatch.setattr(page, "DOC_RESULTS", docs)
  (results / "train_step_gpu.json").write_text(json.dumps(TINY))
  (results / "train_step_gpu_k2.json").write_text(json.dumps(TINY))  # a per-K part of the merged file
  assert [(path.name, renderer) for path, _, renderer in page.unclaimed(set())] == [
      ("train_step_gpu.json", page.train_step_section)]
  (results / "ab_test_cpu.json").write_text(json.dumps({"benchmark": "allocator_ab_test"}))
  with pytest.raises(ValueError, match="ab_test_cpu.json: no section"):
    page.unclaimed(set())
