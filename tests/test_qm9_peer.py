"""The PyTorch Geometric peer of the QM9 MPNN (benchmarks/qm9_peer.py) computes what ours computes.

Our ``qm9.init_params`` weights are loaded into the nash-mtl ``Net`` (PyG's
``NNConv``, ``GRU``, ``Set2Set``) and both models run on the same molecules of
``tests/data/qm9_subset`` (ours padded to 29 atoms, PyG's on the real atoms):
predictions, per-task losses and the gradient of their sum must agree.
"""

import pathlib

import jax
import numpy as np
import pytest

import scripts

SUBSET = pathlib.Path(__file__).parent / "data" / "qm9_subset"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_pyg_model_on_our_weights_matches_ours(tmp_path):
  pytest.importorskip("pandas")
  pytest.importorskip("rdkit")
  torch = pytest.importorskip("torch")
  pytest.importorskip("torch_geometric")
  qm9_peer = scripts.load("benchmarks", "qm9_peer")
  raw = qm9_peer.qm9_data.load(SUBSET, tmp_path, progress=False)
  graph = qm9_peer.real_batch(raw, 6)
  params = qm9_peer.qm9.init_params(jax.random.key(0), 8)

  net = qm9_peer.torch_net(torch, params)
  round_trip = qm9_peer.as_tree(net, lambda t: t)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(round_trip), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), theirs)
  data = qm9_peer.pyg_batch(torch, graph)
  sizes = qm9_peer.sizes(graph)
  assert data.num_nodes == sizes["pyg_atoms"] and data.num_edges == sizes["pyg_edges"]
  assert data.edge_attr.shape == (sizes["pyg_edges"], qm9_peer.qm9_data.NUM_EDGE_FEATURES)

  result = qm9_peer.fidelity(torch, params, graph)
  assert result["weights_round_trip_max_abs"] == 0.0
  assert result["predictions_max_rel"] < 1e-4, result
  assert result["losses_max_rel"] < 1e-4, result
  assert result["grad_of_sum_max_rel"] < 1e-4, result
  assert result["match"]
