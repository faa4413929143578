r"""Training and evaluation speed: plain, Mirror Gradient, SAM and GNP, against the official PyTorch code.

    python -m benchmarks.speed [--models vbpr,lightgcn,bm3] [--quick] [--repeats N] [--json FILE]
    python -m benchmarks.speed --models layergcn,selfcf --methods plain,mg --betas 3   # the other two models
    python -m benchmarks.speed --models lightgcn1 --methods plain,mg --betas 3   # a subset
    python -m benchmarks.speed --electronics [--json FILE]

**Baby mode** (default). On the Baby shape (:func:`benchmarks.data.dataset.synthetic_preset` ``"baby"``: 19,445 users x
7,050 items, ~119k training pairs, synthetic image 4096-d and text 384-d features), batch 2048, embedding 64,
Adam (lr 1e-3), for VBPR (``reg_weight`` 2.0), LightGCN with 1 and 3 layers and BM3 (1 layer, dropout 0.3), it
times the training variants plain, MG (``beta`` = 1, 3, 5; ``alpha1`` 1.0, ``alpha2`` 0.2), SAM and GNP, all
through the trainer's own compiled step (:func:`benchmarks.training.loop.make_train_fns`: one ``lax.scan`` over
the batches, donated buffers):

* **step**: one call scanning ``lcm(betas)`` (15) full batches, so every MG variant runs exactly
  ``1 / beta`` mirror steps; time per step = call time / 15;
* **epoch**: one training epoch exactly as :func:`benchmarks.training.loop.fit` runs it, through the same
  epoch body (:func:`~benchmarks.training.loop.epoch_batches` and :func:`~benchmarks.training.loop.run_epoch`):
  negative sampling, batching (host to device), the scan over the full batches, the remainder batch, the
  model's per-epoch hook and the host sync on the loss; reported split into sampling, batching and train steps;
* **evaluation**: one full-ranking validation pass (:func:`benchmarks.training.loop.evaluate_params`: embed, score
  every item for every user, mask training items, top-50, four metrics at 5/10/20/50), as users/s.

Every variant of a model lives in the same process and is timed **interleaved** (one call of each per round,
round after round), after compilation and a warm-up call, with ``jax.block_until_ready``; figures are medians
over ``--repeats`` rounds (7; the first ``--epoch-repeats``, 3, also time an epoch and an evaluation), so
background load on a shared machine hits all variants alike. The process CPU time of the step calls is
printed too ("cpu ms", all threads): on a loaded machine it shows how much of the wall time was waiting. The ratio of each
variant's step time to plain's is the median over rounds of the ratio to plain's call *in the same round* (so a
slow drift of the machine cancels; the range over rounds is printed and kept in the JSON as ``ratio_all``),
printed beside its ideal gradient-evaluation ratio: ``(beta + 1) / beta``
for MG (one extra gradient every ``beta`` steps), 2 for SAM, and 3 for GNP (a gradient plus a
Hessian-vector product, which forward-over-reverse computes at about the cost of two gradients; the
trainer's ``grad_evals`` counts it as one).

The official PyTorch MMRec trainer's figures on the same kind of 2-core CPU (:data:`PEER`) are printed beside
ours; our "training s/epoch" includes sampling and batching, as MMRec's epoch timer does.

**Electronics mode** (``--electronics``): generates the Electronics-shaped synthetic set (192,403 x 63,001,
1,689,188 interactions; ~20 s and ~1 GB of features), then runs one LightGCN training epoch and one full
validation pass, reporting their times and the process's peak resident memory (``ru_maxrss`` and
``VmHWM``). It runs two epochs and two passes so that the first (with compilation, and the evaluation plan)
and the second (steady state) are both reported.

Profiling with this script led to these changes (all exact; see each docstring): LightGCN/BM3 propagation in
cache-sized edge chunks (``models.graph.propagate_chunked``: ~3x faster per layer than one big gather/scatter
on XLA:CPU); VBPR's loss on the batch's item rows only, without the ``(n_items, 4480)`` feature concatenation
(``models.vbpr``); batch-row linear layers whose kernel gradient takes XLA:CPU's fast matmul path
(``models.common.rows_matmul``, 1.6x on VBPR's and BM3's feature projections); and Mirror Gradient's second
half in a 0/1-trip ``while_loop`` instead of ``lax.cond`` (``mirror_optax``: a ``lax.cond`` inside the scan
copied the optimizer state every step, 2-3x slower updates at BM3's 33M parameters).

``--quick`` runs everything on the tiny synthetic shape in seconds (for tests). ``--json FILE`` writes every
printed figure; per model (key ``"models"``) at least ``plain_step_s``, ``mg_beta3_ratio``, ``mg_beta3_ideal``
and ``sam_ratio``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.data import dataset as data_lib
from benchmarks.data.sampling import NegativeSampler
from benchmarks.perf import arguments
from benchmarks.runtime import cli, memory
from benchmarks.runtime.files import atomic_write, json_default
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
from benchmarks.training.methods import make_method
from benchmarks.training.options import parse_names

__all__ = [
  "CASES",
  "PEER",
  "PROG",
  "Case",
  "Options",
  "Variant",
  "build_parser",
  "execute",
  "make_variants",
  "parse_args",
  "report",
  "run_baby",
  "run_electronics",
]

#: Figures of the official PyTorch MMRec trainer (github.com/enoche/MMRec, with the Mirror Gradient
#: authors' trainer for MG), as measured on the same kind of 2-core CPU at the Baby shape, batch 2048,
#: embedding 64, Adam: (low, high) ranges over runs. Training s/epoch per model; MG (alpha1 1.0,
#: alpha2 0.2, beta 3) costs 8-39 % more per epoch; one full-ranking evaluation pass (19,445 users x
#: 7,050 items, top-50, four metrics); negative sampling per epoch.
PEER: dict[str, Any] = {
  "source": "official PyTorch MMRec trainer, measured on a 2-core CPU, Baby shape, batch 2048, emb 64, Adam",
  "train_s_per_epoch": {
    "lightgcn1": (3.6, 3.8),
    "lightgcn3": (9.3, 9.3),
    "vbpr": (7.3, 7.4),
    "bm3": (27.8, 28.1),
  },
  "mg_beta3_overhead_pct": (8.0, 39.0),
  "eval_s": (5.1, 6.0),
  "sampling_s_per_epoch": (0.35, 0.49),
}

#: Our targets against :data:`PEER`: training per epoch and evaluation speed-ups, and MG's step time
#: relative to its ideal gradient-evaluation ratio.
TARGETS = {"train_speedup": 2.0, "eval_speedup": 5.0, "mg_ratio_over_ideal": 1.03}


@dataclasses.dataclass(frozen=True)
class Case:
  """A benchmarked model configuration."""

  key: str
  model: str
  label: str
  hparams: dict[str, Any]


CASES: dict[str, Case] = {
  "vbpr": Case("vbpr", "vbpr", "VBPR", {"reg_weight": 2.0}),
  "lightgcn1": Case("lightgcn1", "lightgcn", "LightGCN (1 layer)", {"n_layers": 1}),
  "lightgcn3": Case("lightgcn3", "lightgcn", "LightGCN (3 layers)", {"n_layers": 3}),
  "bm3": Case("bm3", "bm3", "BM3 (1 layer, dropout 0.3)", {"n_layers": 1, "dropout": 0.3}),
  "layergcn": Case("layergcn", "layergcn", "LayerGCN (4 layers, drop 0.1)", {"n_layers": 4, "dropout": 0.1}),
  "selfcf": Case("selfcf", "selfcf", "SelfCF (2 layers)", {"n_layers": 2}),
}
#: ``--models`` names -> cases (``lightgcn`` means both depths).
MODEL_CASES = {"vbpr": ("vbpr",), "lightgcn": ("lightgcn1", "lightgcn3"), "bm3": ("bm3",), **{k: (k,) for k in CASES}}


@dataclasses.dataclass(frozen=True)
class Variant:
  """A training method with its hyper-parameters and ideal cost relative to plain training."""

  key: str
  method: str
  hparams: dict[str, Any]
  ideal: float
  label: str


def make_variants(
  methods: Sequence[str] = ("plain", "mg", "sam", "gnp"), betas: Sequence[int] = (1, 3, 5)
) -> list[Variant]:
  """The timed variants: ``plain`` always first, ``mg`` once per beta."""
  out = [Variant("plain", "plain", {}, 1.0, "plain")]
  for m in methods:
    if m == "mg":
      out += [Variant(f"mg_beta{b}", "mg", {"beta": b}, (b + 1) / b, f"MG β={b}") for b in betas]
    elif m == "sam":
      out.append(Variant("sam", "sam", {}, 2.0, "SAM"))
    elif m == "gnp":
      out.append(Variant("gnp", "gnp", {}, 3.0, "GNP"))
    elif m != "plain":
      raise ValueError(f"unknown method {m!r}; valid: plain, mg, sam, gnp")
  return out


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def machine_info() -> dict[str, Any]:
  """Where and under which load the figures were taken."""
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
    "cpu_count": os.cpu_count(),
    "loadavg_1_5_15": load,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
    "python": platform.python_version(),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


class _Runner:
  """One variant's compiled trainer and its live (donated) training state."""

  def __init__(self, built, variant: Variant, learning_rate: float):
    self.variant = variant
    self.method = make_method(variant.method, learning_rate=learning_rate, **variant.hparams)
    self.run_batches, self.embed = make_train_fns(built.graphdef, self.method.tx)
    self.params = jax.tree.map(jnp.copy, built.params)
    self.opt_state = self.method.tx.init(self.params)
    self.rest = built.rest
    self.graphdef = built.graphdef
    self.epoch_hook = has_epoch_hook(type(nnx.merge(built.graphdef, built.params, built.rest)))
    self.epochs = 0
    self.updates = 0

  def steps(self, key: jax.Array, batches: dict[str, jax.Array]) -> jax.Array:
    self.params, self.opt_state, loss = self.run_batches(self.params, self.opt_state, self.rest, key, batches)
    self.updates += jax.tree.leaves(batches)[0].shape[0]
    return loss

  def timed_steps(self, key, batches) -> tuple[float, float]:
    """Wall and process CPU seconds of one call (CPU time sums all threads: context under load)."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(self.steps(key, batches))
    return time.perf_counter() - t0, time.process_time() - c0

  def timed_epoch(self, sample: dict[str, np.ndarray], batch_size: int, key: jax.Array) -> dict[str, float]:
    """One epoch's batching and train steps through fit's epoch body (:func:`~benchmarks.training.loop.run_epoch`),
    in seconds."""
    t0 = time.perf_counter()
    batches = epoch_batches(sample, batch_size)
    jax.block_until_ready(batches)
    t1 = time.perf_counter()
    rest = self.rest  # a model's per-epoch hook (LayerGCN's edge dropout) runs as in fit, timed with the steps
    if self.epoch_hook:
      rest = epoch_constants(self.graphdef, self.params, self.rest, 0, self.epochs)
    self.epochs += 1
    self.params, self.opt_state, losses = run_epoch(self.run_batches, self.params, self.opt_state, rest, key, batches)
    self.updates += batches.updates
    loss = float(jnp.mean(losses))  # fit's one host sync per epoch
    t2 = time.perf_counter()
    if not math.isfinite(loss):
      raise FloatingPointError(f"{self.variant.key}: training loss became {loss}")
    return {"batching_s": t1 - t0, "train_s": t2 - t1}

  def timed_eval(self, ds: data_lib.Dataset) -> float:
    t0 = time.perf_counter()
    evaluate_params(self.embed, self.params, self.rest, ds, "valid", None)
    return time.perf_counter() - t0


def _step_batches(sampler: NegativeSampler, n_steps: int, batch_size: int) -> dict[str, jax.Array]:
  """``n_steps`` full batches (from as many sampled epochs as needed), ``(n_steps, batch_size)`` each."""
  need, parts, e = n_steps * batch_size, [], 0
  while sum(len(p["user"]) for p in parts) < need:
    parts.append(sampler.epoch(np.random.default_rng([12345, e])))
    e += 1
  return {k: jnp.asarray(np.concatenate([p[k] for p in parts])[:need].reshape(n_steps, batch_size)) for k in parts[0]}


# --------------------------------------------------------------------------------------------------
# Baby mode
# --------------------------------------------------------------------------------------------------


def bench_case(
  ds: data_lib.Dataset,
  case: Case,
  variants: Sequence[Variant],
  *,
  batch_size: int,
  repeats: int,
  n_steps: int,
  epoch_repeats: Optional[int] = None,
  learning_rate: float = 1e-3,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Times every variant of ``case`` interleaved; returns the JSON record of the model.

  Every round times one step call of each variant; the first ``epoch_repeats`` rounds (default: all) also
  time one epoch of each variant, the sampling and one evaluation.
  """
  epoch_repeats = repeats if epoch_repeats is None else max(1, min(epoch_repeats, repeats))
  t_build = time.perf_counter()
  built = build(ds, TrainConfig(model=case.model, batch_size=batch_size, model_hparams=case.hparams))
  runners = [_Runner(built, v, learning_rate) for v in variants]
  sampler = NegativeSampler(ds)
  step_batches = _step_batches(sampler, n_steps, batch_size)
  key = jax.random.key(0)
  log(f"  {case.label}: built in {time.perf_counter() - t_build:.1f}s; compiling {len(runners)} variants ...")

  t_compile = time.perf_counter()
  warm_sample = sampler.epoch(np.random.default_rng([0, 0]))
  for r in runners:  # compile + one warm-up call of every shape that is timed
    for _ in range(2):
      r.timed_steps(key, step_batches)
      r.timed_epoch(warm_sample, batch_size, key)
  runners[0].timed_eval(ds)
  log(f"  {case.label}: compiled and warmed up in {time.perf_counter() - t_compile:.1f}s")

  step_s = {r.variant.key: [] for r in runners}
  step_cpu_s = {r.variant.key: [] for r in runners}
  epoch = {r.variant.key: {"batching_s": [], "train_s": []} for r in runners}
  sampling_s, eval_s = [], []
  for rep in range(repeats):
    for r in runners:  # interleaved: one call of each variant per round
      wall, cpu = r.timed_steps(jax.random.fold_in(key, rep), step_batches)
      step_s[r.variant.key].append(wall / n_steps)
      step_cpu_s[r.variant.key].append(cpu / n_steps)
    if rep >= epoch_repeats:
      continue
    t0 = time.perf_counter()
    sample = sampler.epoch(np.random.default_rng([0, rep + 1]))
    sampling_s.append(time.perf_counter() - t0)
    for r in runners:
      for k, v in r.timed_epoch(sample, batch_size, jax.random.fold_in(key, 1000 + rep)).items():
        epoch[r.variant.key][k].append(v)
    eval_s.append(runners[0].timed_eval(ds))

  n_eval_users = int(np.count_nonzero(np.diff(ds.csr("valid")[0])))
  record: dict[str, Any] = {
    "label": case.label,
    "model": case.model,
    "model_hparams": case.hparams,
    "n_train": len(ds.train),
    "updates_per_epoch": math.ceil(len(ds.train) / batch_size),
    "step_scan_length": n_steps,
    "repeats": repeats,
    "epoch_repeats": epoch_repeats,
    "sampling_s": _median(sampling_s),
    "eval_s": _median(eval_s),
    "eval_users": n_eval_users,
    "eval_users_per_s": n_eval_users / _median(eval_s),
    "variants": {},
  }
  for r in runners:
    k = r.variant.key
    s = _median(step_s[k])
    e = {name: _median(v) for name, v in epoch[k].items()}
    # Paired: each round's ratio to plain's call in the same round, so slow drift of the machine's speed
    # cancels; the median over rounds is reported, with the spread.
    paired = [a / b for a, b in zip(step_s[k], step_s["plain"])]
    ratio = _median(paired)
    record["variants"][k] = {
      "label": r.variant.label,
      "step_s": s,
      "step_s_all": step_s[k],
      "step_cpu_s": _median(step_cpu_s[k]),
      "epoch_train_s": e["train_s"],
      "epoch_batching_s": e["batching_s"],
      "epoch_total_s": record["sampling_s"] + e["batching_s"] + e["train_s"],
      "ratio": ratio,
      "ratio_all": paired,
      "ideal": r.variant.ideal,
      "ratio_over_ideal": ratio / r.variant.ideal,
      "epoch_ratio": e["train_s"] / _median(epoch["plain"]["train_s"]),
    }
    record[f"{k}_step_s"] = s
    record[f"{k}_ratio"] = ratio
    record[f"{k}_ideal"] = r.variant.ideal
    record[f"{k}_epoch_s"] = record["variants"][k]["epoch_total_s"]
  plain = record["variants"]["plain"]
  record["epoch_split"] = {
    "sampling_s": record["sampling_s"],
    "batching_s": plain["epoch_batching_s"],
    "train_steps_s": plain["epoch_train_s"],
    "eval_s": record["eval_s"],
  }
  record["train_s_per_epoch"] = plain["epoch_total_s"]  # what MMRec's epoch timer covers
  return record


def format_ratio_table(records: dict[str, dict[str, Any]]) -> str:
  head = (
    f"{'model':28s} {'variant':8s} {'ms/step':>9s} {'cpu ms':>8s} {'train s/epoch':>14s} {'ratio':>7s} "
    f"{'ideal':>7s} {'ratio/ideal':>12s} {'ratio range':>14s}"
  )
  lines = [head, "-" * len(head)]
  for rec in records.values():
    for i, (k, v) in enumerate(rec["variants"].items()):
      lines.append(
        f"{rec['label'] if i == 0 else '':28s} {v['label']:8s} {1e3 * v['step_s']:9.2f} {1e3 * v['step_cpu_s']:8.1f} "
        f"{v['epoch_train_s']:14.3f} {v['ratio']:7.3f} {v['ideal']:7.3f} {v['ratio_over_ideal']:12.3f} "
        f"{min(v['ratio_all']):6.3f}–{max(v['ratio_all']):.3f}"
      )
  return "\n".join(lines)


def _range(r: Sequence[float], fmt: str = ".2f") -> str:
  lo, hi = r
  return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}–{format(hi, fmt)}"


def format_peer_table(records: dict[str, dict[str, Any]]) -> str:
  """Our figures beside the official PyTorch MMRec trainer's (:data:`PEER`), with the targets."""
  head = f"{'':46s} {'ours':>9s} {'official PyTorch MMRec':>23s} {'speed-up':>10s} {'target':>8s} {'met':>4s}"
  lines = [head, "-" * len(head)]

  def row(label, ours, peer, target=None, fmt=".3f"):
    lo, hi = peer
    met = "" if target is None else ("yes" if lo / ours >= target else "no")
    goal = "" if target is None else f">={target:g}x"
    lines.append(
      f"{label:46s} {format(ours, fmt):>9s} {_range((lo, hi)):>23s} {_speedup(lo, hi, ours):>10s} {goal:>8s} {met:>4s}"
    )

  for key, rec in records.items():
    if key in PEER["train_s_per_epoch"]:
      row(
        rec["label"] + " training s/epoch",
        rec["train_s_per_epoch"],
        PEER["train_s_per_epoch"][key],
        TARGETS["train_speedup"],
      )
  for key, rec in records.items():
    if key in PEER["train_s_per_epoch"] and "mg_beta3" in rec["variants"]:
      peer = PEER["train_s_per_epoch"][key]
      lo_pct, hi_pct = PEER["mg_beta3_overhead_pct"]
      mg_peer = (peer[0] * (1 + lo_pct / 100), peer[1] * (1 + hi_pct / 100))
      row(rec["label"] + " MG β=3 s/epoch", rec["variants"]["mg_beta3"]["epoch_total_s"], mg_peer)
  for key, rec in records.items():
    if "mg_beta3" in rec["variants"]:
      over = 100 * (rec["variants"]["mg_beta3"]["epoch_total_s"] / rec["train_s_per_epoch"] - 1)
      lines.append(
        f"{rec['label'] + ' MG β=3 extra per epoch':46s} {over:+8.1f}% "
        f"{'+' + _range(PEER['mg_beta3_overhead_pct'], '.0f') + ' %':>23s}"
      )
  for key, rec in records.items():
    row(rec["label"] + " evaluation pass (s)", rec["eval_s"], PEER["eval_s"], TARGETS["eval_speedup"])
  samp = _median([rec["sampling_s"] for rec in records.values()])
  row("negative sampling (s/epoch)", samp, PEER["sampling_s_per_epoch"])
  return "\n".join(lines)


def _speedup(lo: float, hi: float, ours: float) -> str:
  if ours <= 0:
    return "-"
  a, b = lo / ours, hi / ours
  return f"{a:.1f}x" if abs(a - b) < 0.05 else f"{a:.1f}–{b:.1f}x"


def format_split_table(records: dict[str, dict[str, Any]]) -> str:
  head = (
    f"{'model':28s} {'sampling':>9s} {'batching':>9s} {'train steps':>12s} {'evaluation':>11s} "
    f"{'total':>8s}   (s, one epoch with one validation pass; plain Adam)"
  )
  lines = [head, "-" * 84]
  for rec in records.values():
    s = rec["epoch_split"]
    total = sum(s.values())
    lines.append(
      f"{rec['label']:28s} {s['sampling_s']:9.3f} {s['batching_s']:9.3f} {s['train_steps_s']:12.3f} "
      f"{s['eval_s']:11.3f} {total:8.3f}"
    )
  return "\n".join(lines)


def format_eval_table(records: dict[str, dict[str, Any]], n_items: int) -> str:
  head = f"{'model':28s} {'users':>7s} {'s/pass':>8s} {'users/s':>10s}   (full ranking over {n_items:,} items, top-50)"
  lines = [head, "-" * 64]
  for rec in records.values():
    lines.append(f"{rec['label']:28s} {rec['eval_users']:7d} {rec['eval_s']:8.3f} {rec['eval_users_per_s']:10.0f}")
  return "\n".join(lines)


def run_baby(
  case_keys: Sequence[str],
  *,
  quick: bool = False,
  repeats: int = 7,
  epoch_repeats: Optional[int] = None,
  variants: Optional[Sequence[Variant]] = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """The Baby-mode benchmark (tiny shape with ``quick``); returns the JSON-ready result."""
  variants = list(variants or make_variants())
  betas = [v.hparams["beta"] for v in variants if v.method == "mg"]
  n_steps = math.lcm(*betas) if betas else 1
  n_steps *= max(1, math.ceil(15 / n_steps))
  t0 = time.perf_counter()
  if quick:
    ds = data_lib.synthetic_preset("tiny", seed=0)
    # a batch size giving exactly n_steps full batches where possible: one compilation per variant
    batch_size = max(1, len(ds.train) // n_steps)
  else:
    ds = data_lib.synthetic_preset("baby", seed=0)
    batch_size = 2048
  log(
    f"data {ds.name}: {ds.n_users:,} users x {ds.n_items:,} items, {len(ds.train):,} training pairs, "
    f"features {', '.join(f'{k} {v.shape[1]}-d' for k, v in ds.features.items())} "
    f"(generated in {time.perf_counter() - t0:.1f}s); batch {batch_size}, emb 64, Adam lr 1e-3; "
    f"{repeats} interleaved repeats, {n_steps} steps per timed step call"
  )
  records = {}
  for key in case_keys:
    records[key] = bench_case(
      ds,
      CASES[key],
      variants,
      batch_size=batch_size,
      repeats=repeats,
      n_steps=n_steps,
      epoch_repeats=epoch_repeats,
      log=log,
    )
  return {
    "mode": "quick" if quick else "baby",
    "data": {
      "name": ds.name,
      "n_users": ds.n_users,
      "n_items": ds.n_items,
      "n_train": len(ds.train),
      "features": {k: int(v.shape[1]) for k, v in ds.features.items()},
    },
    "batch_size": batch_size,
    "repeats": repeats,
    "epoch_repeats": epoch_repeats if epoch_repeats is not None else repeats,
    "machine": machine_info(),
    "peer": PEER,
    "targets": TARGETS,
    "models": records,
    "peak_rss": memory.peak_rss_mib(),
  }


def print_baby(result: dict[str, Any], log: Callable[[str], None] = print) -> None:
  records = result["models"]
  m = result["machine"]
  log(f"\nmachine: {m['cpu_count']} CPUs, load average {m['loadavg_1_5_15']}, backend {m['backend']}, jax {m['jax']}")
  log(
    f"\nTraining step and epoch: median of {result['repeats']} interleaved repeats "
    f"(ratio = median over rounds of step time / plain's in the same round; ideal = gradient evaluations per step)"
  )
  log(format_ratio_table(records))
  log("\nAgainst the official PyTorch MMRec trainer (measured on a 2-core CPU; Baby shape, batch 2048, emb 64, Adam)")
  log(format_peer_table(records))
  log("\nOne epoch, split")
  log(format_split_table(records))
  log("\nFull-ranking evaluation throughput")
  log(format_eval_table(records, result["data"]["n_items"]))


# --------------------------------------------------------------------------------------------------
# Electronics mode
# --------------------------------------------------------------------------------------------------


def run_electronics(
  *, n_layers: int = 1, batch_size: int = 2048, quick: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """One LightGCN training epoch and one full evaluation at the Electronics shape; times and peak RSS."""
  t0 = time.perf_counter()
  ds = data_lib.synthetic_preset("tiny" if quick else "electronics", seed=0)
  gen_s = time.perf_counter() - t0
  rss_data = memory.peak_rss_mib()
  log(
    f"data {ds.name}: {ds.n_users:,} users x {ds.n_items:,} items, {len(ds.train):,} training pairs "
    f"(generated in {gen_s:.1f}s; peak RSS so far {rss_data['ru_maxrss_mib']:.0f} MiB)"
  )
  batch_size = 32 if quick else batch_size
  t0 = time.perf_counter()
  built = build(ds, TrainConfig(model="lightgcn", batch_size=batch_size, model_hparams={"n_layers": n_layers}))
  runner = _Runner(built, make_variants(("plain",))[0], 1e-3)
  sampler = NegativeSampler(ds)
  build_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  sample = sampler.epoch(np.random.default_rng([0, 0]))
  sampling_s = time.perf_counter() - t0
  first = runner.timed_epoch(sample, batch_size, jax.random.key(0))  # includes compilation
  t0 = time.perf_counter()
  sample = sampler.epoch(np.random.default_rng([0, 1]))
  sampling2_s = time.perf_counter() - t0
  second = runner.timed_epoch(sample, batch_size, jax.random.key(1))
  rss_train = memory.peak_rss_mib()
  eval_first = runner.timed_eval(ds)  # includes compiling the ranking kernel and building the plan
  eval_second = runner.timed_eval(ds)
  n_eval = int(np.count_nonzero(np.diff(ds.csr("valid")[0])))
  result = {
    "mode": "electronics" + ("-quick" if quick else ""),
    "data": {
      "name": ds.name,
      "n_users": ds.n_users,
      "n_items": ds.n_items,
      "n_train": len(ds.train),
      "generate_s": gen_s,
    },
    "model": {"name": "lightgcn", "n_layers": n_layers, "batch_size": batch_size, "embedding_dim": 64},
    "build_s": build_s,
    "updates_per_epoch": math.ceil(len(ds.train) / batch_size),
    "first_epoch": {"sampling_s": sampling_s, **first, "total_s": sampling_s + first["batching_s"] + first["train_s"]},
    "second_epoch": {
      "sampling_s": sampling2_s,
      **second,
      "total_s": sampling2_s + second["batching_s"] + second["train_s"],
    },
    "eval_first_s": eval_first,
    "eval_s": eval_second,
    "eval_users": n_eval,
    "eval_users_per_s": n_eval / eval_second,
    "peak_rss_after_data": rss_data,
    "peak_rss_after_train": rss_train,
    "peak_rss": memory.peak_rss_mib(),
    "machine": machine_info(),
  }
  return result


def print_electronics(r: dict[str, Any], log: Callable[[str], None] = print) -> None:
  d, f, s = r["data"], r["first_epoch"], r["second_epoch"]
  m = r["machine"]
  log(f"\nmachine: {m['cpu_count']} CPUs, load average {m['loadavg_1_5_15']}, backend {m['backend']}")
  log(
    f"Electronics shape: {d['n_users']:,} users x {d['n_items']:,} items, {d['n_train']:,} training pairs; "
    f"LightGCN {r['model']['n_layers']} layer(s), batch {r['model']['batch_size']}, emb 64, Adam; "
    f"{r['updates_per_epoch']} updates/epoch"
  )
  head = f"{'':34s} {'sampling':>9s} {'batching':>9s} {'train steps':>12s} {'total':>9s}"
  log(head)
  log("-" * len(head))
  log(
    f"{'epoch 1 (incl. compilation) s':34s} {f['sampling_s']:9.2f} {f['batching_s']:9.2f} {f['train_s']:12.2f} "
    f"{f['total_s']:9.2f}"
  )
  log(f"{'epoch 2 s':34s} {s['sampling_s']:9.2f} {s['batching_s']:9.2f} {s['train_s']:12.2f} {s['total_s']:9.2f}")
  log(
    f"full evaluation ({r['eval_users']:,} users x {d['n_items']:,} items, top-50): "
    f"{r['eval_s']:.2f} s ({r['eval_users_per_s']:,.0f} users/s); first pass incl. compilation and plan "
    f"{r['eval_first_s']:.2f} s"
  )
  log(f"data generation {d['generate_s']:.1f} s; model build {r['build_s']:.1f} s")
  p = r["peak_rss"]
  log(
    f"peak RSS: ru_maxrss {p['ru_maxrss_mib']:,.0f} MiB, VmHWM {p.get('vmhwm_mib', float('nan')):,.0f} MiB "
    f"(after data {r['peak_rss_after_data']['ru_maxrss_mib']:,.0f} MiB, after training "
    f"{r['peak_rss_after_train']['ru_maxrss_mib']:,.0f} MiB)"
  )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


PROG = "python -m benchmarks.speed"
METHODS = ("plain", "mg", "sam", "gnp")


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``python -m benchmarks.speed`` runs, checked (:func:`parse_args`)."""

  electronics: bool = False
  quick: bool = False
  cases: tuple[str, ...] = ("vbpr", "lightgcn1", "lightgcn3", "bm3")
  methods: tuple[str, ...] = METHODS
  betas: tuple[int, ...] = (1, 3, 5)
  repeats: int = 7
  epoch_repeats: int = 3
  electronics_layers: int = 1
  json: Optional[Path] = None


#: The flags of Baby mode, which ``--electronics`` does not take.
_BABY_FLAGS = ("models", "methods", "betas", "repeats", "epoch_repeats")


def build_parser() -> argparse.ArgumentParser:
  p = arguments.ArgumentParser(PROG, __doc__)
  models = lambda text: parse_names(text, list(MODEL_CASES), "model")
  p.add_argument(
    "--models",
    type=models,
    default=None,
    help="comma list of vbpr, lightgcn (= lightgcn1 + lightgcn3), lightgcn1, lightgcn3, bm3, layergcn, selfcf "
    "(default vbpr,lightgcn,bm3)",
  )
  methods = lambda text: parse_names(text, list(METHODS), "method")
  p.add_argument("--methods", type=methods, default=None, help="comma list of plain, mg, sam, gnp (default: all)")
  p.add_argument("--betas", type=arguments.integer_list(1), default=None, help="MG intervals timed (default 1,3,5)")
  p.add_argument(
    "--repeats", type=arguments.integer(1), default=None, help="interleaved rounds (default 7; 2 with --quick)"
  )
  p.add_argument(
    "--epoch-repeats",
    type=arguments.integer(1),
    default=None,
    help="rounds that also time a whole epoch and an evaluation (default 3, at most --repeats)",
  )
  p.add_argument("--quick", action="store_true", help="tiny shape, seconds (for tests)")
  p.add_argument(
    "--electronics",
    action="store_true",
    help="one LightGCN epoch + one evaluation at the Electronics shape, with peak RSS",
  )
  p.add_argument(
    "--electronics-layers",
    type=arguments.integer(1),
    default=None,
    help="LightGCN layers in --electronics (default 1)",
  )
  p.add_argument("--json", type=arguments.json_path, default=None, help="write the results to this JSON file")
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
  """The command line as :class:`Options`; a bad or misplaced flag raises :class:`cli.UsageError` naming it."""
  args = build_parser().parse_args(argv)
  if args.electronics:
    given = [f"--{k.replace('_', '-')}" for k in _BABY_FLAGS if getattr(args, k) is not None]
    if given:
      raise cli.UsageError(f"{', '.join(given)}: not taken with --electronics (it times LightGCN only)")
    layers = 1 if args.electronics_layers is None else args.electronics_layers
    return Options(electronics=True, quick=args.quick, electronics_layers=layers, json=args.json)
  if args.electronics_layers is not None:
    raise cli.UsageError("--electronics-layers: taken only with --electronics")
  names = args.models or ("vbpr", "lightgcn", "bm3")
  methods = tuple(args.methods or METHODS)
  repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
  epoch_repeats = args.epoch_repeats if args.epoch_repeats is not None else 3
  return Options(
    quick=args.quick,
    cases=tuple(dict.fromkeys(k for n in names for k in MODEL_CASES[n])),
    methods=methods,
    betas=tuple(dict.fromkeys(args.betas or (1, 3, 5))),
    repeats=repeats,
    epoch_repeats=min(epoch_repeats, repeats),
    json=args.json,
  )


def execute(options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark :class:`Options` ask for, writes ``options.json`` if set, and returns the result."""
  if options.electronics:
    result = run_electronics(n_layers=options.electronics_layers, quick=options.quick, log=log)
  else:
    result = run_baby(
      options.cases,
      quick=options.quick,
      repeats=options.repeats,
      epoch_repeats=options.epoch_repeats,
      variants=make_variants(options.methods, options.betas),
      log=log,
    )
  if options.json is not None:
    atomic_write(options.json, json.dumps(result, indent=1, default=json_default))
    log(f"wrote {options.json}")
  return result


def report(result: dict[str, Any]) -> None:
  """Prints the tables of a result of :func:`execute`."""
  if result["mode"].startswith("electronics"):
    print_electronics(result)
  else:
    print_baby(result)
