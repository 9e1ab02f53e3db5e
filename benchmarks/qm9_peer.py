"""The QM9 MPNN of ``qm9.py`` against PyTorch Geometric + TorchJD: fidelity, then one training step's time.

The peer is the Nash-MTL paper's model as its official code builds it
(AvivNavon/nash-mtl ``experiments/quantum_chemistry/models.py``, after PyG's
``examples/qm9_nn_conv.py``): ``lin0``, ``NNConv(dim, dim, Sequential(Linear(5,
128), ReLU(), Linear(128, dim * dim)), aggr="mean")``, ``GRU(dim, dim)`` for 3
rounds, ``Set2Set(dim, processing_steps=3)``, ``lin1``, 11 ``Linear(dim, 1)``
heads. Its input is built as that code builds it: a ``Data`` per molecule with
the bonds (both directions, the 4-way bond one-hot) and the positions, then the
example's ``Complete`` transform (every ordered pair of distinct atoms, bond
features zero where there is no bond) and PyG's ``Distance(norm=False)``, then
``Batch.from_data_list``; node features from ``qm9_data.node_features`` on the
real atoms only (PyG has no padding; ours pads every molecule to 29 atoms).

For each ``--dims`` (batch ``--batch``, the first molecules of the training
part of ``qm9.py``'s split, standardised as ``qm9.prepare`` does):

1. **fidelity**: our ``qm9.init_params`` weights are copied into the PyG model
   (``(in, out)`` to PyTorch's ``(out, in)``; the edge network's second layer
   as is, since both read its output as ``view(-1, in, out)``; the GRU's
   ``r, z, n`` and the LSTM's ``i, f, g, o`` gate blocks are PyTorch's order on
   both sides; the heads' ``Linear(dim, 11)`` split into 11 ``Linear(dim, 1)``),
   and the predictions, the 11 per-task MSEs and the gradient of their sum
   with respect to every parameter are compared (``*_max_rel``: the largest
   absolute difference over the largest magnitude, per task for the losses
   and per parameter array for the gradient).
2. **timing**: one full training step on the same weights and batch, the
   variants interleaved (``common.time_interleaved``: round-robin, warmup
   rounds excluded, median), params and optimizer states carried over from
   call to call:

   - ``ours_nash_mtl``: ``qm9.py``'s Nash-MTL step, jitted:
     ``optax_mtl.value_and_jacobian`` (11 backward passes, ``batch_size=1`` on
     a CPU as ``qm9.py``'s default) + ``optax_mtl.nash_mtl(11, shared=...)`` +
     Adam (lr 1e-3) + ``optax.apply_updates``;
   - ``peer_nash_mtl``: PyG forward, TorchJD 0.18 ``autojac.mtl_backward(losses,
     features=<lin1 output>, shared_params=..., tasks_params=<the heads>)``
     then ``autojac.jac_to_grad(shared params, NashMTL(n_tasks=11))``, then
     ``torch.optim.Adam(lr=1e-3).step()``; ``mtl_backward``'s default
     ``parallel_chunk_size=None`` backpropagates the 11 rows in one
     ``torch.vmap`` (which has no batching rule for the GRU's and LSTM's
     backward, ``aten::mkldnn_rnn_layer_backward``, and loops there);
     ``peer_nash_mtl_chunk1``: the same with ``parallel_chunk_size=1``;
   - ``ours_linear_scalarization``: ``optax_mtl.task_gradients`` (one backward
     pass) + ``optax_mtl.linear_scalarization(11)`` + Adam;
   - ``peer_linear_scalarization``: ``sum(losses).backward()`` + Adam.

   PyTorch runs on ``torch.set_num_threads(--torch-threads)`` threads
   (default: the core count, which is also the size of XLA:CPU's pool).

  # the committed CPU result (2 cores; PASSIVE: PyTorch's OpenMP threads sleep instead of spinning
  # on cores that another process holds)
  OMP_WAIT_POLICY=PASSIVE python benchmarks/qm9_peer.py --dims 16
  OMP_WAIT_POLICY=PASSIVE python benchmarks/qm9_peer.py --dims 64 --repeats 0 --merge   # fidelity only
  OMP_WAIT_POLICY=PASSIVE python benchmarks/qm9_peer.py --dims 64 --merge   # dim 64 timed (long on a CPU)
  python benchmarks/qm9_peer.py --dims 8 --batch 6 --repeats 2 --out /tmp/qm9_peer.json   # smoke

Writes ``benchmarks/results/qm9_peer_<platform>.json`` (or ``--out``);
``--merge`` keeps the rows of other dims already in that file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import qm9  # noqa: E402
import qm9_data  # noqa: E402

K = qm9.K
LR = 1e-3
VERSIONS = ("jax", "jaxlib", "optax", "torch", "torchjd", "torch_geometric", "cvxpy", "ecos", "numpy")
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- data


def load_raw(data_dir=None, cache_dir=None) -> dict:
  """``qm9_data.load``; without a source folder (qm9pack missing), the newest ``qm9_*.npz`` of the cache."""
  source = data_dir or qm9_data.default_source_dir()
  if source is not None:
    return qm9_data.load(source, cache_dir, progress=False)
  cache = pathlib.Path(cache_dir) if cache_dir else qm9_data.default_cache_dir()
  files = sorted(cache.glob("qm9_*.npz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no QM9 source (pass --data-dir) and no qm9_*.npz in {cache}")
  with np.load(files[-1]) as archive:
    data = {name: archive[name] for name in archive.files}
  data["cache_path"], data["built"] = str(files[-1]), False
  return data


def real_batch(raw: dict, batch: int, split_seed: int = 0) -> dict:
  """The first ``batch`` molecules of ``qm9.py``'s training part, as ``qm9.prepare`` gives them (29 atoms)."""
  args = argparse.Namespace(split_seed=split_seed, train_size=None, val_size=1, test_size=1,
                            pyg_sdf_features=False, eval_batch=1)
  data = qm9.prepare(raw, args)
  return qm9.take(data["train"], jnp.arange(batch))


def complete(torch, data):
  """The ``Complete`` transform of the nash-mtl code and PyG's example: every ordered pair, no self-loop."""
  from torch_geometric.utils import remove_self_loops

  n = data.num_nodes
  row = torch.arange(n, dtype=torch.long).view(-1, 1).repeat(1, n).view(-1)
  col = torch.arange(n, dtype=torch.long).repeat(n)
  edge_index = torch.stack([row, col], dim=0)
  idx = data.edge_index[0] * n + data.edge_index[1]
  edge_attr = data.edge_attr.new_zeros((n * n, data.edge_attr.size(1)))
  edge_attr[idx] = data.edge_attr
  data.edge_index, data.edge_attr = remove_self_loops(edge_index, edge_attr)
  return data


def pyg_batch(torch, graph: dict):
  """The batch as PyG sees it: real atoms only, ``Complete`` + ``Distance(norm=False)``, ``Batch.from_data_list``."""
  from torch_geometric.data import Batch, Data
  from torch_geometric.transforms import Distance

  distance = Distance(norm=False)
  g = {name: np.asarray(value) for name, value in graph.items()}
  items = []
  for b in range(len(g["num_atoms"])):
    n = int(g["num_atoms"][b])
    bonds = g["bonds"][b, :n, :n]
    src, dst = np.nonzero(bonds)
    onehot = (bonds[src, dst][:, None] == np.arange(1, 5)[None, :]).astype(np.float32)
    data = Data(x=torch.from_numpy(qm9_data.node_features(g["atoms"][b, :n]).astype(np.float32)),
                edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)),
                edge_attr=torch.from_numpy(onehot), pos=torch.from_numpy(g["positions"][b, :n].astype(np.float32)),
                y=torch.from_numpy(g["targets"][b][None].astype(np.float32)))
    items.append(distance(complete(torch, data)))
  return Batch.from_data_list(items)


def sizes(graph: dict) -> dict:
  num_atoms = np.asarray(graph["num_atoms"]).astype(np.int64)
  batch, n = np.asarray(graph["atoms"]).shape[:2]
  return {"batch": int(batch), "ours_padded_atoms_per_molecule": int(n), "ours_atom_slots": int(batch * n),
          "ours_ordered_pairs_computed": int(batch * n * n),
          "pyg_atoms": int(num_atoms.sum()), "pyg_edges": int(np.sum(num_atoms * (num_atoms - 1))),
          "mean_atoms_per_molecule": float(num_atoms.mean())}


# ----------------------------------------------------------------------------- the PyG model


def torch_net(torch, params):
  """The nash-mtl ``Net`` (PyG), holding exactly ``params`` (our layout, ``qm9.init_params``)."""
  import torch.nn.functional as F
  from torch.nn import GRU, Linear, ReLU, Sequential
  from torch_geometric.nn import NNConv, Set2Set

  dim = int(params["shared"]["lin0"]["w"].shape[1])
  num_heads = int(params["heads"]["w"].shape[1])

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin0 = Linear(qm9_data.NUM_NODE_FEATURES, dim)
      nn = Sequential(Linear(qm9_data.NUM_EDGE_FEATURES, qm9.EDGE_HIDDEN), ReLU(),
                      Linear(qm9.EDGE_HIDDEN, dim * dim))
      self.conv = NNConv(dim, dim, nn, aggr="mean")
      self.gru = GRU(dim, dim)
      self.set2set = Set2Set(dim, processing_steps=qm9.SET2SET_STEPS)
      self.lin1 = Linear(2 * dim, dim)
      self.task_specific = torch.nn.ModuleList([Linear(dim, 1) for _ in range(num_heads)])

    def forward(self, data):
      out = F.relu(self.lin0(data.x))
      h = out.unsqueeze(0)
      for _ in range(qm9.ROUNDS):
        m = F.relu(self.conv(out, data.edge_index, data.edge_attr))
        out, h = self.gru(m.unsqueeze(0), h)
        out = out.squeeze(0)
      out = self.set2set(out, data.batch)
      features = F.relu(self.lin1(out))
      # The heads' (B, 1) outputs kept apart: nash-mtl's Net returns torch.cat of them, one node that
      # all 11 losses share, which TorchJD's mtl_backward (retain_graph=False, its default) cannot
      # backpropagate through 11 times ("Trying to backward through the graph a second time").
      return [head(features) for head in self.task_specific], features

    def shared_parameters(self):
      return [p for name, p in self.named_parameters() if not name.startswith("task_specific.")]

  net = Net()
  load_weights(torch, net, params)
  return net


def _torch_layout(net):
  """``(tensor, (path in our tree), transposed)`` for every PyTorch parameter but the heads."""
  rows = []

  def linear(module, path):
    rows.extend([(module.weight, (*path, "w"), True), (module.bias, (*path, "b"), False)])

  def recurrent(module, path):
    for suffix in ("ih", "hh"):
      rows.append((getattr(module, f"weight_{suffix}_l0"), (*path, f"w_{suffix}"), True))
      rows.append((getattr(module, f"bias_{suffix}_l0"), (*path, f"b_{suffix}"), False))

  linear(net.lin0, ("shared", "lin0"))
  linear(net.conv.nn[0], ("shared", "conv", "edge1"))
  # Linear(128, dim * dim): its output row q = in * dim + out, read as view(-1, in, out) by NNConv
  # and as reshape(128, in, out) by qm9.nnconv: the same matrix, transposed only as every Linear.
  linear(net.conv.nn[2], ("shared", "conv", "edge2"))
  rows.append((net.conv.lin.weight, ("shared", "conv", "root"), True))  # root weight, x @ root
  rows.append((net.conv.bias, ("shared", "conv", "bias"), False))
  recurrent(net.gru, ("shared", "gru"))  # gate blocks r, z, n on both sides
  recurrent(net.set2set.lstm, ("shared", "set2set"))  # gate blocks i, f, g, o on both sides
  linear(net.lin1, ("shared", "lin1"))
  return rows


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def load_weights(torch, net, params) -> None:
  def copy(tensor, value):
    value = torch.from_numpy(np.array(value, np.float32))
    if tuple(value.shape) != tuple(tensor.shape):  # copy_ would broadcast silently
      raise ValueError(f"shape {tuple(value.shape)} for a parameter of shape {tuple(tensor.shape)}")
    tensor.copy_(value)

  with torch.no_grad():
    for tensor, path, transposed in _torch_layout(net):
      value = np.asarray(_get(params, path))
      copy(tensor, value.T if transposed else value)
    w, b = np.asarray(params["heads"]["w"]), np.asarray(params["heads"]["b"])
    for i, head in enumerate(net.task_specific):
      copy(head.weight, w[:, i][None, :])
      copy(head.bias, b[i:i + 1])
  if set(map(id, net.parameters())) != {id(t) for t, _, _ in _torch_layout(net)} | {
      id(p) for head in net.task_specific for p in head.parameters()}:
    raise ValueError("a parameter of the PyG model is not covered by the layout")


def as_tree(net, read) -> dict:
  """``read(tensor)`` of every parameter (its value, its ``.grad``) in our layout, as NumPy arrays."""
  tree = {"shared": {"lin0": {}, "conv": {"edge1": {}, "edge2": {}}, "gru": {}, "set2set": {}, "lin1": {}}}
  for tensor, path, transposed in _torch_layout(net):
    value = read(tensor).detach().numpy()
    parent = _get(tree, path[:-1])
    parent[path[-1]] = value.T if transposed else value
  tree["heads"] = {"w": np.concatenate([read(h.weight).detach().numpy() for h in net.task_specific], 0).T,
                   "b": np.concatenate([read(h.bias).detach().numpy() for h in net.task_specific])}
  return tree


def torch_losses(torch, outputs, y):
  """The nash-mtl trainer's per-task losses, ``F.mse_loss(logits[:, i], y[:, i])``, from each head's output."""
  return [torch.nn.functional.mse_loss(out[:, 0], y[:, i]) for i, out in enumerate(outputs)]


# ----------------------------------------------------------------------------- fidelity


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def fidelity(torch, params, graph) -> dict:
  """Our predictions, per-task losses and gradient of their sum against the PyG model's on the same weights."""
  options = {"pyg_sdf": False, "edge_network": "factored"}

  def loss_sum(p, g):
    losses = qm9.task_losses(p, g, **options)
    return jnp.sum(losses), (qm9.predict(p, g, **options), losses)

  (_, (ours_pred, ours_losses)), ours_grad = jax.device_get(
      jax.jit(jax.value_and_grad(loss_sum, has_aux=True))(params, graph))
  ours_pred, ours_losses = np.asarray(ours_pred), np.asarray(ours_losses)

  net = torch_net(torch, params)
  round_trip = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(as_tree(net, lambda t: t)), jax.tree.leaves(params)))
  data = pyg_batch(torch, graph)
  outputs, _ = net(data)
  losses = torch_losses(torch, outputs, data.y)
  torch.stack(losses).sum().backward()
  peer_pred = torch.cat(outputs, dim=1).detach().numpy()
  peer_losses = np.array([float(l.detach()) for l in losses])
  peer_grad = as_tree(net, lambda t: t.grad)

  grad_rel = jax.tree.map(_max_rel, ours_grad, peer_grad)
  worst_leaf = max(((jax.tree_util.keystr(path), value) for path, value in
                    jax.tree_util.tree_leaves_with_path(grad_rel)), key=lambda item: item[1])
  loss_rel = np.abs(ours_losses - peer_losses) / np.abs(ours_losses)
  out = {
      "weights_round_trip_max_abs": round_trip,
      "predictions_max_abs_diff": float(np.max(np.abs(ours_pred - peer_pred))),
      "predictions_max_rel": _max_rel(ours_pred, peer_pred),
      "losses_max_abs_diff": float(np.max(np.abs(ours_losses - peer_losses))),
      "losses_max_rel": float(np.max(loss_rel)),
      "losses_ours": ours_losses.tolist(), "losses_pyg": peer_losses.tolist(),
      "grad_of_sum_max_rel": float(worst_leaf[1]), "grad_of_sum_worst_leaf": worst_leaf[0],
      "grad_of_sum_max_rel_per_leaf": {jax.tree_util.keystr(p): float(v)
                                       for p, v in jax.tree_util.tree_leaves_with_path(grad_rel)},
      "tolerance": TOLERANCE,
  }
  out["match"] = bool(max(out["predictions_max_rel"], out["losses_max_rel"], out["grad_of_sum_max_rel"]) < TOLERANCE)
  return out


# ----------------------------------------------------------------------------- the steps


def our_calls(params, graph, jacobian_batch_size) -> dict:
  """``qm9.py``'s training step (``Runner``'s ``mtl_step``) for Nash-MTL and LS, jitted, state carried over."""
  losses_of = functools.partial(qm9.task_losses, pyg_sdf=False, edge_network="factored")
  grad_kwargs = {"batch_size": jacobian_batch_size}
  calls = {}
  for method in ("nash_mtl", "linear_scalarization"):
    factory, path = qm9.METHODS[method]
    tx = optax.chain(factory(K, 0), optax.inject_hyperparams(optax.adam)(learning_rate=LR))

    def step(params, opt_state, graph, tx=tx, path=path):
      if path == "lazy":
        grads = optax_mtl.task_gradients(losses_of, **grad_kwargs)(params, graph)
        losses = grads.losses
      else:
        losses, grads = optax_mtl.value_and_jacobian(losses_of, **grad_kwargs)(params, graph)
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
      return optax.apply_updates(params, updates), opt_state, losses

    jitted = jax.jit(step)
    state = {"params": params, "opt_state": tx.init(params)}

    def call(jitted=jitted, state=state):
      state["params"], state["opt_state"], losses = jitted(state["params"], state["opt_state"], graph)
      return losses

    calls[f"ours_{method}"] = call
  return calls


def peer_calls(torch, params, data, chunk_sizes=(None,)) -> dict:
  """The PyG model with TorchJD's NashMTL, and with ``sum(losses).backward()``, each with its own Adam.

  One NashMTL step per ``mtl_backward`` ``parallel_chunk_size`` in ``chunk_sizes`` (``None``, TorchJD's
  default: the 11 rows of the Jacobian in one ``torch.vmap``'d backward pass, ``peer_nash_mtl``;
  ``c``: ``c`` rows at a time, ``peer_nash_mtl_chunk<c>``).
  """
  from torchjd import aggregation, autojac

  def make(body):
    net = torch_net(torch, params)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)

    def call():
      outputs, features = net(data)
      losses = torch_losses(torch, outputs, data.y)
      body(net, losses, features)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return None

    return call

  def nash(chunk_size):
    aggregator = aggregation.NashMTL(n_tasks=K)  # stateful (warm start): one per step

    def body(net, losses, features):
      shared = net.shared_parameters()
      autojac.mtl_backward(losses, features=features, shared_params=shared,
                           tasks_params=[list(head.parameters()) for head in net.task_specific],
                           parallel_chunk_size=chunk_size)
      autojac.jac_to_grad(shared, aggregator)

    return make(body)

  calls = {("peer_nash_mtl" if c is None else f"peer_nash_mtl_chunk{c}"): nash(c) for c in chunk_sizes}
  calls["peer_linear_scalarization"] = make(lambda net, losses, features: torch.stack(losses).sum().backward())
  return calls


# ----------------------------------------------------------------------------- results


def markdown(result: dict) -> str:
  """The table of medians, ratios and fidelity of a ``qm9_peer`` result (one row per dim)."""
  head = ["dim", "batch (atoms: ours / PyG)", "ours Nash-MTL", "PyG + TorchJD NashMTL", "ratio",
          "same, chunk 1", "ratio", "ours LS", "PyG LS", "ratio",
          "fidelity: max rel. diff. predictions / losses / gradient"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def ms(row, name):
    t = row.get("timings", {}).get(name)
    if t is None:
      return "-"
    return f"{t['median_ms'] / 1e3:.2f} s" if t["median_ms"] >= 1e3 else f"{t['median_ms']:.0f} ms"

  def ratio(row, name):
    r = row.get("ratios_peer_over_ours", {}).get(name)
    return "-" if r is None else f"{r:.2f}x"

  for row in result["rows"]:
    z, f = row["sizes"], row["fidelity"]
    lines.append("| " + " | ".join([
        str(row["dim"]), f"{z['batch']} ({z['ours_atom_slots']} / {z['pyg_atoms']})",
        ms(row, "ours_nash_mtl"), ms(row, "peer_nash_mtl"), ratio(row, "nash_mtl"),
        ms(row, "peer_nash_mtl_chunk1"), ratio(row, "nash_mtl_chunk1"),
        ms(row, "ours_linear_scalarization"), ms(row, "peer_linear_scalarization"), ratio(row, "linear_scalarization"),
        f"{f['predictions_max_rel']:.1e} / {f['losses_max_rel']:.1e} / {f['grad_of_sum_max_rel']:.1e}"]) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver


def run_dim(torch, raw, dim, args, repeats, settle) -> dict:
  graph = real_batch(raw, args.batch, args.split_seed)
  params = qm9.init_params(jax.random.key(args.seed), dim)
  row = {"dim": dim, "sizes": sizes(graph),
         "params": {"shared": int(sum(a.size for a in jax.tree.leaves(params["shared"]))),
                    "heads": int(sum(a.size for a in jax.tree.leaves(params["heads"])))}}
  start = time.perf_counter()
  row["fidelity"] = fidelity(torch, params, graph)
  row["fidelity_s"] = time.perf_counter() - start
  print(f"dim {dim}: fidelity " + json.dumps({k: v for k, v in row["fidelity"].items()
                                                if k.endswith(("_rel", "_diff", "match", "leaf"))}), flush=True)
  if repeats <= 0:
    row["timings_note"] = "not timed (--repeats 0): fidelity only"
    return row
  data = pyg_batch(torch, graph)
  ours = our_calls(params, graph, args.jacobian_batch_size)
  peer = peer_calls(torch, params, data, args.torchjd_chunks)
  # Interleaved, round after round: per method ours, then the peer's variants.
  calls = {name: fn for method in ("nash_mtl", "linear_scalarization")
           for name, fn in [(f"ours_{method}", ours[f"ours_{method}"]),
                            *((n, f) for n, f in peer.items() if n.startswith(f"peer_{method}"))]}
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cvxpy's "not DPP" warning at every NashMTL solve
    row["timings"] = common.time_interleaved(calls, repeats=repeats, warmup=args.warmup, settle=settle)
  row["timing_s"] = time.perf_counter() - start
  row["ratios_peer_over_ours"] = {
      name.removeprefix("peer_"): row["timings"][name]["median_ms"] / row["timings"][
          "ours_nash_mtl" if name.startswith("peer_nash_mtl") else "ours_linear_scalarization"]["median_ms"]
      for name in peer}
  medians = {name: t["median_ms"] for name, t in row["timings"].items()}
  row["ratios_nash_over_ls"] = {side: medians[f"{side}_nash_mtl"] / medians[f"{side}_linear_scalarization"]
                                for side in ("ours", "peer")}
  for name, t in row["timings"].items():
    print(f"  dim {dim} {name:<28}{t['median_ms']:>12.1f} ms (min {t['min_ms']:.1f}, max {t['max_ms']:.1f})",
          flush=True)
  print(f"  dim {dim} peer/ours: " + json.dumps(row["ratios_peer_over_ours"]), flush=True)
  return row


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--repeats", type=int, nargs="+", default=None,
                      help="timed rounds (one value, or one per --dims; 0: fidelity only; default 5 up to dim 32,"
                      " else 3)")
  parser.add_argument("--settle", type=int, nargs="+", default=None,
                      help="untimed calls of a step before each timed one (one value, or one per --dims; default 0:"
                      " the steps take seconds)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation, NashMTL's setup)")
  parser.add_argument("--batch", type=int, default=120)
  parser.add_argument("--seed", type=int, default=0, help="of qm9.init_params")
  parser.add_argument("--split-seed", type=int, default=0)
  parser.add_argument("--jacobian-batch-size", type=int, default=None,
                      help="ours: backward passes at once (default as qm9.py: 1 on a CPU, all 11 elsewhere)")
  parser.add_argument("--torchjd-chunks", type=int, nargs="+", default=[0, 1],
                      help="a NashMTL peer step per mtl_backward parallel_chunk_size (0: None, TorchJD's default,"
                      " the 11 rows vmapped at once)")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--data-dir", default=None, help="folder of qm9_part*.csv (default: qm9pack's, else the cache)")
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--out", default=None, help="default: benchmarks/results/qm9_peer_<platform>.json")
  parser.add_argument("--merge", action="store_true", help="keep the rows of other dims already in --out")
  args = parser.parse_args(argv)
  defaults = {"repeats": lambda dim: 5 if dim <= 32 else 3, "settle": lambda dim: 0}
  for name, default in defaults.items():
    values = getattr(args, name)
    if values is None:
      values = [default(dim) for dim in args.dims]
    elif len(values) == 1:
      values = values * len(args.dims)
    if len(values) != len(args.dims):
      parser.error(f"--{name}: one value or one per --dims")
    setattr(args, name, values)
  args.torchjd_chunks = [None if c == 0 else c for c in args.torchjd_chunks]
  if args.jacobian_batch_size is None and jax.default_backend() == "cpu":
    args.jacobian_batch_size = 1
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  command = "python benchmarks/qm9_peer.py " + " ".join(sys.argv[1:] if argv is None else argv)
  import torch

  torch.set_num_threads(args.torch_threads)
  raw = load_raw(args.data_dir, args.cache_dir)
  out = pathlib.Path(args.out) if args.out else common.RESULTS / f"qm9_peer_{jax.default_backend()}.json"
  rows = []
  for dim, repeats, settle in zip(args.dims, args.repeats, args.settle):
    rows.append({**run_dim(torch, raw, dim, args, repeats, settle), "command": command,
                 "repeats": repeats, "settle_calls": settle, "warmup_rounds": args.warmup})
  if args.merge and out.exists():
    kept = [row for row in json.loads(out.read_text())["rows"] if row["dim"] not in args.dims]
    rows = sorted(kept + rows, key=lambda row: row["dim"])
  result = {
      "benchmark": "qm9_peer",
      "command": command,
      "commands": sorted({row["command"] for row in rows}),
      "environment": common.environment(),
      "versions": common.package_versions(VERSIONS),
      "threads": {"torch_num_threads": torch.get_num_threads(),
                  "torch_num_interop_threads": torch.get_num_interop_threads(),
                  "jax": f"XLA:CPU's default pool (os.cpu_count() = {os.cpu_count()})",
                  "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
      "settings": {
          "batch": args.batch, "data": "the first --batch molecules of qm9.py's training part (split seed"
          f" {args.split_seed}), targets standardised with the training part's mean and std",
          "weights": f"qm9.init_params(jax.random.key({args.seed}), dim), copied into the PyG model",
          "padding": ("ours: every molecule padded to 29 atoms (29 x 28 ordered pairs masked), PyG: the real atoms"
                      " only (sizes.pyg_atoms, sizes.pyg_edges)"),
          "edge_network": ("ours: factored (a = relu(Linear1(e)) once, U_j = W2 x_j per atom in each round); PyG's"
                           " NNConv: the dim x dim matrix of every edge, formed again in each of the 3 rounds"),
          "ours_nash_mtl": ("jit(value_and_jacobian(task_losses, batch_size=jacobian_batch_size) + nash_mtl(11,"
                            " shared=heads excluded) + inject_hyperparams(adam)(1e-3) + apply_updates)"),
          "ours_linear_scalarization": "jit(task_gradients (one backward pass) + linear_scalarization(11) + adam)",
          "peer_nash_mtl": ("PyG forward; torchjd.autojac.mtl_backward(losses, features=lin1 output, shared_params,"
                            " tasks_params=heads) (parallel_chunk_size None: one torch.vmap over the 11 rows);"
                            " jac_to_grad(shared_params, NashMTL(n_tasks=11)); torch.optim.Adam(lr=1e-3).step()"),
          "peer_linear_scalarization": "PyG forward; torch.stack(losses).sum().backward(); Adam step",
          "jacobian_batch_size": args.jacobian_batch_size,
          "peer_nash_mtl_chunk1": "the same with parallel_chunk_size=1 (the 11 rows one after the other)",
          "timing": ("common.time_interleaved: the four steps round-robin (ours then PyG, per method), warmup"
                     " rounds untimed, settle_calls untimed calls of the same step before each timed one;"
                     " median/min/max ms; params and optimizer states carried over from call to call"),
          "ratios_peer_over_ours": "PyG median over our median, same method, same rounds",
          "fidelity": ("max |ours - PyG| / max |ours| of the (batch, 11) predictions, of each task's loss, and of"
                       " the gradient of the summed losses per parameter array (the worst given); float32 both"),
      },
      "rows": rows,
  }
  path = common.write(result, out, out.name)
  print(markdown(result))
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
