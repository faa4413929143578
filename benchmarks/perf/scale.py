r"""Memory model: bytes per device (and per host process) of a training run, and the peak to expect.

    python -m benchmarks.scale --users 192403 --items 63001 --interactions 1689188 --dim 64 --model lightgcn --devices 1
    python -m benchmarks.scale --preset baby --model bm3 --measure            # model vs a measured run (subprocess)
    python -m benchmarks.scale --users 1e8 --items 1e7 --interactions 1e9 --model lightgcn --devices 64 \
        --shard-tables --backend gpu --memory-gib 80                          # fits? how many devices?
    python -m benchmarks.scale --largest --model lightgcn --backend cpu --memory-gib 24

Terms (float32, ``n`` users, ``m`` items, ``N = n + m`` nodes, ``d`` embedding dim, ``T`` training pairs, ``E = 2T``
directed graph edges, ``L`` layers, ``F`` feature dims, ``B`` batch, ``K`` devices, ``c`` evaluation chunk users):

==========================  =====================================================================================
parameters ``P``            LightGCN ``N d``; VBPR ``2 n d + m d + F d + d``; BM3 ``N d + m F + F d + d^2 + 3 d``;
                            with ``--shard-tables`` the ``nnx.Embed`` tables (not BM3's feature tables) ``/ K``
optimizer state             Adam: ``2 P`` (MG and SAM keep Adam's state plus a counter)
gradients + updates         ``1.5 P`` during a step (the gradient, and the update where it does not fuse into Adam)
graph                       ``12 E`` bytes (int32 rows/cols, float32 weights; replicated)
features on the device      VBPR's frozen ``m F`` (replicated); BM3's trainable tables are in ``P``
batches                     an epoch's ``(user, pos, neg)``: ``12 T / K`` bytes
activations                 LightGCN/BM3 propagation: ``(2L + 3) N d`` floats replicated, or with ``--shard-tables``
                            ``(L + 2) N d + (L + 1) N d / K`` (XLA keeps the gathered layer inputs whole);
                            + messages ``2 E d`` on accelerators (one ``segment_sum`` over all edges; CPU:
                            4 MiB chunks); BM3 + ``2 m d``; VBPR: the batch's feature rows ``2 B F / K``
evaluation                  scores, masked copy and hit mask of a chunk, ``9 c m`` bytes (``c`` from
                            :func:`benchmarks.runtime.backend.eval_chunk_size`), + the embeddings scored (``N d``; VBPR
                            ``2 N d``) + the forward pass (``(L + 1) N d``)
==========================  =====================================================================================

Per device: ``resident = parameters + optimizer + graph + features + batches``; ``peak = resident +
max(gradients + updates + activations, evaluation)``. Per host process (CPU: the devices are host memory too):
``runtime + data set + sampler + evaluation plan + (local devices) x peak`` -- the data set's host arrays
(splits, CSR views, the ``m F`` feature tables), the sampler's index arrays (~44 bytes per training pair), the
evaluation plans (~32 bytes per pair) and a runtime constant: the process's resident memory once Python, JAX,
the model's compiled train step and the evaluation kernels are loaded, measured on the tiny synthetic shape
(:data:`CPU_RUNTIME_MIB`, jax 0.10 on x86-64 Linux). The activation coefficients come from XLA's compiled memory
analysis (``Compiled.memory_analysis()``) at the Baby shape on CPU (1 and 4 devices).

Two what-ifs describe code that does not exist yet: ``--propagation-chunk-mib`` (chunked propagation on an
accelerator, as on CPU, instead of one ``segment_sum`` whose ``(E, d)`` messages grow with the graph) and
``--fully-sharded`` (graph edges partitioned and the propagation activations row-sharded like the tables).

``--measure`` runs one epoch and both evaluations in a fresh process at a synthetic preset's shape and prints its
peak resident memory (``VmHWM``, reset after data generation) beside the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks.perf import arguments
from benchmarks.runtime import cli
from benchmarks.runtime.files import atomic_write

__all__ = [
  "CPU_RUNTIME_MIB",
  "PROG",
  "Options",
  "Shape",
  "build_parser",
  "devices_needed",
  "estimate",
  "execute",
  "largest_fitting",
  "measure",
  "parameter_count",
  "parse_args",
  "report",
  "shape_of",
]

MIB = 2**20
GIB = 2**30
F32 = 4

#: Resident MiB of a CPU process that has trained and evaluated the model on the tiny synthetic shape (Python,
#: JAX/XLA:CPU, flax/optax, compiled train step and evaluation kernels): measured with jax 0.10.2, x86-64 Linux.
CPU_RUNTIME_MIB = {"lightgcn": 386, "vbpr": 420, "bm3": 524}
_DEFAULT_LAYERS = {"lightgcn": 2, "bm3": 1, "vbpr": 0}
#: Training pairs / interactions of the synthetic presets (Baby 0.743, Electronics 0.753).
TRAIN_FRACTION = 0.75
_SAMPLER_BYTES_PER_PAIR = 44  # int64 keys, permutation and rank temporaries, int32 epoch sample
_PLAN_BYTES_PER_PAIR = 32  # training-item masks of the valid and test plans, host and device copies


@dataclasses.dataclass(frozen=True)
class Shape:
  """A training run's sizes (see the module docstring for the symbols)."""

  users: int
  items: int
  interactions: int
  dim: int = 64
  model: str = "lightgcn"
  devices: int = 1
  shard_tables: bool = False
  layers: Optional[int] = None  # None: the model's default (LightGCN 2, BM3 1)
  batch_size: int = 2048
  image_dim: int = 4096
  text_dim: int = 384
  train_pairs: Optional[int] = None  # None: TRAIN_FRACTION of the interactions
  backend: str = "cpu"
  processes: int = 1  # host processes the devices are spread over (CPU: each holds devices/processes)
  # What-ifs, NOT what the training code does today (see the module docstring):
  propagation_chunk_mib: Optional[float] = None  # accelerators: chunked propagation with this much of messages
  fully_sharded: bool = False  # graph edge-partitioned and propagation activations row-sharded as well

  def __post_init__(self):
    if self.model not in _DEFAULT_LAYERS:
      raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(_DEFAULT_LAYERS)}")
    for name in ("users", "items", "interactions", "dim", "devices", "batch_size", "processes"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.devices % self.processes:
      raise ValueError(f"devices ({self.devices}) must be a multiple of processes ({self.processes})")
    if self.model in ("vbpr", "bm3") and self.image_dim + self.text_dim == 0:
      raise ValueError(f"{self.model} needs item features (image_dim + text_dim > 0)")

  @property
  def n_layers(self) -> int:
    return _DEFAULT_LAYERS[self.model] if self.layers is None else int(self.layers)

  @property
  def n_train(self) -> int:
    return int(self.train_pairs) if self.train_pairs is not None else int(TRAIN_FRACTION * self.interactions)


def parameter_count(shape: Shape) -> tuple[int, int]:
  """``(table floats, other floats)``: the ``nnx.Embed`` tables (row-shardable) and everything else trained."""
  n, m, d, f = shape.users, shape.items, shape.dim, shape.image_dim + shape.text_dim
  if shape.model == "lightgcn":
    return (n + m) * d, 0
  if shape.model == "vbpr":
    return 2 * n * d + m * d, f * d + d
  # bm3: user + item-ID tables; trainable feature tables; image/text projections, predictor (with biases)
  return (n + m) * d, m * f + f * d + d * d + 3 * d


def estimate(shape: Shape) -> dict[str, Any]:
  """Bytes per device and per host process (see the module docstring); JSON-ready."""
  from benchmarks.runtime import backend as backend_lib
  from benchmarks.training import kernels

  k = shape.devices
  n, m, d, L = shape.users, shape.items, shape.dim, shape.n_layers
  nodes = n + m
  t = shape.n_train
  edges = 2 * t
  feat = shape.image_dim + shape.text_dim
  tables, other = parameter_count(shape)
  p_dev = F32 * ((tables / k if shape.shard_tables else tables) + other)
  nd = F32 * nodes * d
  accel = shape.backend != "cpu"
  graph_model = shape.model in ("lightgcn", "bm3")

  ideal = shape.fully_sharded
  if ideal and not shape.shard_tables:
    raise ValueError("fully_sharded is a what-if of --shard-tables")
  if graph_model:
    if ideal:
      act = (2 * L + 3) * nd / k
    else:
      act = (L + 2) * nd + (L + 1) * nd / k if shape.shard_tables else (2 * L + 3) * nd
    if not accel:
      messages = 2 * kernels.CPU_PROPAGATION_CHUNK_BYTES
    elif shape.propagation_chunk_mib is not None:
      messages = 2 * min(F32 * edges * d, shape.propagation_chunk_mib * MIB)
    else:  # today on accelerators: one segment_sum over every edge
      messages = 2 * F32 * edges * d / (k if ideal else 1)
    act += messages + (2 * F32 * m * d if shape.model == "bm3" else 0)
    embed = nd / k if shape.shard_tables else nd
    eval_forward = (L + 1) * nd / (k if ideal else 1)
  else:  # vbpr
    act = 2 * F32 * shape.batch_size * feat / k
    embed = 2 * nd
    eval_forward = F32 * m * feat / k  # the item vectors' feature projection
  chunk = backend_lib.eval_chunk_size(m, shape.backend)
  device = {
    "parameters": p_dev,
    "optimizer_state": 2 * p_dev,
    "graph": (12 * edges / (k if ideal else 1)) if graph_model else 0,
    "features": F32 * m * feat if shape.model == "vbpr" else 0,
    "batches": 12 * t / k,
    "gradients_and_updates": 1.5 * p_dev,
    "activations": act,
    "evaluation": 9 * chunk * m + embed + eval_forward,
  }
  resident = sum(device[key] for key in ("parameters", "optimizer_state", "graph", "features", "batches"))
  train_peak = resident + device["gradients_and_updates"] + device["activations"]
  eval_peak = resident + device["evaluation"]
  peak = max(train_peak, eval_peak)
  local = k // shape.processes
  host = {
    "runtime": (CPU_RUNTIME_MIB[shape.model] * MIB) if not accel else 0,
    "data_set": 8 * shape.interactions + 4 * shape.interactions + 24 * n + F32 * m * feat,
    "sampler": _SAMPLER_BYTES_PER_PAIR * t,
    "evaluation_plans": _PLAN_BYTES_PER_PAIR * t,
  }
  host_total = sum(host.values())
  process_peak = host_total + (local * peak if not accel else 0)
  return {
    "shape": dataclasses.asdict(shape) | {"layers": L, "train_pairs": t, "edges": edges},
    "eval_chunk_users": chunk,
    "per_device": device,
    "resident_per_device": resident,
    "train_peak_per_device": train_peak,
    "eval_peak_per_device": eval_peak,
    "peak_per_device": peak,
    "replicated_per_device": _replicated(device, shape, nd, L, k, accel),
    "host_per_process": host,
    "peak_per_process": process_peak,
  }


def _replicated(device: dict[str, float], shape: Shape, nd: float, L: int, k: int, accel: bool) -> float:
  """The part of a device's training peak that more devices do not shrink."""
  if shape.model == "vbpr":
    return device["graph"] + device["features"]
  if shape.fully_sharded:
    whole = 0.0
  else:
    whole = (L + 2) * nd if shape.shard_tables else (2 * L + 3) * nd
    if accel and shape.propagation_chunk_mib is None:
      whole += 2 * F32 * 2 * shape.n_train * shape.dim  # every edge's message
  return device["graph"] + whole


def devices_needed(shape: Shape, budget_bytes: float, max_devices: int = 1 << 16) -> Optional[int]:
  """The fewest devices (powers of two, then exact) whose per-device peak fits ``budget_bytes``; ``None``: none."""
  fits = lambda k: estimate(dataclasses.replace(shape, devices=k, processes=1))["peak_per_device"] <= budget_bytes
  k = 1
  while k <= max_devices and not fits(k):
    k *= 2
  if k > max_devices:
    return None
  lo = k // 2 + 1 if k > 1 else 1
  for j in range(lo, k + 1):
    if fits(j):
      return j
  return k


def largest_fitting(shape: Shape, budget_bytes: float, *, per_process: bool) -> tuple[float, Shape]:
  """The largest factor ``s`` by which users, items and interactions of ``shape`` scale and still fit."""
  key = "peak_per_process" if per_process else "peak_per_device"

  def scaled(s: float) -> Shape:
    return dataclasses.replace(
      shape,
      users=max(1, int(shape.users * s)),
      items=max(1, int(shape.items * s)),
      interactions=max(1, int(shape.interactions * s)),
      train_pairs=None if shape.train_pairs is None else max(1, int(shape.train_pairs * s)),
    )

  lo, hi = 0.0, 1.0
  while estimate(scaled(hi))[key] <= budget_bytes:
    lo, hi = hi, hi * 2
    if hi > 1e9:
      break
  for _ in range(60):
    mid = (lo + hi) / 2
    if estimate(scaled(mid))[key] <= budget_bytes:
      lo = mid
    else:
      hi = mid
  return lo, scaled(lo)


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _measure_here(preset: str, model: str, layers: Optional[int], batch_size: int) -> dict[str, Any]:
  """One epoch + valid and test evaluation in this process; peak RSS after data generation (MiB).

  The epoch is :func:`benchmarks.training.loop.fit`'s epoch body (``epoch_batches`` + ``run_epoch``, the
  model's per-epoch hook, the host sync on the loss), so what is measured is what training holds.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  import models
  from benchmarks.data import dataset as data_lib
  from benchmarks.data.sampling import NegativeSampler
  from benchmarks.runtime import memory
  from benchmarks.training.config import TrainConfig
  from benchmarks.training.loop import (
    build,
    epoch_batches,
    epoch_constants,
    evaluate_params,
    has_epoch_hook,
    make_train_fns,
    run_epoch,
  )

  t0 = time.perf_counter()
  ds = data_lib.synthetic_preset(preset, seed=0)
  whole_process_peak = memory.status_mib("VmHWM")
  memory.reset_peak()  # the generator's transient is not the trainer's
  after_data = memory.status_mib("VmRSS")
  hparams = {} if layers is None or model == "vbpr" else {"n_layers": layers}
  config = TrainConfig(model=model, batch_size=batch_size, model_hparams=hparams)
  built = build(ds, config)
  tx = built.method.tx
  run_batches, embed = make_train_fns(built.graphdef, tx)
  params, opt_state = built.params, tx.init(built.params)
  sample = NegativeSampler(ds).epoch(np.random.default_rng([0, 0]))
  batches = epoch_batches(sample, batch_size)
  train_rest = built.rest
  if has_epoch_hook(models.get_model(model)):
    train_rest = epoch_constants(built.graphdef, params, built.rest, 0, 0)
  params, opt_state, losses = run_epoch(run_batches, params, opt_state, train_rest, jax.random.key(0), batches)
  float(jnp.mean(losses))  # fit's one host sync per epoch
  jax.block_until_ready(params)
  after_epoch = memory.status_mib("VmHWM")
  metrics = {
    split: evaluate_params(embed, params, built.rest, ds, split, None)["recall@20"] for split in ("valid", "test")
  }
  return {
    "preset": preset,
    "model": model,
    "layers": layers,
    "batch_size": batch_size,
    "users": ds.n_users,
    "items": ds.n_items,
    "interactions": len(ds.train) + len(ds.valid) + len(ds.test),
    "train_pairs": len(ds.train),
    "image_dim": int(ds.features["image"].shape[1]) if "image" in ds.features else 0,
    "text_dim": int(ds.features["text"].shape[1]) if "text" in ds.features else 0,
    "rss_after_data_mib": after_data,
    "peak_after_epoch_mib": after_epoch,
    "peak_rss_mib": max(memory.status_mib("VmHWM"), after_epoch),
    "whole_process_peak_mib": max(whole_process_peak, memory.status_mib("VmHWM")),
    "recall@20": metrics,
    "wall_s": time.perf_counter() - t0,
    "backend": jax.default_backend(),
  }


def measure(
  preset: str, model: str, *, layers: Optional[int] = None, batch_size: int = 2048, timeout_s: float = 1800
) -> dict[str, Any]:
  """:func:`_measure_here` in a fresh subprocess (so nothing else in this process counts); returns its record."""
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.scale",
    "--measure-child",
    preset,
    "--model",
    model,
    "--batch-size",
    str(batch_size),
  ] + ([] if layers is None else ["--layers", str(layers)])
  root = str(Path(__file__).resolve().parents[2])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env)
  if out.returncode:
    raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def shape_of(record: dict[str, Any], **overrides: Any) -> Shape:
  """The :class:`Shape` of a measured run."""
  fields = {k: record[k] for k in ("users", "items", "interactions", "model", "batch_size", "image_dim", "text_dim")}
  return Shape(**fields, train_pairs=record["train_pairs"], layers=record.get("layers"), **overrides)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _fmt(b: float) -> str:
  if b >= GIB:
    return f"{b / GIB:,.2f} GiB"
  return f"{b / MIB:,.1f} MiB"


def format_estimate(r: dict[str, Any]) -> str:
  s = r["shape"]
  lines = [
    f"{s['model']} ({s['layers']} layers), {s['users']:,} users x {s['items']:,} items, "
    f"{s['interactions']:,} interactions ({s['train_pairs']:,} training pairs, {s['edges']:,} graph edges), "
    f"d={s['dim']}, batch {s['batch_size']}, features {s['image_dim']}+{s['text_dim']}-d; "
    f"{s['devices']} {s['backend']} device(s) in {s['processes']} process(es), "
    f"tables {'row-sharded' if s['shard_tables'] else 'replicated'}; evaluation chunk "
    f"{r['eval_chunk_users']:,} users",
    "",
    f"{'per device':34s} {'bytes':>14s}",
  ]
  for key, value in r["per_device"].items():
    lines.append(f"  {key.replace('_', ' '):32s} {_fmt(value):>14s}")
  lines += [
    f"  {'resident':32s} {_fmt(r['resident_per_device']):>14s}",
    f"  {'training peak':32s} {_fmt(r['train_peak_per_device']):>14s}",
    f"  {'evaluation peak':32s} {_fmt(r['eval_peak_per_device']):>14s}",
    f"  {'PEAK per device':32s} {_fmt(r['peak_per_device']):>14s}",
    f"  {'(not shrunk by more devices)':32s} {_fmt(r['replicated_per_device']):>14s}",
    "",
    "per host process",
  ]
  for key, value in r["host_per_process"].items():
    lines.append(f"  {key.replace('_', ' '):32s} {_fmt(value):>14s}")
  note = "host arrays + its devices' peaks (CPU)" if s["backend"] == "cpu" else "host arrays only"
  lines.append(f"  {'PEAK per process':32s} {_fmt(r['peak_per_process']):>14s}   ({note})")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

PROG = "python -m benchmarks.scale"


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``python -m benchmarks.scale`` computes, checked (:func:`parse_args`).

  ``child``: this process is :func:`measure`'s subprocess; it measures ``preset`` at ``shape``'s model, layers
  and batch size, and prints the record as one JSON line.
  """

  shape: Shape
  preset: Optional[str] = None
  memory_gib: Optional[float] = None
  largest: bool = False
  measure: bool = False
  json: Optional[Path] = None
  child: bool = False


def _preset(text: str) -> str:
  from benchmarks.data import dataset as data_lib

  if text not in data_lib.PRESETS:
    raise argparse.ArgumentTypeError(f"unknown preset {text!r}; valid: {', '.join(sorted(data_lib.PRESETS))}")
  return text


def build_parser() -> argparse.ArgumentParser:
  p = arguments.ArgumentParser(PROG, __doc__)
  size = arguments.real(1)
  p.add_argument("--users", type=size, default=None)
  p.add_argument("--items", type=size, default=None)
  p.add_argument("--interactions", type=size, default=None, help="all interactions (train+valid+test)")
  p.add_argument("--train-pairs", type=size, default=None, help=f"default {TRAIN_FRACTION} x interactions")
  p.add_argument("--preset", type=_preset, default=None, help="take users/items/interactions from a synthetic preset")
  p.add_argument("--dim", type=arguments.integer(1), default=64)
  p.add_argument("--model", default="lightgcn", choices=sorted(_DEFAULT_LAYERS))
  p.add_argument("--layers", type=arguments.integer(0), default=None, help="default: the model's (LightGCN 2, BM3 1)")
  p.add_argument("--batch-size", type=arguments.integer(1), default=2048)
  p.add_argument(
    "--image-dim", type=arguments.integer(0), default=None, help="default 4096 (0 for lightgcn without --preset)"
  )
  p.add_argument(
    "--text-dim", type=arguments.integer(0), default=None, help="default 384 (0 for lightgcn without --preset)"
  )
  p.add_argument("--devices", type=arguments.integer(1), default=1)
  p.add_argument("--processes", type=arguments.integer(1), default=1)
  p.add_argument("--shard-tables", action="store_true")
  p.add_argument("--backend", default="cpu", choices=("cpu", "gpu", "tpu"))
  p.add_argument(
    "--propagation-chunk-mib",
    type=arguments.real(0, inclusive=False),
    default=None,
    help="what-if (not the code today): chunked propagation on accelerators with this much of messages",
  )
  p.add_argument(
    "--fully-sharded",
    action="store_true",
    help="what-if (not the code today): graph and propagation activations sharded like the tables "
    "(with --shard-tables)",
  )
  p.add_argument(
    "--memory-gib",
    type=arguments.real(0, inclusive=False),
    default=None,
    help="a device's (gpu/tpu) or a host's (cpu) memory: says whether it fits and how many devices",
  )
  p.add_argument(
    "--largest",
    action="store_true",
    help="with --memory-gib: scale the shape (default: Electronics proportions) to the largest that fits",
  )
  p.add_argument("--measure", action="store_true", help="with --preset: measure a real run beside the model")
  p.add_argument("--measure-child", type=_preset, default=None, help=argparse.SUPPRESS)
  p.add_argument("--json", type=arguments.json_path, default=None, help="write the result to this file")
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
  """The command line as :class:`Options`; a bad flag or combination raises :class:`cli.UsageError` naming it."""
  from benchmarks.data import dataset as data_lib

  args = build_parser().parse_args(argv)
  preset = args.measure_child or args.preset
  users, items, interactions = args.users, args.items, args.interactions
  feature_default = 0 if args.model == "lightgcn" and preset is None else None
  image = args.image_dim if args.image_dim is not None else (feature_default if feature_default is not None else 4096)
  text = args.text_dim if args.text_dim is not None else (feature_default if feature_default is not None else 384)
  if preset is not None:
    pre = data_lib.PRESETS[preset]
    users = users or pre["n_users"]
    items = items or pre["n_items"]
    interactions = interactions or pre["n_interactions"]
    image = args.image_dim if args.image_dim is not None else pre.get("image_dim", 4096)
    text = args.text_dim if args.text_dim is not None else pre.get("text_dim", 384)
  elif args.largest and users is None:  # Electronics proportions, ID-only unless features are asked for
    pre = data_lib.PRESETS["electronics"]
    users, items, interactions = pre["n_users"], pre["n_items"], pre["n_interactions"]
  missing = [f for f, v in (("--users", users), ("--items", items), ("--interactions", interactions)) if v is None]
  if missing:
    raise cli.UsageError(f"{', '.join(missing)}: give --users, --items and --interactions (or --preset NAME)")
  if args.devices % args.processes:
    raise cli.UsageError(f"--devices ({args.devices}) must be a multiple of --processes ({args.processes})")
  if args.model in ("vbpr", "bm3") and image + text == 0:
    raise cli.UsageError(f"--model {args.model} needs item features: --image-dim + --text-dim must be > 0")
  if args.fully_sharded and not args.shard_tables:
    raise cli.UsageError("--fully-sharded is a what-if of --shard-tables: give both")
  if args.largest and args.memory_gib is None:
    raise cli.UsageError("--largest needs --memory-gib (the memory to fit)")
  if args.measure and args.preset is None:
    raise cli.UsageError("--measure needs --preset (it generates that synthetic data set)")
  try:
    shape = Shape(
      users=int(users),
      items=int(items),
      interactions=int(interactions),
      dim=args.dim,
      model=args.model,
      devices=args.devices,
      shard_tables=args.shard_tables,
      layers=args.layers,
      batch_size=args.batch_size,
      image_dim=image,
      text_dim=text,
      train_pairs=None if args.train_pairs is None else int(args.train_pairs),
      backend=args.backend,
      processes=args.processes,
      propagation_chunk_mib=args.propagation_chunk_mib,
      fully_sharded=args.fully_sharded,
    )
  except ValueError as e:  # every rule of Shape is checked above, with its flag
    raise cli.UsageError(str(e)) from None
  return Options(
    shape=shape,
    preset=preset,
    memory_gib=args.memory_gib,
    largest=args.largest,
    measure=args.measure,
    json=args.json,
    child=args.measure_child is not None,
  )


def execute(options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The estimate (and what :class:`Options` ask besides); written to ``options.json`` if set."""
  shape = options.shape
  if options.child:
    return _measure_here(options.preset, shape.model, shape.layers, shape.batch_size)
  result: dict[str, Any] = {"estimate": estimate(shape)}
  if options.memory_gib is not None:
    budget = options.memory_gib * GIB
    per_process = shape.backend == "cpu"
    peak = result["estimate"]["peak_per_process" if per_process else "peak_per_device"]
    result["memory_gib"] = options.memory_gib
    result["fits"] = peak <= budget
    if not per_process:
      result["devices_needed"] = devices_needed(shape, budget)
    if options.largest:
      factor, big = largest_fitting(shape, budget, per_process=per_process)
      result["largest"] = {"factor": factor, "users": big.users, "items": big.items, "interactions": big.interactions}
  if options.measure:
    log(f"measuring one epoch + evaluation of {shape.model} at the {options.preset} shape in a subprocess ...")
    rec = measure(options.preset, shape.model, layers=shape.layers, batch_size=shape.batch_size)
    model = estimate(shape_of(rec))["peak_per_process"] / MIB
    result["measured"] = rec
    result["model_peak_mib"] = model
    result["error"] = model / rec["peak_rss_mib"] - 1
  if options.json is not None:
    atomic_write(options.json, json.dumps(result, indent=1))
  return result


def report(result: dict[str, Any]) -> None:
  """Prints a result of :func:`execute` (the measuring subprocess's record as one JSON line)."""
  if "estimate" not in result:
    print(json.dumps(result))
    return
  r = result["estimate"]
  s = r["shape"]
  print(format_estimate(r))
  if "fits" in result:
    per_process = s["backend"] == "cpu"
    peak = r["peak_per_process" if per_process else "peak_per_device"]
    print(
      f"\n{result['memory_gib']:g} GiB per {'host process' if per_process else 'device'}: "
      f"{'fits' if result['fits'] else 'does NOT fit'} ({_fmt(peak)} expected)"
    )
    if "devices_needed" in result:
      k = result["devices_needed"]
      print(
        f"devices needed: {k if k else 'none suffices'}"
        + (
          ""
          if k
          else f" -- {_fmt(r['replicated_per_device'])} per device does not shrink with more devices "
          f"(graph{', features' if s['model'] == 'vbpr' else ''}, the gathered propagation activations"
          f"{' and every edge' + chr(39) + 's message' if s['propagation_chunk_mib'] is None else ''})"
        )
      )
  if "largest" in result:
    big = result["largest"]
    print(
      f"largest that fits: x{big['factor']:.2f} -> {big['users']:,} users x {big['items']:,} items, "
      f"{big['interactions']:,} interactions"
    )
  if "measured" in result:
    rec = result["measured"]
    print(
      f"\nmeasured ({rec['backend']}, one epoch + valid and test evaluation, {rec['wall_s']:.0f} s): peak RSS "
      f"{rec['peak_rss_mib']:,.0f} MiB after data generation (whole process {rec['whole_process_peak_mib']:,.0f}"
      f" MiB); model {result['model_peak_mib']:,.0f} MiB ({100 * result['error']:+.1f} %)"
    )
