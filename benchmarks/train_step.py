"""Train-step time of every method relative to linear scalarization (LS), and against the PyTorch peers.

The model of ``gradient_paths.py``: an MLP trunk shared by ``K`` linear
regression heads (mean squared error per task), Adam (lr 1e-4). Defaults: K in
2, 3, 10, 40, a trunk of 256 -> 512 x 4 ReLU layers (0.92M parameters; the JSON
records the counts), batch 256, 8 outputs per head. ``--model conv``: the
small convolutional trunk of ``conv_net.py`` on 32x32 RGB images instead
(written to ``train_step_conv_<platform>.json``). For each ``K``:

- **methods**: one jitted train step per method (per-task gradients, the
  transform, ``optax.adam``, ``optax.apply_updates``), timed round-robin with
  ``common.time_interleaved`` (each timed call after one untimed call of the
  same step, so a step is not timed right after a heavier one); median/min/max
  after compilation and the ratio of medians to LS measured in the same round.
  Gram and full-gradient methods (Nash-MTL, MGDA, Aligned-MTL, CAGrad, IMTL-G,
  PCGrad, GradVac, GradDrop, UPGrad, DualProj, GradNorm) get their per-task gradients from
  ``value_and_jacobian`` (K backward passes); the methods that read only the
  losses or a key (LS, SI, RLW, DWA, UW) from the lazy ``task_gradients``
  (one backward pass), as they would be used. Every Gram method runs with
  ``shared=`` the trunk. Each timed call is one training step: params and
  optimizer state are carried over, and the batch rotates over a few
  pre-drawn batches, so the solvers see a different Gram at every step as in
  training (warm starts included).
- **references** (same round): ``sum_grad``, a plain ``jax.grad`` of
  the summed loss with Adam and no ``optax_mtl`` (what LS should cost), and
  ``ls_jacobian``, LS fed the full Jacobian (the floor of the Jacobian path).
- **breakdown** (LS, Nash-MTL, MGDA, UPGrad, CAGrad): each stage jitted and
  timed on its own, round-robin: the one backward pass of LS, the Jacobian
  (``value_and_jacobian``), the Gram of the trunk (``optax_mtl.gram``), each
  weighting alone on that Gram (``optax_mtl.weighting.<name>``), the
  combination (``optax_mtl.combine``) and the optimizer step (Adam update and
  ``optax.apply_updates``), and the cached step (``cached``) split into a
  refresh and a reuse of the weights (Nash-MTL with ``update_weights_every``
  the largest k below, each kind timed on its own with LS's step in the same
  round; ``cycle_over_ls`` is what a cycle of k steps costs from these), for
  the ``lax.cond`` and for the two steps a loop compiles with
  ``refresh_weights`` (``host_*``).
- **cheap paths** (relative to the same LS): Nash-MTL on the lazy
  ``task_gradients`` with ``update_weights_every = k`` for k in 1, 5, 50 (the
  mean step over a cycle of k consecutive jitted calls: one refresh with K
  backward passes, k - 1 cached steps with one; ``*_host``: the same cycle
  with the choice made by the loop, ``refresh_weights=True`` on its first step
  and ``False`` on the others, static), and the feature-level step
  (``feature_task_gradients``: MGDA-UB and Aligned-MTL-UB), with the heads as
  one function of ``z`` (K backward passes through all K heads) and with
  ``per_task_heads=K`` (``*_per_task_heads``: one backward pass of the heads);
  and every method a TorchJD peer runs (Nash-MTL, MGDA, Aligned-MTL, UPGrad,
  PCGrad, CAGrad) on the exact Gram of the trunk formed through the
  representation (``through_representation_*``: ``feature_task_gradients(...,
  per_task_heads=K, level="parameters")``, the ``K`` backward passes through
  the trunk only, as TorchJD's ``mtl_backward``).
- **peers** (optional; PyTorch float32, on the CPU with ``torch.set_num_threads``
  = the core count, or on CUDA when JAX runs on a GPU and PyTorch sees one, see
  ``--torch-device``; the same model, initial weights and batches, the conv trunk
  in NCHW with XLA's ``SAME`` padding): a plain ``sum(losses)
  .backward()`` step; TorchJD 0.18 ``mtl_backward`` + ``jac_to_grad`` with
  ``Mean``, ``MGDA``, ``NashMTL``, ``AlignedMTL``, ``UPGrad``, ``PCGrad`` and
  ``CAGrad(c=0.4)``; and the official nash-mtl training step (K
  ``torch.autograd.grad`` calls on the trunk, the Nash solve, one backward pass
  of ``sum_i a_i L_i``, the trunk's gradient clipped to norm 1), whose solve is
  TorchJD's port of the official cvxpy/ECOS CCP (``NashMTL(max_norm=0)
  .weighting`` on the stacked gradients: the official normalised Gram,
  iteration cap and stopping rule). Each peer is timed round-robin with the
  other peers (after ours, so the two runtimes' thread pools never overlap;
  on CUDA each peer step ends with ``torch.cuda.synchronize()``, as each of
  ours ends with ``block_until_ready``, and PyTorch's float32 matmuls use TF32
  as JAX's default does on a GPU), and each gets the speed-up of our
  step for the same method and K (peer median / our median), on the per-task
  tree and through the representation. Run the peers on an idle machine: with another
  process on a core, PyTorch's OpenMP threads spin-wait on it and its steps
  get about 100 times slower (a warning is printed and written when its plain
  step is more than 10 times JAX's).

  python benchmarks/train_step.py          # CPU defaults, writes results/train_step_<platform>.json and .png
  python benchmarks/train_step.py --ks 2 10 --width 256 --repeats 10
  python benchmarks/train_step.py --jacobian-batch-size 1   # sequential backward passes (the committed CPU run)
  python benchmarks/train_step.py --model conv --batch 32 --ks 2 3 10 --repeats 5 --no-peers --breakdown-ks 10   # the committed CPU conv run (the GPU suite's: batch 256, K = 2, 10, 40)
  python benchmarks/train_step.py --tiny --out /tmp/x.json   # smoke sizes, no peers
  python benchmarks/train_step.py --only feature_level_mgda feature_level_mgda_per_task_heads --out /tmp/f.json
  python benchmarks/train_step.py --ks 40 --peers --only through_representation_mgda --out /tmp/p.json

PyTorch and TorchJD are optional, the ``peers`` extra (``pip install -e
".[benchmarks,peers]"``; ``torch==2.13.0`` is the CPU wheel the committed runs
used); without them the peers are skipped with a note.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import conv_net  # noqa: E402  (the conv trunk of --model conv)
import gradient_paths as mlp  # noqa: E402  (the MLP trunk + K heads, shared with that benchmark)

KS = (2, 3, 10, 40)
LEARNING_RATE = 1e-4
SHARED = {"trunk": True, "heads": False}  # a prefix mask of the params: the trunk is shared

# name -> (factory num_tasks -> transform, gradient path). "jacobian": per-task gradients from
# value_and_jacobian; "lazy": task_gradients, which costs one backward pass for methods that read
# no Gram.
METHODS = {
    "linear_scalarization": (lambda k: optax_mtl.linear_scalarization(k), "lazy"),
    "nash_mtl": (lambda k: optax_mtl.nash_mtl(k, shared=SHARED), "jacobian"),
    "mgda": (lambda k: optax_mtl.mgda(k, shared=SHARED), "jacobian"),
    "aligned_mtl": (lambda k: optax_mtl.aligned_mtl(k, shared=SHARED), "jacobian"),
    "cagrad": (lambda k: optax_mtl.cagrad(k, shared=SHARED), "jacobian"),
    "imtl_g": (lambda k: optax_mtl.imtl_g(k, shared=SHARED), "jacobian"),
    "pcgrad": (lambda k: optax_mtl.pcgrad(k, key=0, shared=SHARED), "jacobian"),
    "gradvac": (lambda k: optax_mtl.gradvac(k, key=0, shared=SHARED), "jacobian"),
    "graddrop": (lambda k: optax_mtl.graddrop(k, key=0, shared=SHARED), "jacobian"),
    "upgrad": (lambda k: optax_mtl.upgrad(k, shared=SHARED), "jacobian"),
    "dualproj": (lambda k: optax_mtl.dualproj(k, shared=SHARED), "jacobian"),
    "scale_invariant": (lambda k: optax_mtl.scale_invariant(k), "lazy"),
    "random_weighting": (lambda k: optax_mtl.random_weighting(k, key=0), "lazy"),
    "dwa": (lambda k: optax_mtl.dwa(k), "lazy"),
    "uncertainty_weighting": (lambda k: optax_mtl.uncertainty_weighting(k), "lazy"),
    "gradnorm": (lambda k: optax_mtl.gradnorm(k, shared=SHARED), "jacobian"),  # the Gram diagonal
}
BASELINE = "linear_scalarization"

# The breakdown's weightings, each the one its transform uses by default.
BREAKDOWN_WEIGHTINGS = {
    "nash_mtl": optax_mtl.weighting.nash,
    "mgda": optax_mtl.weighting.mgda,
    "upgrad": optax_mtl.weighting.upgrad,
    "cagrad": lambda gram: optax_mtl.weighting.cagrad(gram, c=0.4, rescale=1),
}

LAZY_EVERY = (1, 5, 50)
FEATURE_METHODS = {  # the -UB variants the papers define
    "mgda": lambda k: optax_mtl.mgda(k),
    "aligned_mtl": lambda k: optax_mtl.aligned_mtl(k),
}

# Exact Gram methods on feature_task_gradients(..., per_task_heads=K, level="parameters"): the
# trunk's Jacobian from the K representation gradients, as TorchJD's mtl_backward forms it. Every
# method a TorchJD peer runs, so that each peer is also compared with our step of the same
# construction.
THROUGH_REPRESENTATION = ("nash_mtl", "mgda", "aligned_mtl", "upgrad", "pcgrad", "cagrad")

# TorchJD aggregator (constructor) -> our method of the same definition.
PEER_AGGREGATORS = {
    "torchjd_mean": ("Mean", {}, "linear_scalarization"),
    "torchjd_mgda": ("MGDA", {}, "mgda"),
    "torchjd_nash_mtl": ("NashMTL", {"n_tasks": None}, "nash_mtl"),
    "torchjd_aligned_mtl": ("AlignedMTL", {}, "aligned_mtl"),
    "torchjd_upgrad": ("UPGrad", {}, "upgrad"),
    "torchjd_pcgrad": ("PCGrad", {}, "pcgrad"),
    "torchjd_cagrad": ("CAGrad", {"c": 0.4}, "cagrad"),
}


# ----------------------------------------------------------------------------- data and steps


# Each model module has init_for(sizes, K), input_shape(sizes), encoder, task_losses and the heads.
MODELS = {"mlp": mlp, "conv": conv_net}


def make_batches(args, k):
  """A few different batches, rotated over the steps so every step sees a new Gram."""
  rng = np.random.default_rng(k)
  shape = MODELS[args.model].input_shape(args)
  return [(rng.normal(size=(args.batch, *shape)).astype(np.float32),
           rng.normal(size=(args.batch, k, args.head_dim)).astype(np.float32))
          for _ in range(args.num_batches)]


def apply_step(tx, grads_of, **extra_args):
  """A train step ``(params, opt_state, x, y) -> (params, opt_state)`` of ``tx`` on ``grads_of``'s gradients.

  ``extra_args`` go to ``tx.update`` (``refresh_weights`` for the host-scheduled cached steps).
  """

  def step(params, opt_state, x, y):
    losses, grads = grads_of(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses, **extra_args)
    return optax.apply_updates(params, updates), opt_state

  return step


def jacobian_grads(batch_size, model=mlp):
  return optax_mtl.value_and_jacobian(model.task_losses, batch_size=batch_size)


def lazy_grads(batch_size, model=mlp):
  def grads_of(params, x, y):
    grads = optax_mtl.task_gradients(model.task_losses, batch_size=batch_size)(params, x, y)
    return grads.losses, grads

  return grads_of


def feature_grads(batch_size, model=mlp, per_task_heads=None, level="representation"):
  heads = model.heads_losses if per_task_heads is None else model.heads_losses_per_task
  grads_fn = optax_mtl.feature_task_gradients(model.encoder, heads, batch_size=batch_size,
                                              per_task_heads=per_task_heads, level=level)

  def grads_of(params, x, y):
    grads = grads_fn(params, x, y)
    return grads.losses, grads

  return grads_of


def sum_grad_step(adam, model=mlp):
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: jnp.sum(model.task_losses(p, x, y)))(params)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def training_call(jit, step, tx_init, params, batches, steps_per_call=1, host_every=None):
  """A callable running ``steps_per_call`` jitted train steps, carrying params and state.

  The steps are dispatched back to back and only the last result is waited
  for (by the timer), as in a training loop. With ``host_every``, ``step`` is
  ``refresh_weights -> step``: the loop runs the compiled refreshing step
  every ``host_every`` steps and the reusing one in between, as a training
  loop that passes ``refresh_weights`` statically.
  """
  if host_every is None:
    jitted = jit(step)
    pick = lambda i: jitted
  else:
    refresh, reuse = jit(step(True)), jit(step(False))
    pick = lambda i: refresh if i % host_every == 0 else reuse
  device_batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
  state = {"params": params, "opt_state": tx_init(params), "i": 0}

  def call():
    for _ in range(steps_per_call):
      x, y = device_batches[state["i"] % len(device_batches)]
      state["params"], state["opt_state"] = pick(state["i"])(state["params"], state["opt_state"], x, y)
      state["i"] += 1
    return state["params"], state["opt_state"]

  return call


def variant_names(lazy_every) -> list[str]:
  """The names ``time_methods`` gives its steps, which ``--only`` selects from."""
  return [*METHODS, "sum_grad", "ls_jacobian",
          *(f"task_gradients_nash_mtl_every_{every}" for every in lazy_every),
          *(f"task_gradients_nash_mtl_every_{every}_host" for every in lazy_every if every > 1),
          *(f"feature_level_{method}{suffix}" for method in FEATURE_METHODS for suffix in ("", "_per_task_heads")),
          *(f"through_representation_{method}" for method in THROUGH_REPRESENTATION)]


def jitter(args):
  """``jax.jit`` with the run's compiler options (``--tiny``: unoptimised code, compiled twice as fast)."""
  return functools.partial(jax.jit, compiler_options=args.compiler_options)


def per_step(timing, steps):
  scaled = {key: timing[key] / steps for key in ("median_ms", "min_ms", "max_ms")}
  return {**timing, **scaled, "steps_per_call": steps}


# ----------------------------------------------------------------------------- our measurements


def time_methods(args, k, params, batches):
  """Every method, the references and the cheap paths, in one round-robin."""
  adam, jit, batch_size = optax.adam(LEARNING_RATE), jitter(args), args.jacobian_batch_size
  net = MODELS[args.model]
  calls, steps = {}, {}
  for name, (factory, path) in METHODS.items():
    tx = optax.chain(factory(k), adam)
    grads_of = jacobian_grads(batch_size, net) if path == "jacobian" else lazy_grads(batch_size, net)
    calls[name] = training_call(jit, apply_step(tx, grads_of), tx.init, params, batches)
  ls_on_jacobian = optax.chain(optax_mtl.linear_scalarization(k), adam)
  references = {
      "sum_grad": training_call(jit, sum_grad_step(adam, net), adam.init, params, batches),
      "ls_jacobian": training_call(jit, apply_step(ls_on_jacobian, jacobian_grads(batch_size, net)),
                                   ls_on_jacobian.init, params, batches),
  }
  cheap = {}
  for every in args.lazy_every:
    tx = optax.chain(optax_mtl.nash_mtl(k, shared=SHARED, update_weights_every=every), adam)
    name = f"task_gradients_nash_mtl_every_{every}"
    cheap[name] = training_call(jit, apply_step(tx, lazy_grads(batch_size, net)), tx.init, params, batches,
                                steps_per_call=every)
    steps[name] = every
    if every > 1:
      host_step = lambda refresh, tx=tx: apply_step(tx, lazy_grads(batch_size, net), refresh_weights=refresh)
      cheap[f"{name}_host"] = training_call(jit, host_step, tx.init, params, batches, steps_per_call=every,
                                            host_every=every)
      steps[f"{name}_host"] = every
  for method, factory in FEATURE_METHODS.items():
    for suffix, per_task_heads in (("", None), ("_per_task_heads", k)):
      tx = optax.chain(factory(k), adam)
      cheap[f"feature_level_{method}{suffix}"] = training_call(
          jit, apply_step(tx, feature_grads(batch_size, net, per_task_heads)), tx.init, params, batches)
  for method in THROUGH_REPRESENTATION:
    tx = optax.chain(METHODS[method][0](k), adam)
    cheap[f"through_representation_{method}"] = training_call(
        jit, apply_step(tx, feature_grads(batch_size, net, k, "parameters")), tx.init, params, batches)
  if args.only:
    keep = lambda group: {name: call for name, call in group.items() if name in args.only or name == BASELINE}
    calls, references, cheap = keep(calls), keep(references), keep(cheap)
  timings = common.time_interleaved({**calls, **references, **cheap}, repeats=args.repeats)
  for name, every in steps.items():
    if name in timings:
      timings[name] = per_step(timings[name], every)
  baseline = timings[BASELINE]["median_ms"]
  for entry in timings.values():
    entry["ratio_to_ls"] = entry["median_ms"] / baseline
  return ({name: timings[name] for name in calls}, {name: timings[name] for name in references},
          {name: timings[name] for name in cheap})


def time_breakdown(args, k, params, batches, method_timings):
  """Each stage of a Gram method's step, jitted and timed on its own (round-robin)."""
  adam, jit = optax.adam(LEARNING_RATE), jitter(args)
  x, y = (jnp.asarray(a) for a in batches[0])
  net = MODELS[args.model]
  backward = jit(jax.value_and_grad(lambda p, x, y: jnp.sum(net.task_losses(p, x, y))))
  jacobian = jit(jacobian_grads(args.jacobian_batch_size, net))
  gram = jit(lambda jac: optax_mtl.gram(jac, mask=SHARED))
  combine = jit(optax_mtl.combine)

  @jit
  def optimizer(grads, opt_state, params):
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  _, jac = common.block(jacobian(params, x, y))
  matrix = common.block(gram(jac))
  weights = jnp.ones((k,), jnp.float32)
  grads = common.block(combine(weights, jac))
  opt_state = adam.init(params)
  calls = {
      "backward": lambda: backward(params, x, y),
      "jacobian": lambda: jacobian(params, x, y),
      "gram": lambda: gram(jac),
      "combine": lambda: combine(weights, jac),
      "optimizer": lambda: optimizer(grads, opt_state, params),
  }
  for name, weighting in BREAKDOWN_WEIGHTINGS.items():
    calls[f"weighting_{name}"] = (lambda fn: lambda: fn(matrix))(jit(weighting))
  every = max(args.lazy_every)
  if every > 1:
    calls.update(cached_step_calls(jit, adam, k, every, net, args.jacobian_batch_size, params, x, y))
  stages = common.time_interleaved(calls, repeats=args.repeats)
  medians = {name: entry["median_ms"] for name, entry in stages.items()}
  per_method = {BASELINE: {"backward_ms": medians["backward"], "optimizer_ms": medians["optimizer"]}}
  for name in BREAKDOWN_WEIGHTINGS:
    per_method[name] = {"jacobian_ms": medians["jacobian"], "gram_ms": medians["gram"],
                        "weighting_ms": medians[f"weighting_{name}"], "combine_ms": medians["combine"],
                        "optimizer_ms": medians["optimizer"]}
  for name, entry in per_method.items():
    entry["stages_total_ms"] = sum(entry.values())
    if name in method_timings:  # --only with --breakdown-ks may leave a method's step out
      entry["step_ms"] = method_timings[name]["median_ms"]
  breakdown = {"stages": stages, "methods": per_method}
  if every > 1:
    ls = medians["ls_step"]
    breakdown["cached"] = {"update_weights_every": every, "ls_step_ms": ls}
    for prefix, kind in (("", "cached"), ("host_", "host")):
      refresh, reuse = medians[f"{kind}_refresh_step"], medians[f"{kind}_reuse_step"]
      breakdown["cached"].update({
          f"{prefix}refresh_step_ms": refresh, f"{prefix}reuse_step_ms": reuse,
          f"{prefix}refresh_over_ls": refresh / ls, f"{prefix}reuse_over_ls": reuse / ls,
          f"{prefix}cycle_over_ls": (refresh + (every - 1) * reuse) / (every * ls)})
  return breakdown


def cached_step_calls(jit, adam, k, every, net, batch_size, params, x, y):
  """Nash-MTL's cached step split into its two kinds, and LS, on fixed inputs.

  The cheap paths time a whole cycle of ``every`` steps; here the step runs
  from a state at count 0 (every call refreshes: K backward passes in the
  ``lax.cond``, then the weighted one) and from a state at count 1 (every
  call reuses the weights: the cond's other branch and one backward pass).
  The state is not carried, so each kind repeats. ``host_*``: the two steps
  the training loop compiles with ``refresh_weights=True``/``False``, no
  conditional in either (the refresh combines the stored Jacobian instead of
  running the weighted backward pass).
  """
  ls = optax.chain(optax_mtl.linear_scalarization(k), adam)
  cached = optax.chain(optax_mtl.nash_mtl(k, shared=SHARED, update_weights_every=every), adam)
  grads_of = lazy_grads(batch_size, net)
  ls_step, cached_step = jit(apply_step(ls, grads_of)), jit(apply_step(cached, grads_of))
  host_refresh = jit(apply_step(cached, grads_of, refresh_weights=True))
  host_reuse = jit(apply_step(cached, grads_of, refresh_weights=False))
  ls_state, due_state = ls.init(params), cached.init(params)
  _, reuse_state = common.block(cached_step(params, due_state, x, y))
  return {"ls_step": lambda: ls_step(params, ls_state, x, y),
          "cached_refresh_step": lambda: cached_step(params, due_state, x, y),
          "cached_reuse_step": lambda: cached_step(params, reuse_state, x, y),
          "host_refresh_step": lambda: host_refresh(params, due_state, x, y),
          "host_reuse_step": lambda: host_reuse(params, reuse_state, x, y)}


# ----------------------------------------------------------------------------- peers (PyTorch)


def import_peers():
  """``(torch, torchjd modules)`` or ``(None, reason)``."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      import torch
      from torchjd import aggregation
      from torchjd import autojac
  except ImportError as err:
    return None, f"skipped: {err}"
  return (torch, aggregation, autojac), None


def torch_model(torch, params, device, net):
  """The JAX model (``net``'s trunk, the linear heads) in ``torch.nn`` with the same initial weights, on ``device``."""
  heads = [mlp.torch_linear(torch, head) for head in params["heads"]]
  return net.torch_trunk(torch, params["trunk"]).to(device), torch.nn.ModuleList(heads).to(device)


def peer_calls(k, params, batches, modules, device, net):
  """One callable per peer, each running one training step on its own copy of ``net`` on ``device``."""
  torch, aggregation, autojac = modules
  torch_batches = [(torch.as_tensor(net.torch_inputs(x)).to(device), torch.as_tensor(y).to(device))
                   for x, y in batches]
  # CUDA runs asynchronously: without a synchronisation the timer would measure the launches.
  on_cuda = torch.device(device).type == "cuda"
  synchronize = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
  mse = torch.nn.functional.mse_loss
  calls, notes = {}, {}

  def make(step_body):
    trunk, heads = torch_model(torch, params, device, net)
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=LEARNING_RATE)
    state = {"i": 0}

    def call():
      x, y = torch_batches[state["i"] % len(torch_batches)]
      state["i"] += 1
      features = trunk(x)
      losses = [mse(head(features), y[:, i]) for i, head in enumerate(heads)]
      step_body(trunk, heads, features, losses)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      synchronize()

    return call

  calls["torch_sum"] = make(lambda trunk, heads, features, losses: torch.stack(losses).sum().backward())

  for name, (cls, kwargs, _) in PEER_AGGREGATORS.items():
    kwargs = {key: (k if value is None else value) for key, value in kwargs.items()}
    try:
      aggregator = getattr(aggregation, cls)(**kwargs)
    except ImportError as err:  # NashMTL and CAGrad need cvxpy/ECOS
      notes[name] = f"skipped: {err}"
      continue

    def body(trunk, heads, features, losses, aggregator=aggregator):
      shared = list(trunk.parameters())
      autojac.mtl_backward(losses, features=features, shared_params=shared,
                           tasks_params=[list(head.parameters()) for head in heads])
      autojac.jac_to_grad(shared, aggregator)

    calls[name] = make(body)

  try:
    # TorchJD's copy of the official CCP solve; max_norm=0 because the official step clips the
    # gradients after the backward pass, not the weights.
    nash_weighting = aggregation.NashMTL(n_tasks=k, max_norm=0.0).weighting
  except ImportError as err:
    notes["nash_mtl_official"] = f"skipped: {err}"
  else:

    def official_nash(trunk, heads, features, losses):
      shared = list(trunk.parameters())
      rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
              for loss in losses]
      alpha = nash_weighting(torch.stack(rows))
      sum(a * loss for a, loss in zip(alpha, losses)).backward()
      torch.nn.utils.clip_grad_norm_(shared, 1.0)

    calls["nash_mtl_official"] = make(official_nash)
  return calls, notes


PEER_METHOD = {"torch_sum": "linear_scalarization", "nash_mtl_official": "nash_mtl",
               **{name: method for name, (_, _, method) in PEER_AGGREGATORS.items()}}


def time_peers(args, k, params, batches, modules, method_timings, cheap_timings):
  calls, notes = peer_calls(k, params, batches, modules, args.torch_device, MODELS[args.model])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cvxpy's "not DPP" warning on every Nash solve
    timings = common.time_interleaved(calls, repeats=args.peer_repeats)
  del calls  # the models and optimizer states; on CUDA, give their cached memory back to the device
  if modules[0].device(args.torch_device).type == "cuda":
    modules[0].cuda.empty_cache()
  for name, entry in timings.items():
    ours = PEER_METHOD[name]
    entry["method"] = ours
    if ours in method_timings:  # --only may leave it out
      entry["speedup_of_ours"] = entry["median_ms"] / method_timings[ours]["median_ms"]
    through = cheap_timings.get(f"through_representation_{ours}")
    if through is not None:
      entry["speedup_of_ours_through_representation"] = entry["median_ms"] / through["median_ms"]
  return {**timings, **{name: {"note": note, "method": PEER_METHOD[name]} for name, note in notes.items()}}


# ----------------------------------------------------------------------------- driver


def run(args) -> dict:
  modules, peers_note = ((None, "not run (--no-peers; the default with --tiny or --only)") if not args.peers
                         else import_peers())
  if modules is not None:
    torch = modules[0]
    torch.set_num_threads(args.torch_threads)
    if args.torch_device is None:
      on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
      args.torch_device = "cuda" if on_gpu else "cpu"
    if args.torch_device != "cpu":
      # JAX's default float32 matmul on a GPU rounds its operands to TF32; PyTorch's keeps FP32
      # unless told: the same arithmetic on both sides ("high": TF32). optax_mtl's own Gram and
      # weightings run at full precision either way.
      torch.set_float32_matmul_precision("high")
  rows = []
  sizes = None
  for k in args.ks:
    params = MODELS[args.model].init_for(args, k)
    n_trunk = sum(p.size for p in jax.tree.leaves(params["trunk"]))
    n_heads = sum(p.size for p in jax.tree.leaves(params["heads"]))
    sizes = sizes or {"model": args.model, "ks": list(args.ks), "batch": args.batch,
                      "input_shape": list(MODELS[args.model].input_shape(args)), "width": args.width,
                      "depth": args.depth, "head_dim": args.head_dim, "trunk_params": int(n_trunk),
                      "head_params_per_task": int(n_heads // k)}
    batches = make_batches(args, k)
    methods, references, cheap = time_methods(args, k, params, batches)
    row = {"K": k, "params": int(n_trunk + n_heads), "methods": methods, "references": references,
           "cheap_paths": cheap}
    if k in args.breakdown_ks:
      row["breakdown"] = time_breakdown(args, k, params, batches, methods)
    if modules is not None:
      row["peers"] = time_peers(args, k, params, batches, modules, methods, cheap)
      plain = references.get("sum_grad", methods[BASELINE])  # --only may leave sum_grad out
      slowdown = row["peers"]["torch_sum"]["median_ms"] / plain["median_ms"]
      # The same backward pass in both frameworks: an order of magnitude is not the framework.
      if slowdown > 10 and args.torch_device == "cpu":
        row["peers_warning"] = (f"PyTorch's plain step is {slowdown:.0f}x slower than JAX's: another process"
                                " probably holds a core (OpenMP threads spin-waiting on a busy core); rerun on an"
                                " idle machine, or with --torch-threads 1 or OMP_WAIT_POLICY=PASSIVE")
    rows.append(row)
    report(row)
  return {
      "benchmark": "train_step",
      "environment": common.environment(),
      "peers": {
          "versions": common.package_versions(("torch", "torchjd", "cvxpy", "ecos")), "torch_threads": modules[0].get_num_threads(),
          "torch_device": args.torch_device,
          "torch_float32_matmul_precision": modules[0].get_float32_matmul_precision(),
          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
          "step": "torch.optim.Adam(lr=1e-4), float32, the same initial weights and batches",
          "torchjd": "autojac.mtl_backward(losses, features=trunk output) + autojac.jac_to_grad(trunk params, A)",
          "nash_mtl_official": ("K torch.autograd.grad on the trunk, TorchJD's port of the official cvxpy/ECOS CCP"
                                " (NashMTL(max_norm=0).weighting), backward of sum_i a_i L_i, clip_grad_norm_(1)"),
      } if modules else {"note": peers_note},
      "sizes": sizes,
      "settings": {
          "optimizer": f"adam({LEARNING_RATE})",
          "jacobian_batch_size": args.jacobian_batch_size,
          "repeats": args.repeats, "peer_repeats": args.peer_repeats, "batches_rotated": args.num_batches,
          "only": args.only,
          "paths": {name: path for name, (_, path) in METHODS.items()},
          "shared": "trunk (Gram methods' shared=); heads task-specific",
          "timing": ("median/min/max ms per train step after compilation, round-robin over the variants of"
                     " one K, each timed call after an untimed call of the same step; params and"
                     " optimizer state carried over, batches rotated; cheap paths with"
                     " steps_per_call > 1: a cycle of consecutive jitted calls divided by its length"),
          "ratio_to_ls": "median over the median of linear_scalarization (lazy path) in the same round",
          "speedup_of_ours": "peer median over the median of our step for the same method and K",
          "speedup_of_ours_through_representation": ("peer median over the median of our step for the same"
                                                     " method through the representation (level='parameters')"),
      },
      "rows": rows,
  }


def report(row):
  print(f"K = {row['K']} ({row['params']} params)")
  print(f"  {'method':<34}{'median ms':>11}{'x LS':>8}")
  for group in ("methods", "references", "cheap_paths"):
    for name, entry in row[group].items():
      print(f"  {name:<34}{entry['median_ms']:>11.2f}{entry['ratio_to_ls']:>8.2f}")
  if "breakdown" in row:
    stages = "  ".join(f"{name} {entry['median_ms']:.2f}" for name, entry in row["breakdown"]["stages"].items())
    print(f"  stages (ms): {stages}")
    cached = row["breakdown"].get("cached")
    if cached:
      for prefix, label in (("", "cond"), ("host_", "host")):
        print(f"  cached, k = {cached['update_weights_every']} ({label}): refresh"
              f" {cached[prefix + 'refresh_over_ls']:.2f}x LS, reuse {cached[prefix + 'reuse_over_ls']:.3f}x,"
              f" a cycle {cached[prefix + 'cycle_over_ls']:.3f}x")
  if "peers_warning" in row:
    print(f"  WARNING: {row['peers_warning']}")
  for name, entry in row.get("peers", {}).items():
    if "note" in entry:
      print(f"  peer {name:<29}{entry['note']}")
    else:
      speedups = [f"{entry[key]:.2f}x{label}" for key, label in (
          ("speedup_of_ours", ""), ("speedup_of_ours_through_representation", " through z")) if key in entry]
      print(f"  peer {name:<29}{entry['median_ms']:>11.2f}   ours faster: {', '.join(speedups) or '-'}")
  sys.stdout.flush()


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  rows = result["rows"]
  ks = [row["K"] for row in rows]
  with_peers = any("median_ms" in entry for row in rows for entry in row.get("peers", {}).values())
  fig, axes = plt.subplots(1, 2 if with_peers else 1, figsize=(13 if with_peers else 7, 5.5), squeeze=False)
  ax = axes[0][0]
  colors = plt.cm.tab20.colors  # 16 methods + the cheap paths: more lines than the default 10 colours
  lines = [(name, "methods", "-") for name in rows[0]["methods"]]
  lines += [(name, "cheap_paths", "--") for name in rows[0]["cheap_paths"]]
  for i, (name, group, style) in enumerate(lines):
    ax.plot(ks, [row[group][name]["ratio_to_ls"] for row in rows], style, color=colors[i % len(colors)],
            marker="osD^v<>"[i % 7], label=name)
  ax.set(xscale="log", yscale="log", xlabel="K", ylabel="step time / LS step time",
         title=f"train step vs LS ({result['sizes']['trunk_params']:,} trunk params)")
  ax.set_xticks(ks, [str(k) for k in ks], minor=False)
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured K on the log axis
  ax.legend(fontsize=6, ncol=2)
  if with_peers:
    ax = axes[0][1]
    names = sorted({n for row in rows for n, e in row.get("peers", {}).items() if "median_ms" in e})
    for name in names:
      entries = [(row["K"], row["peers"][name]) for row in rows if "median_ms" in row.get("peers", {}).get(name, {})]
      method = entries[0][1]["method"]
      color = None
      # Solid: against our step on the per-task tree; dashed, same colour: through z.
      for key, style, marker, label in (("speedup_of_ours", "-", "o", method),
                                        ("speedup_of_ours_through_representation", "--", "s",
                                         f"through_representation_{method}")):
        sel = [(k, entry[key]) for k, entry in entries if key in entry]
        if sel:
          (line,) = ax.plot(*zip(*sel), style, marker=marker, color=color, label=f"{name} vs {label}")
          color = line.get_color()
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel="peer step time / our step time",
           title="speed-up of ours over the PyTorch peers")
    ax.set_xticks(ks, [str(k) for k in ks], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=None,
                      help=f"numbers of tasks (default: {' '.join(map(str, KS))}; 3 with --tiny)")
  parser.add_argument("--breakdown-ks", type=int, nargs="*", default=None, help="default: every K")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--features", type=int, default=256)
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp",
                      help="mlp: --depth dense layers of --width; conv: --depth stride-2 3x3 convolutions up to"
                      " --width channels on --image-size RGB images, then a global average pool")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--peer-repeats", type=int, default=10)
  parser.add_argument("--num-batches", type=int, default=8, help="batches rotated over the steps")
  parser.add_argument("--lazy-every", type=int, nargs="+", default=list(LAZY_EVERY))
  parser.add_argument("--jacobian-batch-size", type=int, default=None,
                      help="batch_size of value_and_jacobian / task_gradients / feature_task_gradients"
                      " (default None: vectorised, the library default; 1: sequential)")
  parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                      help="time the PyTorch/TorchJD peers (default: on, off with --tiny or --only)")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads for the peers (default: the core count)")
  parser.add_argument("--torch-device", default=None,
                      help="the peers' PyTorch device (default: cuda when JAX runs on a GPU and PyTorch sees one,"
                      " else cpu)")
  parser.add_argument("--tiny", action="store_true",
                      help="smoke-test sizes, compiled without XLA's backend optimisations (timings meaningless)")
  parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                      help="time only these methods, references and cheap paths (LS always); no breakdown, and"
                      " no peers unless --peers")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  args.compiler_options = None
  if args.ks is None:
    args.ks = [3] if args.tiny else list(KS)
  if args.tiny:
    args.batch, args.features, args.width, args.depth, args.head_dim = 8, 8, 16, 2, 2
    args.image_size = 8
    args.repeats, args.peer_repeats, args.num_batches = 2, 2, 2
    # Compilation is nearly all of a tiny run (about 30 jitted functions per K).
    args.compiler_options = {"xla_backend_optimization_level": 0}
  if args.only:
    unknown = sorted(set(args.only) - set(variant_names(args.lazy_every)))
    if unknown:
      parser.error(f"--only: unknown name(s) {', '.join(unknown)}; known: {', '.join(variant_names(args.lazy_every))}")
  if args.peers is None:
    args.peers = not args.tiny and not args.only
  if args.breakdown_ks is None:
    args.breakdown_ks = [] if args.only else list(args.ks)
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  result = run(args)
  model = "" if args.model == "mlp" else f"{args.model}_"
  path = common.write(result, args.out, f"train_step_{model}{result['environment']['platform']}.json")
  plot(result, path.with_suffix(".png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")
  return result


if __name__ == "__main__":
  main()
