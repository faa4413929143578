"""Robustness at study grade: the paper's tables 4-5 measured on a study's evaluation runs, paired over seeds.

A spec's ``[robustness]`` table (:class:`benchmarks.study.spec.Robustness`) names cells, methods and a number
of evaluation seeds. For each of those evaluation runs a *probe* retrains the run -- training is deterministic,
so this reproduces its parameters bit for bit, and the probe records whether its test metrics equal the stored
record's -- then measures on the trained model (:mod:`benchmarks.experiments.robustness`):

* the test metrics under Gaussian noise ``N(0, sigma^2)`` on the embedding tables, ``draws`` draws per
  ``sigma``; the draws depend on the seed only, so plain, MG and SAM of one seed see the same noise;
* where the model reads item features (VBPR, BM3): the test metrics after text swap / image noise of a
  fraction of the items (the same items and donors for every method of a seed);
* the top Hessian eigenvalue of the training loss on a fixed set of training pairs (the same for every run
  of a data set), by power iteration.

A probe is a record in ``<store>/probes/<key>.json``; its key is a hash of the run's key, the measurement
settings and :data:`PROBE_VERSION`, so the accuracy records (``<store>/runs/``) are never touched and a change
of settings measures afresh. :func:`robustness_analysis` turns the probes into paired comparisons: per seed the
relative drop ``(clean - perturbed) / clean`` of each method minus plain's, with a t interval over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import socket
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from benchmarks.experiments import robustness as rob
from benchmarks.study.plan import Plan, PlannedRun, is_ok
from benchmarks.study.stats import relative_change, summarize_paired
from benchmarks.training.loop import fit
from benchmarks.training.records import RunStore, platform

__all__ = [
  "PROBE_VERSION",
  "PlannedProbe",
  "load_probe",
  "measure",
  "planned_probes",
  "probe_key",
  "probe_store",
  "robustness_analysis",
]

#: Version of what a probe measures; bump it when a measurement changes (probes of another version are
#: measured again, never mixed in).
PROBE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PlannedProbe:
  """The robustness measurement of one finished evaluation run."""

  run: PlannedRun
  key: str

  def describe(self) -> str:
    return f"{self.run.describe()} [robustness]"


def probe_key(run_key: str, settings: dict[str, Any]) -> str:
  """24 hex digits of the SHA-256 of the run's key, the measurement settings and :data:`PROBE_VERSION`."""
  text = json.dumps(
    {"probe_version": PROBE_VERSION, "run": run_key, "settings": settings}, sort_keys=True, separators=(",", ":")
  )
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def probe_store(store: RunStore) -> RunStore:
  """The probes' store beside the runs': records in ``<store>/probes/``, work in ``<work dir>/probes/``."""
  return RunStore(store.records_dir.parent / "probes", store.work_dir / "probes")


def planned_probes(plan: Plan, cells: Optional[Sequence[str]] = None) -> tuple[list[PlannedProbe], int]:
  """The probes that can run now (their evaluation run is finished), and how many wait for their run.

  ``cells``: only those of the robustness cells (all of them by default). A diverged run has no probe.
  """
  spec = plan.study.robustness
  if spec is None:
    return [], 0
  names = [n for n in spec.cells if cells is None or n in cells]
  settings = spec.settings()
  probes, waiting = [], 0
  for name in names:
    cell = next(c for c in plan.study.cells if c.name == name)
    seeds = set(plan.study.eval_seeds(cell, "plain")[: spec.seeds])
    runs, _ = plan.eval_runs(cell)
    chosen = [r for r in runs if r.label in spec.methods and r.seed in seeds]
    waiting += len(spec.methods) * spec.seeds - len(chosen)  # runs waiting for their grid winner
    for r in chosen:
      rec = plan.record(r)
      if is_ok(rec):
        probes.append(PlannedProbe(r, probe_key(r.key, settings)))
      elif rec is None:
        waiting += 1
  return probes, waiting


def measure(plan: Plan, probe: PlannedProbe, *, progress: bool = False) -> dict[str, Any]:
  """Retrains ``probe``'s run (resuming from ``<work dir>/probes/<key>``), measures it, stores the record.

  The caller must hold the probe's claim (``probe_store(plan.store).claim(probe.key)``).
  """
  spec = plan.study.robustness
  assert spec is not None
  run = probe.run
  ds = plan.datasets[run.cell.data]
  record = plan.record(run)
  store = probe_store(plan.store)
  ckpt = store.work_dir / probe.key
  t0 = time.perf_counter()
  fitted = fit(ds, run.config, checkpoint_dir=ckpt, checkpoint_every=5, resume=True, progress=progress)
  trained_s = time.perf_counter() - t0
  g, params, rest = fitted.graphdef, fitted.params, fitted.rest
  clean = rob.heldout_metrics(g, params, rest, ds, metrics=spec.metrics)
  kw = dict(repeats=spec.draws, seed=run.seed, clean=clean, metrics=spec.metrics)
  batches = rob.fixed_batches(ds, batch_size=run.config.batch_size, max_pairs=spec.hessian_pairs)
  out = {
    "key": probe.key,
    "probe_version": PROBE_VERSION,
    "run_key": run.key,
    "info": run.info(),
    "model": run.config.model,
    "method": run.config.method,
    "seed": run.seed,
    "settings": spec.settings(),
    # training is deterministic: the retrained run must score exactly what the stored record says
    "reproduced": fitted.record["test"] == record["test"],
    "mismatched": {  # the test metrics that differ, as [stored, retrained] (empty when reproduced)
      m: [record["test"].get(m), v] for m, v in fitted.record["test"].items() if record["test"].get(m) != v
    },
    "clean": clean,
    "noise": rob.noise_experiment(g, params, rest, ds, sigmas=spec.sigmas, **kw),
    "adjustment": rob.adjustment_experiment(g, params, rest, ds, fractions=spec.fractions, **kw),
    "flatness": rob.sharpness(g, params, rest, batches, num_iters=spec.hessian_iters),
    "train_s": trained_s,
    "host": socket.gethostname(),
    "platform": platform(),
  }
  out["wall_s"] = time.perf_counter() - t0
  out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  store.put(out)
  shutil.rmtree(ckpt, ignore_errors=True)
  return out


def load_probe(plan: Plan, probe: PlannedProbe) -> Optional[dict[str, Any]]:
  """The stored record of ``probe``, or ``None``."""
  store = probe_store(plan.store)
  path = store.path(probe.key)
  return store.read(path) if path.exists() else None


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def _perturbations(probe: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
  """``(kind, level) -> result row`` of one probe record: ``("noise", sigma)``, ``("text_swap", fraction)``..."""
  out = {("noise", r["sigma"]): r for r in probe["noise"]["results"]}
  if probe["adjustment"].get("applicable"):
    out.update({(r["kind"], r["fraction"]): r for r in probe["adjustment"]["results"]})
  return out


def _summary_row(d: Sequence[float]) -> dict[str, Any]:
  s = summarize_paired(d)
  return {"n": s.n, "mean": s.mean, "ci": list(s.t_ci), "t_p": s.t_p, "wins": s.wins, "losses": s.losses}


def robustness_analysis(plan: Plan) -> Optional[dict[str, Any]]:
  """Paired comparisons of every robustness measurement, each method against plain, over seeds.

  Per cell, method, perturbation (kind, level) and metric: ``drop = 100 * (clean - perturbed mean) / clean``
  (% of the clean metric) of plain and of the method on the same seeds, and ``delta = method drop - plain
  drop`` in percentage points with a t interval (negative: the method loses less; a negative drop is a gain).
  The top Hessian eigenvalue is compared as the per-seed relative change ``100 * (method - plain) / plain`` (the
  difference ``method - plain`` where a plain eigenvalue is not positive). Exploratory: unadjusted.
  ``None`` when the spec has no ``[robustness]``.
  """
  spec = plan.study.robustness
  if spec is None:
    return None
  probes, waiting = planned_probes(plan)
  found = {}
  for p in probes:
    rec = load_probe(plan, p)
    if rec is not None:
      found[(p.run.cell.name, p.run.label, p.run.seed)] = rec
  rows, flatness = [], []
  for name in spec.cells:
    for method in spec.methods[1:]:
      seeds = sorted(s for (c, m, s) in found if c == name and m == method and (c, "plain", s) in found)
      if not seeds:
        continue
      pairs = [(found[(name, "plain", s)], found[(name, method, s)]) for s in seeds]
      perturbed = [(_perturbations(a), _perturbations(b)) for a, b in pairs]
      kinds = sorted(set.intersection(*(set(a) & set(b) for a, b in perturbed)))

      def drops(side: int, kind: str, level: float, metric: str) -> np.ndarray:
        values = [pair[side][(kind, level)][metric]["drop"] for pair in perturbed]
        return np.array([math.nan if d is None else 100.0 * d for d in values])

      for kind, level in kinds:
        for metric in spec.metrics:
          plain_d, method_d = drops(0, kind, level, metric), drops(1, kind, level, metric)
          ok = np.isfinite(plain_d) & np.isfinite(method_d)
          rows.append(
            {
              "cell": name,
              "method": method,
              "kind": kind,
              "level": level,
              "metric": metric,
              "plain_drop": float(np.mean(plain_d[ok])) if ok.any() else math.nan,
              "method_drop": float(np.mean(method_d[ok])) if ok.any() else math.nan,
              "delta": _summary_row(method_d[ok] - plain_d[ok]),
            }
          )
      eig_p = np.array([a["flatness"]["top_eigenvalue"] for a, _ in pairs])
      eig_m = np.array([b["flatness"]["top_eigenvalue"] for _, b in pairs])
      # relative where every plain eigenvalue is positive (a flat direction has a small positive one); else the
      # plain difference (power iteration finds the eigenvalue largest in magnitude, of either sign)
      relative = bool(np.all(eig_p > 0))
      flatness.append(
        {
          "cell": name,
          "method": method,
          "plain_median": float(np.median(eig_p)),
          "method_median": float(np.median(eig_m)),
          "relative": relative,
          "change": _summary_row(relative_change(eig_m, eig_p) if relative else eig_m - eig_p),
        }
      )
  total = len(probes) + waiting
  return {
    "settings": spec.settings(),
    "cells": list(spec.cells),
    "methods": list(spec.methods),
    "seeds": spec.seeds,
    "done": len(found),
    "total": total,
    "reproduced": sum(bool(r["reproduced"]) for r in found.values()),
    "rows": rows,
    "flatness": flatness,
  }
