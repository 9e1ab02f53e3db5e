"""The QM9 benchmark (benchmarks/qm9.py) and its data (benchmarks/qm9_data.py).

The data tests read ``tests/data/qm9_subset`` (300 molecules in qm9pack's CSV
format, see ``tests/data/build_qm9_subset.py``): pandas parses it, RDKit builds
the node and bond features (those tests are skipped without it).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scripts

qm9_data = scripts.load("benchmarks", "qm9_data")
qm9 = scripts.load("benchmarks", "qm9")

SUBSET = pathlib.Path(__file__).parent / "data" / "qm9_subset"
KCAL_PER_HARTREE = 627.509474


def _rdkit():
  pytest.importorskip("rdkit")


def test_methane_targets_in_the_official_units():
  pytest.importorskip("pandas")
  rows = qm9_data.read_raw(SUBSET)
  methane = rows[rows["Index"] == 1]
  assert methane["SMILES"].item() == "C"
  t = dict(zip(qm9_data.TARGETS, qm9_data.targets_of(methane)[0]))
  mev = 1000 * 27.211386
  np.testing.assert_allclose([t["mu"], t["alpha"], t["r2"], t["Cv"]], [0.0, 13.21, 35.3641, 6.469])
  np.testing.assert_allclose([t["homo"], t["lumo"], t["zpve"]], [-0.3877 * mev, 0.1171 * mev, 0.044749 * mev])
  # U0 - E(C) - 4 E(H) in hartree, as meV; against QM9's published atomisation energy of methane
  # (DeepChem's gdb9.sdf.csv u0_atom, -395.999595 kcal/mol, which PyG converts to -17.172 eV).
  np.testing.assert_allclose(t["U0"], (-40.47893 + 37.846772 + 4 * 0.500273) * mev, rtol=1e-12)
  assert abs(t["U0"] - (-395.999595 / KCAL_PER_HARTREE * mev)) < 0.5
  assert t["U0"] == pytest.approx(-17172.2, abs=0.1)
  for name, total, refs in (("U", -40.476062, (-37.845355, -0.498857)), ("H", -40.475117, (-37.844411, -0.497912)),
                            ("G", -40.498597, (-37.861317, -0.510927))):
    np.testing.assert_allclose(t[name], (total - refs[0] - 4 * refs[1]) * mev, rtol=1e-12)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
  _rdkit()
  return qm9_data.load(SUBSET, tmp_path_factory.mktemp("qm9_cache"), progress=False)


def test_features_of_the_subset(subset):
  n = 300
  assert subset["targets"].shape == (n, 11) and subset["atoms"].shape == (n, 29, 4)
  assert subset["bonds"].shape == subset["bonds_kekule"].shape == (n, 29, 29)
  assert subset["positions"].shape == (n, 29, 3)
  counts = qm9_data.match_counts(subset)
  assert counts["smiles"] >= n - 2 and counts["connectivity"] == 0  # 23 and 52466 take rdDetermineBonds
  np.testing.assert_array_equal(subset["bonds"], np.swapaxes(subset["bonds"], 1, 2))
  x = qm9_data.node_features(subset["atoms"])
  e = qm9_data.edge_features(subset["bonds"], subset["positions"])
  assert x.shape == (n, 29, 11) and e.shape == (n, 29, 29, 5)
  for i, m in enumerate(subset["num_atoms"]):
    assert np.all(x[i, m:] == 0) and np.all(subset["bonds"][i, m:] == 0)
    heavy = subset["atoms"][i, :m, 0] > 1
    # Every hydrogen has exactly one bond, and the hydrogen counts match the bonds.
    assert np.all((subset["bonds"][i, :m, :m] > 0).sum(axis=1)[~heavy] == 1)
    h_neighbours = ((subset["bonds"][i, :m, :m] > 0) & ~heavy[None, :]).sum(axis=1)
    np.testing.assert_array_equal(subset["atoms"][i, :m, 3], h_neighbours)
  methane = int(np.flatnonzero(subset["index"] == 1)[0])
  np.testing.assert_array_equal(x[methane, 0], [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4])  # C: sp3, 4 hydrogens
  np.testing.assert_array_equal(x[methane, 1], [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
  d = e[methane, 0, 1]
  np.testing.assert_array_equal(d[:4], [1, 0, 0, 0])
  assert 1.08 < d[4] < 1.10  # a C-H bond, Angstrom
  assert (subset["bonds"] == 4).any() and not (subset["bonds_kekule"] == 4).any()
  pyg = qm9_data.node_features(subset["atoms"], pyg_sdf=True)
  assert np.all(pyg[..., 6:10] == 0) and np.array_equal(pyg[..., [0, 1, 2, 3, 4, 5, 10]], x[..., [0, 1, 2, 3, 4, 5, 10]])


def test_split_is_a_seeded_permutation_with_disjoint_parts():
  parts = qm9_data.split(130_831, seed=3)
  assert [len(parts[p]) for p in ("test", "val", "train")] == [10_000, 10_000, 110_831]
  joined = np.concatenate([parts["test"], parts["val"], parts["train"]])
  np.testing.assert_array_equal(np.sort(joined), np.arange(130_831))
  again, other = qm9_data.split(130_831, seed=3), qm9_data.split(130_831, seed=4)
  assert all(np.array_equal(parts[p], again[p]) for p in parts)
  assert not np.array_equal(parts["test"], other["test"])
  reduced = qm9_data.split(130_831, seed=3, train_size=500, val_size=200, test_size=100)
  for name, size in (("train", 500), ("val", 200), ("test", 100)):
    np.testing.assert_array_equal(reduced[name], parts[name][:size])  # prefixes of the same parts
  small = qm9_data.split(300, seed=0)
  assert [len(small[p]) for p in ("test", "val", "train")] == [30, 30, 240]
  with pytest.raises(ValueError, match="exceeds"):
    qm9_data.split(300, seed=0, test_size=31)


def _random_graph(rng, batch, num_atoms):
  n = qm9_data.MAX_ATOMS
  bonds = rng.integers(0, 5, (batch, n, n))
  bonds = np.triu(bonds, 1) + np.swapaxes(np.triu(bonds, 1), 1, 2)
  atoms = np.stack([rng.choice([1, 6, 7, 8, 9], (batch, n)), rng.integers(0, 2, (batch, n)),
                    rng.integers(0, 4, (batch, n)), rng.integers(0, 4, (batch, n))], -1)
  return {"atoms": jnp.asarray(atoms, jnp.int8), "bonds": jnp.asarray(bonds, jnp.int8),
          "positions": jnp.asarray(rng.normal(size=(batch, n, 3)) * 1.5, jnp.float32),
          "num_atoms": jnp.asarray(num_atoms, jnp.int8)}


def test_factored_edge_network_equals_the_per_edge_matrices():
  rng = np.random.default_rng(0)
  dim, batch = 8, 3
  graph = _random_graph(rng, batch, [29, 12, 5])
  params = qm9.init_params(jax.random.key(1), dim)
  mask, pair, degree, nodes, edges = qm9.graph_inputs(graph)
  conv = params["shared"]["conv"]
  a = jax.nn.relu(qm9.dense(conv["edge1"], edges)) * pair[..., None].astype(jnp.float32)
  x = jnp.asarray(rng.normal(size=(batch, 29, dim)), jnp.float32)
  # The definition: W(e_ij) = reshape(Linear2(a_ij), (dim, dim)) for every edge, message x_j^T W(e_ij),
  # mean over the n - 1 other atoms, plus the root weight and bias.
  w = np.asarray(qm9.dense(conv["edge2"], a)).reshape(batch, 29, 29, dim, dim)
  expected = np.zeros((batch, 29, dim))
  for b in range(batch):
    m = int(graph["num_atoms"][b])
    for i in range(m):
      total = sum(np.asarray(x[b, j]) @ w[b, i, j] for j in range(m) if j != i)
      expected[b, i] = total / (m - 1) + np.asarray(x[b, i]) @ np.asarray(conv["root"]) + np.asarray(conv["bias"])
  for form in qm9.EDGE_NETWORKS:
    out = np.asarray(qm9.nnconv(conv, x, a, pair, degree, form))
    for b in range(batch):
      m = int(graph["num_atoms"][b])
      np.testing.assert_allclose(out[b, :m], expected[b, :m], rtol=2e-4, atol=2e-5, err_msg=form)
  outputs = [qm9.encode(params["shared"], graph, edge_network=form) for form in qm9.EDGE_NETWORKS]
  for out in outputs[1:]:
    np.testing.assert_allclose(out, outputs[0], rtol=2e-4, atol=2e-5)


def test_padding_and_batch_neighbours_do_not_change_a_molecule():
  rng = np.random.default_rng(2)
  params = qm9.init_params(jax.random.key(0), 16)
  graph = _random_graph(rng, 4, [9, 29, 3, 0])  # the last molecule is masked padding
  alone = jax.tree.map(lambda a: a[:1], graph)
  # Garbage in the padded atom slots of the molecule alone: it must not matter.
  noisy = dict(alone, atoms=alone["atoms"].at[:, 9:].set(7), positions=alone["positions"].at[:, 9:].set(50.0),
               bonds=alone["bonds"].at[:, :, 9:].set(2).at[:, 9:, :].set(3))
  batch_out = qm9.predict(params, graph)
  assert np.all(np.isfinite(np.asarray(batch_out)))
  for single in (alone, noisy):
    np.testing.assert_allclose(qm9.predict(params, single)[0], batch_out[0], rtol=1e-5, atol=1e-6)
  # Masked molecules carry no weight in the losses.
  targets = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  weighted = dict(graph, targets=targets, weight=jnp.asarray([1.0, 1.0, 1.0, 0.0]))
  first3 = dict(jax.tree.map(lambda a: a[:3], graph), targets=targets[:3], weight=jnp.ones(3))
  np.testing.assert_allclose(qm9.task_losses(params, weighted), qm9.task_losses(params, first3), rtol=1e-5)


def test_cache_is_rebuilt_when_the_source_changes(tmp_path):
  _rdkit()
  import pandas as pd

  source, cache = tmp_path / "source", tmp_path / "cache"
  source.mkdir()
  rows = pd.read_csv(SUBSET / "qm9_part1.csv")
  rows.iloc[:12].to_csv(source / "qm9_part1.csv", index=False)
  first = qm9_data.load(source, cache, progress=False)
  assert first["built"] and len(first["targets"]) == 12
  again = qm9_data.load(source, cache, progress=False)
  assert not again["built"] and again["cache_path"] == first["cache_path"]
  np.testing.assert_array_equal(again["bonds"], first["bonds"])
  rows.iloc[:15].to_csv(source / "qm9_part1.csv", index=False)  # a changed source
  changed = qm9_data.load(source, cache, progress=False)
  assert changed["built"] and changed["cache_path"] != first["cache_path"] and len(changed["targets"]) == 15


def test_plateau_schedule_follows_pytorch():
  schedule = qm9.ReduceLROnPlateau(1e-3)
  lrs = [schedule.step(v) for v in [10, 9, 9, 9, 9, 9, 9, 9]]
  assert lrs[:7] == [1e-3] * 7 and lrs[7] == pytest.approx(7e-4)  # the 6th epoch without improvement
  schedule = qm9.ReduceLROnPlateau(1.2e-5)
  assert [schedule.step(1.0) for _ in range(8)][-1] == pytest.approx(1e-5)  # min_lr


@pytest.mark.slow
def test_smoke_run_writes_the_pinned_keys(tmp_path):
  _rdkit()
  out = tmp_path / "out"
  qm9.main(["--methods", "linear_scalarization", "dwa", "stl", "--seeds", "0", "--epochs", "2",
            "--train-size", "40", "--val-size", "20", "--test-size", "20", "--dim", "8", "--batch", "20",
            "--eval-batch", "20", "--data-dir", str(SUBSET), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--no-plots", "--no-progress"])
  result = json.loads((out / "qm9.json").read_text())
  protocol = result["protocol"]
  assert (protocol["train_size"], protocol["val_size"], protocol["test_size"]) == (40, 20, 20)
  assert (protocol["epochs"], protocol["dim"], protocol["batch"], protocol["lr"]) == (2, 8, 20, 1e-3)
  assert len(protocol["target_std"]) == 11 and all(s > 0 for s in protocol["target_std"])
  assert set(result["methods"]) == {"linear_scalarization", "dwa", "stl"}
  for name, entry in result["methods"].items():
    for key in ("mae", "delta_m", "delta_m_own", "seconds_per_step", "per_seed"):
      assert key in entry, (name, key)
    assert len(entry["mae"]) == 11 and np.all(np.isfinite(entry["mae"]))
    run = entry["per_seed"][0]
    assert len(run["val_delta_m"]) == 2 and len(run["weights"]["values"][0]) == 11
    assert "gram_condition" in run
    if name != "stl":
      assert "mr" in entry and run["nonfinite_count"] == [0, 0]
  assert result["methods"]["stl"]["delta_m_own"] == pytest.approx(0.0)
  assert (out / "qm9.md").exists()


def test_rank_correlation_is_spearmans():
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=10), rng.normal(size=10)
  assert qm9.rank_correlation(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
  assert qm9.rank_correlation([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
  assert qm9.rank_correlation([1, 2, 2, 4], [4, 3, 3, 1]) == pytest.approx(-1.0)  # ties share their rank


def _part(methods, seeds, **protocol):
  """A ``qm9.json`` as a run writes it, made up: ``methods`` maps a name to its MAEs over the paper's STL."""
  base = np.asarray(qm9.BASE)
  protocol = {"train_size": 4800, "val_size": 1000, "test_size": 2000, "epochs": 3, "dim": 16, "batch": 120,
              "lr": 1e-3, "seeds": list(seeds), "paths": {name: "lazy" for name in methods}, **protocol}
  runs = {name: {"per_seed": [{"seed": seed, "mae": (base * (scale + seed / 1000)).tolist(),
                               "delta_m": qm9.delta_m(base * (scale + seed / 1000), base), "seconds_per_step": 0.1 * scale}
                              for seed in seeds]} for name, scale in methods.items()}
  return {"command": f"run {sorted(methods)} {list(seeds)}", "protocol": protocol, "methods": runs, "wall_s": 10.0}


def test_merge_joins_runs_split_by_method_and_seed(tmp_path):
  # Made-up MAEs in the paper's Delta_m% order: the comparison's rank correlations are 1 on Delta_m%.
  scales = {name: 1 + delta / 100 for name, (delta, _) in qm9.PAPER_TABLE_6.items()}
  parts = [_part({**scales, "stl": 1.0}, [0]), _part({"nash_mtl": scales["nash_mtl"], "mgda": scales["mgda"]}, [1, 2])]
  for i, part in enumerate(parts):
    (tmp_path / f"p{i}").mkdir()
    (tmp_path / f"p{i}" / "qm9.json").write_text(json.dumps(part))
  step_times = {"benchmark": "qm9_step_times", "command": "time", "protocol": {"dim": 16, "batch": 120},
                "timings": {"linear_scalarization": {"seconds_per_step": 0.25, "repeats": 3},
                            "nash_mtl_every_50": {"seconds_per_step": 0.3, "repeats": 3}}}
  (tmp_path / "steps.json").write_text(json.dumps(step_times))
  merged = qm9.merge([tmp_path / "p0", tmp_path / "steps.json", tmp_path / "p1" / "qm9.json"])
  methods = merged["methods"]
  assert merged["protocol"]["seeds"] == [0, 1, 2] and merged["wall_s"] == 20.0
  assert [r["seed"] for r in methods["nash_mtl"]["per_seed"]] == [0, 1, 2]
  assert len(methods["linear_scalarization"]["per_seed"]) == 1
  np.testing.assert_allclose(methods["nash_mtl"]["mae"], qm9.BASE * (scales["nash_mtl"] + 0.001))  # seeds 0-2
  assert methods["stl"]["delta_m_own"] == pytest.approx(0.0)
  assert methods["linear_scalarization"]["delta_m_own"] == pytest.approx(177.6)
  comparison = merged["paper_comparison"]
  assert set(comparison["methods"]) == set(qm9.PAPER_TABLE_6)
  assert comparison["spearman_delta_m"] == pytest.approx(1.0)
  assert comparison["methods"]["nash_mtl"]["delta_m_paper"] == 62.0
  text = qm9.markdown(merged)
  assert "**Reduced protocol**: train_size 4800 (paper 110831)" in text and "Spearman rank correlation" in text
  assert "| Nash-MTL | 62.1 | 62.0 |" in text
  assert "| Nash-MTL-50 | 0.300 | 1.2 | 1.3 |" in text  # the step times' file, against the paper's Table 7
  with pytest.raises(ValueError, match="a seed that an earlier file already holds"):
    qm9.merge([tmp_path / "p0", tmp_path / "p0"])
  (tmp_path / "p2.json").write_text(json.dumps(_part({"dwa": 2.0}, [1], dim=32)))
  with pytest.raises(ValueError, match="another protocol"):
    qm9.merge([tmp_path / "p0", tmp_path / "p2.json"])
