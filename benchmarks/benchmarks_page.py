"""Writes ``docs/benchmarks.md``, the benchmarks page, from the current results files.

  python benchmarks/benchmarks_page.py           # rewrite docs/benchmarks.md
  python benchmarks/benchmarks_page.py --check   # exit 1 when docs/benchmarks.md is not what it would write

Every number on the page comes from a results file: ``benchmarks/results/*.json``
(the scripts of ``benchmarks/``) and ``docs/results/*.json``
(``examples/mtl_benchmark.py``). ``tests/test_benchmarks_page.py`` runs the
check, so the page cannot drift from the files: after a new run, rerun this
script and commit both.

Each section names its files, says in a short paragraph what is measured and
with which command, and gives the tables, the plots and each file's
environment. The command is the JSON's ``command`` where the file records
one. The train-step, gradient-path, weight-solver, memory and compile-time
files predate that field: their command is rebuilt here from the sizes and
settings they record, with every flag that equals the script's own default
(its ``parse([])``) left out; the page does not say which commands were
rebuilt.

Sections whose file is absent say how to produce it. A results JSON that no
section names goes under "Other results", rendered by its ``benchmark`` type
(the GPU suite's ``*_gpu.json``, until they get a section of their own; a
per-K part ``<name>_k<K>.json`` of a merged ``<name>.json`` is skipped); a JSON
of a type this script cannot render is an error, so no result sits in the
results folders without a table. Historical comparisons (before/after a fix,
allocator settings, ...) belong in commit messages and the CHANGELOG, not in
these folders.

Tables from other scripts' formatters: the digits problems' with
``examples/mtl_benchmark.py``'s ``markdown``, QM9's with
``benchmarks/qm9.py``'s ``markdown`` (and ``nash_official.py`` /
``qm9_peer.py``'s, should they define one), so the page and each script's own
Markdown never disagree.

Images are linked, not copied: a path relative to ``docs/benchmarks.md``
(``../benchmarks/results/x.png``, ``results/x.png``) resolves on GitHub, and
Sphinx with MyST copies an image from outside its source folder into
``_images`` like any other (checked with Sphinx 9 and myst-parser 5), so one
copy of each PNG serves both.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC_RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
REGENERATE = "python benchmarks/benchmarks_page.py"

# The reduced CPU protocol of benchmarks/qm9.py, and where its result goes.
QM9_COMMAND = ("python benchmarks/qm9.py --methods all --seeds 0 --train-size 4800 --val-size 1000"
               " --test-size 2000 --epochs 3 --dim 16 --out qm9_cpu"
               " && cp qm9_cpu/qm9.json benchmarks/results/qm9_cpu.json && cp qm9_cpu/*.png benchmarks/results/")


# ----------------------------------------------------------------------------- helpers


@functools.cache
def script(folder: str, name: str):
  """``folder/name.py`` as a module, named as ``tests/scripts.py`` names it (reused when already loaded)."""
  module_name = f"{folder}_{name}"
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def short_names() -> dict:
  return script("examples", "mtl_benchmark").SHORT


def method_name(name: str) -> str:
  return short_names().get(name, f"`{name}`")


def repo_path(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def link(path: pathlib.Path, page: pathlib.Path) -> str:
  return pathlib.Path(os.path.relpath(path, page.parent)).as_posix()


def table(head, rows) -> list[str]:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return lines + [""]


def ms(value) -> str:
  """Milliseconds to about three significant digits."""
  if value is None:
    return "-"
  if value >= 100:
    return f"{value:.0f} ms"
  if value >= 10:
    return f"{value:.1f} ms"
  if value >= 1:
    return f"{value:.2f} ms"
  return f"{value:.3g} ms"


def ratio(value, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def times(value) -> str:
  """A speed-up or slow-down factor."""
  if value >= 100:
    return f"{value:,.0f}x"
  return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def sci(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if math.isinf(value):
    return "inf"
  return f"{value:.1e}"


def environment(env: dict | None) -> str:
  """One line from a result's ``environment`` record (no commit: the page describes the files, not history)."""
  if not env:
    return "not recorded in the file."
  count = env.get("device_count")
  parts = [f"{env.get('platform')} (device kind `{env.get('device_kind')}`"
           + (f", {count} device{'s' * (count != 1)})" if count is not None else ")")]
  if env.get("cpu_count") is not None:
    cpu = f"{env['cpu_count']} CPU cores" + (f" ({env['cpu_model']})" if env.get("cpu_model") else "")
    parts.append(cpu + (f", {env['machine']}" if env.get("machine") else ""))
  versions = [f"{label} {env[key]}" for key, label in (
      ("python", "Python"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("optax", "optax"), ("numpy", "numpy"),
      ("optax_mtl", "optax_mtl")) if env.get(key)]
  if versions:
    parts.append(", ".join(versions))
  if "process_env" not in env:
    parts.append("process settings not recorded")
  elif env["process_env"]:
    parts.append("process settings " + " ".join(f"`{k}={v}`" for k, v in env["process_env"].items()))
  else:
    parts.append("no process settings")
  if env.get("date"):
    parts.append(env["date"])
  return "; ".join(parts) + "."


def env_prefix(result: dict) -> str:
  process_env = (result.get("environment") or {}).get("process_env") or {}
  return "".join(f"{k}={shlex.quote(v)} " for k, v in process_env.items())


def flag(args: list, name: str, value, default) -> None:
  if value != default:
    args += [name, *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]


def image(path: pathlib.Path, alt: str, page: pathlib.Path) -> list[str]:
  return [f"![{alt}]({link(path, page)})", ""] if path.exists() else []


def files_line(paths) -> str:
  return "Results: " + ", ".join(f"`{repo_path(p)}`" for p in paths) + "."


def environment_lines(loaded) -> list[str]:
  if len(loaded) == 1:
    return [f"Environment: {environment(loaded[0][1].get('environment'))}", ""]
  return (["Environment:", ""]
          + [f"- `{path.name}`: {environment(result.get('environment'))}" for path, result in loaded] + [""])


def load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------- commands


def train_step_command(result: dict, path: pathlib.Path) -> str:
  if "command" in result:
    return result["command"]
  defaults = script("benchmarks", "train_step").parse([])
  sizes, settings, rows = result["sizes"], result["settings"], result["rows"]
  only = settings.get("only")
  ks = [row["K"] for row in rows]
  args: list = []
  flag(args, "--model", sizes["model"], defaults.model)
  flag(args, "--batch", sizes["batch"], defaults.batch)
  if sizes["model"] == "mlp":
    flag(args, "--features", sizes["input_shape"][0], defaults.features)
  else:
    flag(args, "--image-size", sizes["input_shape"][0], defaults.image_size)
  flag(args, "--width", sizes["width"], defaults.width)
  flag(args, "--depth", sizes["depth"], defaults.depth)
  flag(args, "--head-dim", sizes["head_dim"], defaults.head_dim)
  args += ["--ks", *map(str, ks)]
  flag(args, "--repeats", settings["repeats"], defaults.repeats)
  flag(args, "--peer-repeats", settings["peer_repeats"], defaults.peer_repeats)
  flag(args, "--num-batches", settings["batches_rotated"], defaults.num_batches)
  if not only:
    prefix = "task_gradients_nash_mtl_every_"
    every = sorted({int(name[len(prefix):]) for row in rows for name in row["cheap_paths"]
                    if name.startswith(prefix) and not name.endswith("_host")})
    flag(args, "--lazy-every", every, sorted(defaults.lazy_every))
  flag(args, "--jacobian-batch-size", settings["jacobian_batch_size"], defaults.jacobian_batch_size)
  peers = result["peers"]
  args.append("--peers" if "versions" in peers else "--no-peers")
  if "versions" in peers:
    env = result.get("environment") or {}
    flag(args, "--torch-threads", peers.get("torch_threads"), env.get("cpu_count"))
    flag(args, "--torch-device", peers.get("torch_device"), "cuda" if env.get("platform") == "gpu" else "cpu")
  if only:
    args += ["--only", *only]
  breakdown = [row["K"] for row in rows if "breakdown" in row]
  flag(args, "--breakdown-ks", breakdown, [] if only else ks)
  args += ["--out", repo_path(path)]
  return env_prefix(result) + "python benchmarks/train_step.py " + " ".join(args)


def gradient_paths_command(result: dict, path: pathlib.Path) -> str:
  if "command" in result:
    return result["command"]
  defaults = script("benchmarks", "gradient_paths").parse([])
  sizes = result["sizes"]
  args: list = []
  for name, key, default in (("--tasks", "num_tasks", defaults.tasks), ("--batch", "batch", defaults.batch),
                             ("--features", "features", defaults.features), ("--width", "width", defaults.width),
                             ("--depth", "depth", defaults.depth), ("--head-dim", "head_dim", defaults.head_dim)):
    flag(args, name, sizes[key], default)
  flag(args, "--repeats", next(iter(result["results"].values()))["repeats"], defaults.repeats)
  args += ["--out", repo_path(path)]
  return env_prefix(result) + "python benchmarks/gradient_paths.py " + " ".join(args)


def weight_solvers_command(result: dict, path: pathlib.Path) -> str:
  if "command" in result:
    return result["command"]
  defaults = script("benchmarks", "weight_solvers").parse([])
  rows = result["rows"]
  settings = result.get("settings") or {}
  methods = settings.get("methods") or list(dict.fromkeys(row["method"] for row in rows))
  ks = settings.get("ks") or sorted({row["K"] for row in rows})
  repeats = settings.get("repeats") or next(v["repeats"] for k, v in rows[0]["solvers"].items() if k != "torchjd")
  args: list = []
  flag(args, "--methods", methods, defaults.methods)
  flag(args, "--ks", ks, defaults.ks)
  flag(args, "--repeats", repeats, defaults.repeats)
  args += ["--out", repo_path(path)]
  return env_prefix(result) + "python benchmarks/weight_solvers.py " + " ".join(args)


def memory_command(result: dict, path: pathlib.Path) -> str:
  if "command" in result:
    return result["command"]
  defaults = script("benchmarks", "memory").parse([])
  sizes, rows = result["sizes"], result["rows"]
  args: list = []
  flag(args, "--ks", [row["K"] for row in rows], defaults.ks)
  flag(args, "--search-ks", [row["K"] for row in rows if "largest_trunk" in row], defaults.search_ks)
  flag(args, "--paths", list(rows[0]["paths"]), defaults.paths)
  searched = next((list(row["largest_trunk"]) for row in rows if "largest_trunk" in row), None)
  if searched is not None:
    flag(args, "--search-paths", searched, defaults.search_paths)
  for name, key in (("--batch", "batch"), ("--features", "features"), ("--width", "width"), ("--depth", "depth"),
                    ("--head-dim", "head_dim")):
    flag(args, name, sizes[key], getattr(defaults, key))
  measured = [e["measured_peak_bytes"] for row in rows for e in row["paths"].values()]
  if result["environment"].get("platform") != "cpu" and all(m is None for m in measured):
    args.append("--no-measure")
  args += ["--out", repo_path(path)]
  return env_prefix(result) + "python benchmarks/memory.py " + " ".join(args)


def compile_time_command(result: dict, path: pathlib.Path) -> str:
  if "command" in result:
    return result["command"]
  module = script("benchmarks", "compile_time")
  defaults = module.parse([])
  sizes, rows = result["sizes"], result["rows"]
  args: list = []
  flag(args, "--depths", sizes["depths"], defaults.depths)
  flag(args, "--width", sizes["width"], defaults.width)
  flag(args, "--tasks", sizes["num_tasks"], defaults.tasks)
  flag(args, "--batch", sizes["batch"], defaults.batch)
  flag(args, "--head-dim", sizes["head_dim"], defaults.head_dim)
  flag(args, "--repeats", next(iter(rows[0]["steps"].values()))["repeats"], defaults.repeats)
  steps = list(rows[0]["steps"])
  if steps != list(module.STEPS):
    args += ["--only", *(s for s in steps if s != "sum_grad")]
  args += ["--out", repo_path(path)]
  return env_prefix(result) + "python benchmarks/compile_time.py " + " ".join(args)


# ----------------------------------------------------------------------------- train step


def _variant(name: str, settings: dict) -> tuple[str, str]:
  """(row label, gradient path) of a train-step variant."""
  paths = settings.get("paths", {})
  if name == "sum_grad":
    return "`jax.grad` of the sum", "one backward pass, no optax_mtl"
  if name == "ls_jacobian":
    return "LS", "Jacobian"
  if name in paths:
    return method_name(name), {"jacobian": "Jacobian", "lazy": "lazy"}.get(paths[name], paths[name])
  match = re.fullmatch(r"task_gradients_nash_mtl_every_(\d+)(_host)?", name)
  if match:
    every, host = match.groups()
    if every == "1":
      return "Nash-MTL", "lazy, refreshed every step"
    return f"Nash-MTL, k = {every}", "lazy, cached weights, " + ("the loop's choice" if host else "`lax.cond`")
  match = re.fullmatch(r"feature_level_(\w+?)(_per_task_heads)?", name)
  if match:
    method, per_task = match.groups()
    return method_name(method) + "-UB", "feature level" + (", `per_task_heads`" if per_task else "")
  match = re.fullmatch(r"through_representation_(\w+)", name)
  if match:
    return method_name(match.group(1)), "through `z` (`level=\"parameters\"`)"
  return f"`{name}`", "-"


PEER_LABELS = {"torch_sum": "PyTorch `sum().backward()`", "nash_mtl_official": "official Nash-MTL step"}


def _peer_label(name: str) -> str:
  if name in PEER_LABELS:
    return PEER_LABELS[name]
  if name.startswith("torchjd_"):
    return "TorchJD " + ("Mean" if name == "torchjd_mean" else method_name(name[len("torchjd_"):]))
  return f"`{name}`"


def train_step_ratio_table(rows: list[dict], settings: dict) -> list[str]:
  """Step time over LS's in the same round, one row per variant, one column per K (LS in ms on top)."""
  ks = [row["K"] for row in rows]
  names: dict[str, None] = {}
  for group in ("references", "methods", "cheap_paths"):
    for row in rows:
      names.update(dict.fromkeys(n for n in row[group] if n != "linear_scalarization"))
  # The cached paths together, by k, the cond before the loop's choice.
  matches = {n: re.fullmatch(r"task_gradients_nash_mtl_every_(\d+)(_host)?", n) for n in names}
  cached = sorted((n for n, m in matches.items() if m),
                  key=lambda n: (int(matches[n].group(1)), bool(matches[n].group(2))))
  first = next((i for i, n in enumerate(names) if n in cached), len(names))
  rest = [n for n in names if n not in cached]
  names = rest[:first] + cached + rest[first:]
  body = [["LS step", "lazy"] + [ms(row["methods"]["linear_scalarization"]["median_ms"]) for row in rows]]
  for name in names:
    entries = [row["methods"].get(name) or row["references"].get(name) or row["cheap_paths"].get(name)
               for row in rows]
    body.append(list(_variant(name, settings)) + [ratio(e["ratio_to_ls"]) if e else "-" for e in entries])
  return table(["step", "gradients", *(f"K = {k}" for k in ks)], body)


STAGES = {"backward": "one backward pass (LS's)", "jacobian": "the Jacobian (K backward passes)",
          "gram": "the Gram of the trunk", "combine": "`combine`", "optimizer": "Adam + `apply_updates`"}


def train_step_breakdown_table(rows: list[dict]) -> list[str]:
  rows = [row for row in rows if row.get("breakdown", {}).get("stages")]
  if not rows:
    return []
  names: dict[str, None] = {}
  for row in rows:
    names.update(dict.fromkeys(n for n in row["breakdown"]["stages"] if not n.endswith("_step")))
  order = [n for n in STAGES if n in names] + [n for n in names if n not in STAGES]
  body = []
  for name in order:
    label = STAGES.get(name) or ("weighting: " + method_name(name[len("weighting_"):])
                                 if name.startswith("weighting_") else f"`{name}`")
    body.append([label] + [ms(row["breakdown"]["stages"].get(name, {}).get("median_ms")) for row in rows])
  share = []
  for row in rows:
    nash = row["breakdown"].get("methods", {}).get("nash_mtl")
    share.append(f"{100 * (nash['gram_ms'] + nash['weighting_ms'] + nash['combine_ms']) / nash['step_ms']:.1f}%"
                 if nash and "step_ms" in nash else "-")
  if any(s != "-" for s in share):
    body.append(["aggregation (Gram + weighting + `combine`) over Nash-MTL's step"] + share)
  return table(["stage (each jitted alone)", *(f"K = {row['K']}" for row in rows)], body)


def train_step_cached_table(rows: list[dict]) -> list[str]:
  rows = [row for row in rows if row.get("breakdown", {}).get("cached")]
  if not rows:
    return []
  body = []
  for row in rows:
    c = row["breakdown"]["cached"]
    for prefix, label in (("", "`lax.cond`"), ("host_", "the loop's choice")):
      if prefix + "refresh_over_ls" in c:
        body.append([row["K"], c["update_weights_every"], label, ms(c["ls_step_ms"]),
                     ratio(c[prefix + "refresh_over_ls"]), ratio(c[prefix + "reuse_over_ls"], 3),
                     ratio(c[prefix + "cycle_over_ls"], 3)])
  return table(["K", "k", "choice", "LS step", "refresh step (x LS)", "reusing step (x LS)",
                "cycle of k from these (x LS)"], body)


def train_step_peer_table(rows: list[dict]) -> list[str]:
  rows_with = [row for row in rows if row.get("peers")]
  if not rows_with:
    return []
  names: dict[str, None] = {}
  for row in rows_with:
    names.update(dict.fromkeys(row["peers"]))
  body = []
  for name in names:
    entries = [row["peers"].get(name) for row in rows_with]
    method = next((e["method"] for e in entries if e and "method" in e), None)
    cells = []
    for e in entries:
      if not e or "median_ms" not in e:
        cells.append("not run" if e else "-")
        continue
      speedups = [f"{e[key]:.2f}x" for key in ("speedup_of_ours", "speedup_of_ours_through_representation")
                  if key in e]
      cells.append(f"{ms(e['median_ms'])} ({' / '.join(speedups)})" if speedups else ms(e["median_ms"]))
    body.append([_peer_label(name), method_name(method) if method else "-"] + cells)
  return table(["peer", "ours", *(f"K = {row['K']}" for row in rows_with)], body)


def _trunk(sizes: dict) -> str:
  if sizes["model"] == "mlp":
    return (f"an MLP trunk {sizes['input_shape'][0]} -> {sizes['width']} x {sizes['depth']} (ReLU,"
            f" {sizes['trunk_params']:,} parameters)")
  shape = "x".join(map(str, sizes["input_shape"]))
  return (f"the conv trunk of `benchmarks/conv_net.py` ({sizes['depth']} stride-2 3x3 convolutions up to"
          f" {sizes['width']} channels, global average pool, {sizes['trunk_params']:,} parameters) on {shape}"
          " images")


def _jacobian(settings: dict) -> str:
  size = settings.get("jacobian_batch_size")
  if size is None:
    return "vectorised (`batch_size=None`)"
  if size == 1:
    return "one at a time (`batch_size=1`)"
  return f"{size} at a time (`batch_size={size}`)"


def train_step_method(loaded) -> str:
  """What the tables of these files measure: only the parts that their rows hold."""
  result = loaded[0][1]
  sizes, settings, peers = result["sizes"], result["settings"], result["peers"]
  names = {n for _, r in loaded for row in r["rows"] for group in ("methods", "references", "cheap_paths")
           for n in row[group]}
  repeats = sorted({r["settings"]["repeats"] for _, r in loaded})
  text = (f"One jitted training step (per-task gradients, the transform, {settings['optimizer']},"
          f" `optax.apply_updates`) on {_trunk(sizes)} with K linear heads of {sizes['head_dim']} outputs, batch"
          f" {sizes['batch']}, timed round-robin with LS's step in the same process; median of"
          f" {' or '.join(map(str, repeats))}, each timed call after an untimed call of the same step, params and"
          " optimizer state carried over, batches rotated. LS and the methods that read only the losses take the"
          " lazy `task_gradients` (one backward pass)")
  jacobian = [n for n in names if settings.get("paths", {}).get(n) == "jacobian"] + (
      ["ls_jacobian"] if "ls_jacobian" in names else [])
  if jacobian:
    text += ", the Gram methods `value_and_jacobian` (K backward passes) with `shared=` the trunk"
  text += f"; the backward passes of every per-task path run {_jacobian(settings)}."
  every = sorted({int(n.split("_every_")[1].removesuffix("_host")) for n in names if "_every_" in n} - {1})
  if every:
    text += (" Cached rows: Nash-MTL on `task_gradients` with `update_weights_every = k` (k = "
             + ", ".join(map(str, every)) + "), the mean step over a cycle of k consecutive steps: one refresh"
             " (K backward passes) and k - 1 steps that reuse the weights (one backward pass)")
    if any(n.endswith("_host") for n in names):
      text += ("; with `lax.cond`, the step chooses; with the loop's choice, the training loop passes"
               " `refresh_weights=True` on the cycle's first step and `False` on the others, a static argument"
               " (two compiled steps, no conditional)")
    text += "."
  if any(n.startswith("feature_level_") for n in names):
    text += (" Feature-level rows: MGDA-UB and Aligned-MTL-UB on `feature_task_gradients` (the Gram of the"
             " representation's gradients), with the heads as one function or with `per_task_heads=K`.")
  if any(n.startswith("through_representation_") for n in names):
    text += (" Through `z`: the exact transform on `feature_task_gradients(..., per_task_heads=K,"
             " level=\"parameters\")`, the K backward passes through the trunk only.")
  if "versions" in peers:
    versions = ", ".join(f"{k} {v}" for k, v in peers["versions"].items() if v)
    layout = "; the conv trunk in NCHW with XLA's `SAME` padding" if sizes["model"] == "conv" else ""
    text += (f" Peers ({versions}; PyTorch on `{peers.get('torch_device')}`, {peers.get('torch_threads')} threads,"
             f" float32 matmul precision `{peers.get('torch_float32_matmul_precision')}`; the same model, initial"
             f" weights and batches{layout}; median of {settings['peer_repeats']}, timed after ours): a plain"
             " `sum().backward()` step, TorchJD's `mtl_backward` + `jac_to_grad` with each aggregator, and the"
             " official Nash-MTL step (K `autograd.grad` calls on the trunk, the cvxpy/ECOS solve, one backward"
             " pass of the weighted sum, the trunk's gradient clipped to norm 1).")
  return text


def train_step_section(loaded, page) -> list[str]:
  """One or more train-step files of the same model, as one set of tables (columns sorted by K)."""
  rows = sorted((row for _, result in loaded for row in result["rows"]), key=lambda row: row["K"])
  ks = [row["K"] for row in rows]
  if len(set(ks)) != len(ks):
    raise ValueError(f"{[p.name for p, _ in loaded]}: the same K in two files")
  settings = loaded[0][1]["settings"]
  lines = [train_step_method(loaded), "", files_line([p for p, _ in loaded]), ""]
  lines += ["Command" + "s" * (len(loaded) > 1) + ":", "", "```text"]
  lines += [train_step_command(result, path) for path, result in loaded] + ["```", ""]
  lines += ["Step time as a multiple of LS's step in the same round (first row: LS's step):", ""]
  lines += train_step_ratio_table(rows, settings)
  breakdown = train_step_breakdown_table(rows)
  if breakdown:
    lines += ["Stages, each jitted and timed alone (median ms):", ""] + breakdown
  cached = train_step_cached_table(rows)
  if cached:
    lines += ["The cached step split into its two kinds, each timed alone with LS's step in the same round"
              " (fixed inputs):", ""] + cached
  peers = train_step_peer_table(rows)
  if peers:
    lines += ["The peers: step time, and in parentheses how many times our step of the same method is faster"
              " (on the per-task Jacobian / through `z`):", ""] + peers
  for path, _ in loaded:
    lines += image(path.with_suffix(".png"), f"train step, {path.stem}", page)
  return lines + environment_lines(loaded)


# ----------------------------------------------------------------------------- gradient paths

GRADIENT_PATHS = {
    "ls": "LS: one backward pass of the summed loss",
    "cached": "`task_gradients`, a step that reuses the weights",
    "feature_level": "feature level (`feature_task_gradients`)",
    "jacobian_chunked": "Jacobian, `batch_size=1` (sequential)",
    "streamed_gram": "streamed Gram (`task_gradients(store_jacobian=False)`)",
    "jacobian": "Jacobian, vectorised (`batch_size=K`)",
    "lazy_refresh": "`task_gradients`, a refresh step",
}


def gradient_paths_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  sizes, timings = result["sizes"], result["results"]
  repeats = next(iter(timings.values()))["repeats"]
  lines = [f"One jitted train step (gradients, aggregation, Adam) per gradient path on an MLP trunk"
           f" {sizes['features']} -> {sizes['width']} x {sizes['depth']} ({sizes['trunk_params']:,} parameters)"
           f" with K = {sizes['num_tasks']} heads of {sizes['head_dim']} outputs, batch {sizes['batch']}, the"
           f" weighting {result['weighting']}; timed round-robin, median of {repeats}, each timed call after an"
           " untimed call of the same step. The lazy and feature-level paths use the default `batch_size=None`.",
           "", files_line([path]), "", "```text", gradient_paths_command(result, path), "```", ""]
  ordered = sorted(timings.items(), key=lambda item: item[1]["ratio_to_ls"])
  body = [[GRADIENT_PATHS.get(name, f"`{name}`"), ms(e["median_ms"]), ratio(e["ratio_to_ls"])] for name, e in ordered]
  lines += table(["path", "median", "x LS"], body)
  return lines + environment_lines(loaded)


# ----------------------------------------------------------------------------- weight solvers

SOLVER_METHODS = {"nash": "Nash-MTL", "mgda": "MGDA", "aligned": "Aligned-MTL", "imtl_g": "IMTL-G",
                  "cagrad": "CAGrad (c = 0.5)", "upgrad": "UPGrad", "dualproj": "DualProj", "pcgrad": "PCGrad",
                  "gradvac": "GradVac"}


def _error_definition(result: dict, method: str) -> str | None:
  for key, text in (result.get("error") or {}).items():
    if method in key.split("/"):
      return text
  return None


def weight_solver_table(result: dict, method: str) -> list[str]:
  rows = [row for row in result["rows"] if row["method"] == method]
  solvers = list(dict.fromkeys(name for row in rows for name in row["solvers"]))
  ours = [s for s in solvers if s != "torchjd"]
  by_k: dict[int, dict] = {}
  for row in rows:
    by_k.setdefault(row["K"], {})[row["matrix"]] = row

  def pair(k, fn):
    cells = [fn(by_k[k][kind]) if kind in by_k[k] else "-" for kind in ("gaussian", "scale")]
    return " / ".join(cells)

  def time_of(name):
    return lambda row: ms(row["solvers"][name]["median_ms"]).removesuffix(" ms") if name in row["solvers"] else "-"

  def error_of(name):
    return lambda row: sci(row["solvers"][name].get("error")) if name in row["solvers"] else "-"

  head = ["K", *(f"{n} (ms)" for n in ours)]
  if "torchjd" in solvers:
    head += ["TorchJD (ms)", f"TorchJD / {ours[0]}"]
  head += [f"error {n}" for n in solvers if n != "torchjd"] + (["error TorchJD"] if "torchjd" in solvers else [])
  body = []
  for k in sorted(by_k):
    cells = [str(k)] + [pair(k, time_of(n)) for n in ours]
    if "torchjd" in solvers:
      cells += [pair(k, time_of("torchjd")),
                pair(k, lambda row: times(row["speedup_vs_torchjd"]) if "speedup_vs_torchjd" in row else "-")]
    cells += [pair(k, error_of(n)) for n in ours] + ([pair(k, error_of("torchjd"))] if "torchjd" in solvers else [])
    body.append(cells)
  return table(head, body)


def weight_solvers_section(loaded, page) -> list[str]:
  lines = ["Each weighting alone on a K x K Gram, jitted, a call including dispatch, against TorchJD's weighting on"
           " the same matrix (float64, its solver state already built). Two matrices per K: Gaussian rows, and rows"
           " of norms spanning 1e-3 to 1e3 (\"scale\"); every cell is gaussian / scale. Ours run in float32. Errors"
           " are computed in float64; their definitions are under each table.", "",
           files_line([p for p, _ in loaded]), "", "```text"]
  lines += [weight_solvers_command(result, path) for path, result in loaded] + ["```", ""]
  for path, result in loaded:
    settings = result.get("settings") or {}
    peers = result.get("peers")
    methods = list(dict.fromkeys(row["method"] for row in result["rows"]))
    repeats = settings.get("repeats") or next(
        v["repeats"] for k, v in result["rows"][0]["solvers"].items() if k != "torchjd")
    peer_repeats = settings.get("peer_repeats") or next(
        (v["repeats"] for row in result["rows"] for k, v in row["solvers"].items() if k == "torchjd"), None)
    versions = (", ".join(f"{k} {v}" for k, v in peers.items() if v) if peers else "versions not recorded in the file")
    lines += [f"`{path.name}`: median of {repeats} calls for ours, of {peer_repeats} for TorchJD ({versions}).", ""]
    for method in methods:
      lines += [f"**{SOLVER_METHODS.get(method, method)}**", ""] + weight_solver_table(result, method)
      definition = _error_definition(result, method)
      if definition:
        lines += [f"Error: {definition}.", ""]
    lines += image(path.with_suffix(".png"), f"weight solvers, {path.stem}", page)
  return lines + environment_lines(loaded)


# ----------------------------------------------------------------------------- memory


def _memory_path(name: str, settings: dict) -> str:
  match = re.fullmatch(r"jacobian_chunked_(\d+)", name)
  if match:
    return f"Jacobian, `batch_size={match.group(1)}`"
  return {"sum_grad": "`jax.grad` of the sum", "jacobian": "Jacobian, vectorised",
          "streamed": "streamed Gram (`store_jacobian=False`)",
          "cached": f"cached (`task_gradients`, k = {settings.get('cached_every')})",
          "feature_level": "feature level (MGDA-UB)"}.get(name, f"`{name}`")


def _mib(value) -> str:
  return f"{value / 2**20:.1f} MiB"


def memory_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  sizes, settings, rows = result["sizes"], result["settings"], result["rows"]
  budget = result["budget"]
  lines = [f"Peak memory of one jitted train step ({settings['method']}; {settings['optimizer']}; "
           f"{settings['donated']} donated) on the MLP of the gradient paths ({sizes['features']} -> "
           f"{sizes['width']} x {sizes['depth']}, batch {sizes['batch']}, heads of {sizes['head_dim']} outputs), from"
           " XLA's buffer assignment of the compiled program (arguments + outputs + temporaries - donated"
           " aliases), as MiB and as a multiple of the plain `jax.grad` step. Then the largest trunk (depth"
           f" {sizes['depth']}, width a multiple of 64) whose compiled peak fits in {budget['bytes'] / 2**30:.1f} GiB"
           f" ({budget['source']}).", "", files_line([path]), "", "```text", memory_command(result, path), "```", ""]
  names = list(dict.fromkeys(n for row in rows for n in row["paths"]))
  body = [[_memory_path(n, settings)] + [
      f"{_mib(row['paths'][n]['compiled_peak_bytes'])} ({row['paths'][n]['ratio_to_sum_grad']:.2f}x)"
      if n in row["paths"] else "-" for row in rows] for n in names]
  lines += table(["path", *(f"K = {row['K']}" for row in rows)], body)
  measured = any(isinstance(e.get("measured_peak_bytes"), int) for row in rows for e in row["paths"].values())
  if measured:
    body = [[_memory_path(n, settings)] + [
        _mib(row["paths"][n]["measured_peak_bytes"]) if isinstance(row["paths"].get(n, {}).get("measured_peak_bytes"),
                                                                   int) else "-" for row in rows] for n in names]
    lines += ["The allocator's peak while a fresh process runs two steps:", ""]
    lines += table(["path", *(f"K = {row['K']}" for row in rows)], body)
  else:
    lines += ["The allocator's own peak is not reported on this platform.", ""]
  for row in rows:
    if "largest_trunk" not in row:
      continue
    body = []
    for n, e in row["largest_trunk"].items():
      if e.get("width"):
        body.append([_memory_path(n, settings), e["width"], f"{e['trunk_params'] / 1e6:,.0f}M",
                     f"{e['compiled_peak_bytes'] / 2**30:.2f} GiB"])
      else:
        body.append([_memory_path(n, settings), "-", "-", e.get("note", "-")])
    lines += [f"Largest trunk at K = {row['K']}:", ""]
    lines += table(["path", "width", "trunk parameters", "compiled peak"], body)
  return lines + environment_lines(loaded)


# ----------------------------------------------------------------------------- compile time


def _compile_step(name: str, cached_every) -> str:
  return {"sum_grad": "`jax.grad` of the sum", "linear_scalarization": "LS (lazy)",
          "nash_mtl_cached": f"Nash-MTL cached, k = {cached_every}",
          "feature_level_mgda": "feature level MGDA-UB"}.get(name) or method_name(name)


def compile_time_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  sizes, rows = result["sizes"], result["rows"]
  cached_every = script("benchmarks", "compile_time").CACHED_EVERY
  repeats = next(iter(rows[0]["steps"].values()))["repeats"]
  lines = [f"Trace + compile seconds of one train step with Adam, built from fresh caches, on an MLP trunk of width"
           f" {sizes['width']} and depth " + ", ".join(map(str, sizes["depths"])) + f" with K = {sizes['num_tasks']}"
           f" heads (batch {sizes['batch']}), so " + ", ".join(str(row["leaves"]) for row in rows) + " leaves;"
           f" {repeats} build{'s' * (repeats != 1)} each (median). In parentheses: thousands of HLO instructions in"
           " the compiled program. The Gram methods take `value_and_jacobian` with `shared=` the trunk.",
           "", files_line([path]), "", "```text", compile_time_command(result, path), "```", ""]
  names = list(dict.fromkeys(n for row in rows for n in row["steps"]))
  body = []
  for n in names:
    cells = []
    for row in rows:
      e = row["steps"].get(n)
      cells.append(f"{e['trace_s'] + e['compile_s']:.1f} s ({e['instructions'] / 1e3:.1f}k)" if e else "-")
    body.append([_compile_step(n, cached_every)] + cells)
  lines += table(["step", *(f"{row['leaves']} leaves" for row in rows)], body)
  deepest = rows[-1]
  if any("data_dependent_loops" in e for e in deepest["steps"].values()):
    body = [[_compile_step(n, cached_every), e.get("while_loops", "-"), e.get("data_dependent_loops", "-")]
            for n, e in deepest["steps"].items()]
    lines += [f"While loops in the compiled program ({deepest['leaves']} leaves); a data-dependent one has a trip"
              " count XLA does not know:", ""]
    lines += table(["step", "while loops", "data-dependent"], body)
  return lines + environment_lines(loaded)


# ----------------------------------------------------------------------------- real data

DIGITS_PROBLEMS = {
    "multimnist": ("MultiMNIST on 8x8 digits: one digit top-left and another bottom-right of a 12x12 canvas"
                   " (overlapping 4x4); tasks: the left and the right digit (accuracy)."),
    "digits_attributes": ("A digit shifted at random on a 10x10 canvas with Gaussian noise (sigma 0.2); five"
                          " tasks of mixed losses and scales: class (10-way), parity, >= 5 (accuracy), ink mass and"
                          " centre of mass (regression, MSE)."),
}


def digits_section(loaded, page) -> list[str]:
  mtl_benchmark = script("examples", "mtl_benchmark")
  first = loaded[0][1]
  cfg = first["config"]
  lines = [f"`examples/mtl_benchmark.py` trains every method (default hyperparameters, `shared=` the trunk, chained"
           f" before {cfg['optimizer']}({cfg['lr']}), batch {cfg['batch']}, {cfg['steps']} steps) and single-task"
           " baselines (STL: one network per task, trained the same way) on problems built from scikit-learn's"
           " `load_digits` (`examples/datasets.py`; the source images are split 60/15/25 into train/val/test before"
           f" they are combined). Model: {cfg['model']} (Flax NNX). Δm% is nash-mtl's: the mean over the metrics of"
           " the signed relative difference to STL, lower is better; ± is the standard deviation over seeds; MR is"
           " the mean rank among the multi-task methods. Test metrics after the last step (no model selection).", ""]
  for path, result in loaded:
    problem = result["problem"]
    sizes = result["sizes"]
    lines += [f"### {problem}", "", DIGITS_PROBLEMS.get(problem, ""),
              f"Train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']}.", "",
              files_line([path]) + f" Command ({result['wall_s']:.0f} s for this problem):", "", "```text",
              result["command"], "```", ""]
    lines += mtl_benchmark.markdown(result).rstrip("\n").split("\n") + [""]
    for suffix, alt in (("curves", "validation curves"), ("weights", "task weights"),
                        ("condition", "condition number of the trunk's Gram")):
      lines += image(path.with_name(f"{problem}_{suffix}.png"), f"{problem}: {alt}", page)
    lines += [f"Environment: {environment(result.get('environment'))}", ""]
  return lines


# ----------------------------------------------------------------------------- QM9 and the Nash-MTL runs


def _markdown_of(folder: str, name: str):
  """The script's own ``markdown(result)``, or None where it has none (checked without importing it)."""
  path = ROOT / folder / f"{name}.py"
  if path.exists() and re.search(r"^def markdown\(", path.read_text(), flags=re.M):
    return script(folder, name).markdown
  return None


def _pngs(prefix: str, exclude: tuple[str, ...] = ()) -> list[pathlib.Path]:
  return sorted(p for p in RESULTS.glob(f"{prefix}*.png") if not p.name.startswith(exclude))


def qm9_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  lines = ["`benchmarks/qm9.py`: the QM9 benchmark of the Nash-MTL paper (11 regression targets, PyG's MPNN in"
           " JAX, the plateau schedule, the test MAE at the best validation Δm%) with every method and STL.", "",
           files_line([path]) + " Command:", "", "```text", result.get("command", "-"), "```", ""]
  lines += script("benchmarks", "qm9").markdown(result).rstrip("\n").split("\n") + [""]
  for png in _pngs("qm9", ("qm9_peer",)):
    lines += image(png, png.stem.replace("_", " "), page)
  return lines + environment_lines(loaded)


def qm9_peer_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  lines = ["`benchmarks/qm9_peer.py`: the QM9 MPNN of `qm9.py` against PyTorch Geometric + TorchJD on the same"
           " weights and batch: first the fidelity (predictions, per-task losses and the gradient of their sum),"
           " then one training step's time, ours and the peer's interleaved.", "",
           files_line([path]) + " Command" + "s" * (len(result.get("commands", [])) > 1) + ":", "", "```text",
           *(result.get("commands") or [result.get("command", "-")]), "```", ""]
  markdown = _markdown_of("benchmarks", "qm9_peer")
  if markdown is not None:
    lines += markdown(result).rstrip("\n").split("\n") + [""]
  else:
    body = []
    for row in result["rows"]:
      t, f = row.get("timings", {}), row["fidelity"]
      r = row.get("ratios_peer_over_ours", {})
      cell = lambda name: ms(t[name]["median_ms"]) if name in t else "-"  # noqa: E731
      body.append([row["dim"], cell("ours_nash_mtl"), cell("peer_nash_mtl"),
                   f"{r['nash_mtl']:.2f}x" if "nash_mtl" in r else "-", cell("ours_linear_scalarization"),
                   cell("peer_linear_scalarization"),
                   f"{r['linear_scalarization']:.2f}x" if "linear_scalarization" in r else "-",
                   f"{sci(f['predictions_max_rel'])} / {sci(f['losses_max_rel'])} / {sci(f['grad_of_sum_max_rel'])}"])
    lines += table(["dim", "ours Nash-MTL", "peer Nash-MTL", "peer / ours", "ours LS", "peer LS", "peer / ours",
                    "fidelity: max rel. predictions / losses / gradient"], body)
    if result.get("versions"):
      lines += ["Peer versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".", ""]
  for png in _pngs("qm9_peer"):
    lines += image(png, png.stem.replace("_", " "), page)
  return lines + environment_lines(loaded)


def nash_official_section(loaded, page) -> list[str]:
  path, result = loaded[0]
  lines = ["`benchmarks/nash_official.py`: on the five-task digits problem, the Gram of every step of an"
           " `optax_mtl.nash_mtl` training run, fed open loop to the official Nash-MTL weighting (TorchJD's port of"
           " the cvxpy/ECOS CCP), to ours and to ours with `regularization`; the weights compared, and the digits row redone.", "",
           files_line([path]) + " Command:", "", "```text", result.get("command", "-"), "```", ""]
  markdown = _markdown_of("benchmarks", "nash_official")
  if markdown is not None:
    lines += markdown(result).rstrip("\n").split("\n") + [""]
  else:
    s = result["summary"]
    ours, capped = s["ours_vs_official"], s["capped_vs_official"]
    res = s["residual"]

    def row(label, fn):
      return [label, fn(ours, "ours", "ours"), fn(capped, "ours", "capped"), fn(ours, "official", "official")]

    body = [row("largest weight", lambda d, side, _: f"{d['max_weight'][side]:.3g}"),
            row("step of the largest weight", lambda d, side, _: str(d["step_of_max"][side])),
            row("largest max / median weight of a step", lambda d, side, _: f"{d['max_over_median_weight'][side]:.3g}"),
            row("residual max_i abs(a_i (M a)_i - 1) of a step: median / max",
                lambda d, _, key: f"{sci(res[key]['median'])} / {sci(res[key]['max'])}")]
    lines += table(["", "ours", f"ours, cap = {result.get('cap')}", "official"], body)
    official = result.get("official", {})
    if official:
      lines += [f"Official solver: {official.get('ecos_solves')} ECOS solves, statuses "
                + ", ".join(f"{k} {v}" for k, v in official.get("ecos_status_counts", {}).items())
                + "; stop reasons " + ", ".join(f"{k} {v}" for k, v in official.get("stop_reason_counts", {}).items())
                + f"; {official.get('exceptions')} exceptions.", ""]
    if result.get("versions"):
      lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".", ""]
  for png in _pngs("nash_official"):
    lines += image(png, png.stem.replace("_", " "), page)
  if "environment" in result:
    lines += environment_lines(loaded)
  return lines


# ----------------------------------------------------------------------------- the page

# (title, files, renderer, how to produce it when absent). Files: paths under the repository.
SECTIONS = [
    ("Gradient paths", ["benchmarks/results/gradient_paths_cpu.json"], gradient_paths_section,
     "python benchmarks/gradient_paths.py"),
    ("Train step: MLP, every method and the PyTorch peers", ["benchmarks/results/train_step_cpu.json"],
     train_step_section, "OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --jacobian-batch-size 1"),
    ("Train step: 10M-parameter MLP and the PyTorch peers",
     ["benchmarks/results/train_step_10m_cpu.json", "benchmarks/results/train_step_10m_k3_cpu.json"],
     train_step_section, "OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --width 1792 --ks 2 3 10"
     " --repeats 5 --peer-repeats 5 --jacobian-batch-size 1 --out benchmarks/results/train_step_10m_cpu.json"),
    ("Train step: conv trunk, every method", ["benchmarks/results/train_step_conv_cpu.json"], train_step_section,
     "python benchmarks/train_step.py --model conv --batch 32 --ks 2 3 10 --repeats 5 --no-peers --breakdown-ks 10"),
    ("Train step: conv trunk against the PyTorch peers", ["benchmarks/results/train_step_conv_peers_cpu.json"],
     train_step_section, "OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --model conv --batch 32 --ks 2 10"
     " --repeats 5 --peer-repeats 5 --peers --only sum_grad nash_mtl mgda aligned_mtl upgrad pcgrad cagrad"
     " --out benchmarks/results/train_step_conv_peers_cpu.json"),
    ("Cached weights: `lax.cond` or the loop's choice, conv trunk",
     ["benchmarks/results/train_step_conv_host_cached_cpu.json",
      "benchmarks/results/train_step_conv_host_cached_k40_cpu.json"], train_step_section,
     "python benchmarks/train_step.py --model conv --batch 32 --ks 2 3 10 --repeats 5 --no-peers --breakdown-ks 10"
     " --only task_gradients_nash_mtl_every_50 task_gradients_nash_mtl_every_5_host"
     " task_gradients_nash_mtl_every_50_host --out benchmarks/results/train_step_conv_host_cached_cpu.json"),
    ("Cached weights: `lax.cond` or the loop's choice, 10M-parameter MLP",
     ["benchmarks/results/train_step_10m_host_cached_cpu.json"], train_step_section,
     "python benchmarks/train_step.py --width 1792 --ks 10 --repeats 5 --jacobian-batch-size 1 --no-peers --only"
     " task_gradients_nash_mtl_every_50 task_gradients_nash_mtl_every_50_host --breakdown-ks 10"
     " --out benchmarks/results/train_step_10m_host_cached_cpu.json"),
    ("Weight solvers", ["benchmarks/results/weight_solvers_cpu.json",
                        "benchmarks/results/weight_solvers_baselines_cpu.json"], weight_solvers_section,
     "python benchmarks/weight_solvers.py"),
    ("Memory", ["benchmarks/results/memory_cpu.json"], memory_section, "python benchmarks/memory.py"),
    ("Compile time", ["benchmarks/results/compile_time_cpu.json"], compile_time_section,
     "python benchmarks/compile_time.py"),
    ("Real data: two problems from scikit-learn's digits",
     ["docs/results/multimnist.json", "docs/results/digits_attributes.json"], digits_section,
     "python examples/mtl_benchmark.py --problem multimnist digits_attributes --seeds 0 1 2 --steps 2000"
     " --eval-every 100 --out docs/results"),
    ("QM9", ["benchmarks/results/qm9_cpu.json"], qm9_section, QM9_COMMAND),
    ("QM9: the MPNN against PyTorch Geometric + TorchJD", ["benchmarks/results/qm9_peer_cpu.json"], qm9_peer_section,
     None),
    ("Nash-MTL against the official weighting under vanishing gradients",
     ["benchmarks/results/nash_official_cpu.json"], nash_official_section, None),
]

# benchmark type -> renderer, for the files no section names.
BY_TYPE = {"train_step": train_step_section, "gradient_paths": gradient_paths_section,
           "weight_solvers": weight_solvers_section, "memory": memory_section,
           "compile_time": compile_time_section, "qm9": qm9_section, "qm9_peer": qm9_peer_section}


def result_files() -> list[pathlib.Path]:
  return sorted([*RESULTS.glob("*.json"), *DOC_RESULTS.glob("*.json")])


def unclaimed(claimed: set[pathlib.Path]) -> list[tuple[pathlib.Path, dict, object]]:
  out = []
  for path in result_files():
    if path in claimed:
      continue
    part = re.fullmatch(r"(.*)_k\d+\.json", path.name)
    if part and path.with_name(part.group(1) + ".json").exists():
      continue  # a per-K part of a merged train-step file
    result = load(path)
    kind = result.get("benchmark") or ("mtl_benchmark" if "problem" in result and "stl" in result else None)
    renderer = digits_section if kind == "mtl_benchmark" else BY_TYPE.get(kind)
    if renderer is None:
      raise ValueError(f"{repo_path(path)}: no section of {repo_path(pathlib.Path(__file__))} renders this file"
                       f" (benchmark type {kind!r}); give it one, or delete the file if no current table needs it")
    out.append((path, result, renderer))
  return out


HEADER = ("# Benchmarks\n\n"
          "Every table and plot on this page is generated by `benchmarks/benchmarks_page.py` from the results files"
          f" named in its section (`benchmarks/results/`, `docs/results/`); after a new run, `{REGENERATE}` rewrites"
          " the page, and the test suite fails while the page differs from what the files give. Times are medians"
          " after compilation. A ratio to LS divides by LS's step timed in the same round of the same process. Each"
          " file's environment is the one it records.\n")


def render(page: pathlib.Path = PAGE) -> str:
  lines = [HEADER]
  claimed: set[pathlib.Path] = set()
  for title, names, renderer, produce in SECTIONS:
    paths = [ROOT / name for name in names]
    claimed.update(paths)
    present = [(p, load(p)) for p in paths if p.exists()]
    if not present and produce is None:
      continue
    lines += [f"## {title}", ""]
    if present:
      lines += renderer(present, page)
    else:
      lines += [f"Not run yet: `{names[0]}` is absent. It is produced by", "", "```text", produce, "```", "",
                f"then `{REGENERATE}` adds its tables here.", ""]
  others = unclaimed(claimed)
  if others:
    lines += ["## Other results", ""]
    for path, result, renderer in others:
      lines += [f"### `{path.name}`", ""] + renderer([(path, result)], page)
  text = "\n".join(lines)
  return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv=None, page: pathlib.Path = PAGE) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help=f"exit 1 when {repo_path(PAGE)} differs from what this script would write")
  args = parser.parse_args(argv)
  text = render(page)
  if args.check:
    current = page.read_text() if page.exists() else ""
    if current == text:
      return 0
    diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(page), "generated", lineterm="", n=1)
    print("\n".join(list(diff)[:80]))
    print(f"{page} is out of date with the results files: run `{REGENERATE}`")
    return 1
  page.write_text(text)
  print(f"wrote {page}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
