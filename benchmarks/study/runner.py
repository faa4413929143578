"""Running a study: load its data, train what its plan still lacks (:func:`run_study`), and the one call behind
``python -m benchmarks.study`` (:func:`execute` with a validated :class:`StudyOptions`).

Every run is a record in the run store (:class:`benchmarks.training.records.RunStore`, default
``benchmarks/results/<name>/runs/``): a re-run skips finished runs, resumes an interrupted one from its
checkpoint and never reuses a record of another config, data or results version. Several processes can
work on one study at once (start the command again, or give ``workers``: one single-threaded process per
core, :mod:`benchmarks.runtime.workers`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np

from benchmarks.data import dataset as data_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.runtime import cli
from benchmarks.runtime import workers as workers_lib
from benchmarks.study import probes as probes_lib
from benchmarks.study.analysis import analyse, pool_studies
from benchmarks.study.plan import Plan, select_cells
from benchmarks.study.report import write_outputs, write_pooled_outputs
from benchmarks.study.spec import REPO_ROOT, SpecError, Study
from benchmarks.training.records import RunStore, StoreError

__all__ = [
  "PooledOptions",
  "PooledOutcome",
  "StudyOptions",
  "StudyOutcome",
  "execute",
  "execute_pooled",
  "load_datasets",
  "run_study",
]


def load_datasets(study: Study) -> dict[str, data_lib.Dataset]:
  """Every data set of the study, loaded once (an error names the cell's data spec)."""
  out = {}
  for cell in study.cells:
    if cell.data not in out:
      try:
        out[cell.data] = data_lib.load(cell.data_path())
      except (OSError, ValueError) as e:
        raise SpecError(f"{study.source}: data {cell.data!r} (resolved to {cell.data_path()}): {e}") from e
  return out


def _fmt_s(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def run_study(
  plan: Plan,
  *,
  stop_after: Optional[float] = None,
  max_runs: Optional[int] = None,
  progress: Optional[bool] = None,
  poll_s: float = 15.0,
  out=None,
  cells: Optional[Sequence[str]] = None,
) -> int:
  """Runs every unfinished run of ``plan`` (skipping finished ones and those other workers hold).

  ``cells``: only the runs of those cells (and the tuning they depend on), in that order
  (:meth:`Plan.runs`). Stops when every run is done, after ``max_runs`` runs, or -- between runs -- once
  ``stop_after`` seconds have passed. With ``progress`` (default: stdout is a terminal) a tqdm bar over runs shows
  the ETA; otherwise one line per finished run. Returns the number of runs this call trained.
  """
  from tqdm.auto import tqdm

  out = sys.stdout if out is None else out
  if progress is None:
    progress = out.isatty()
  t0 = time.perf_counter()
  trained, durations = 0, []
  runs, waiting = plan.runs(cells)
  total = len(runs) + waiting
  done = sum(plan.record(r) is not None for r in runs)
  bar = tqdm(total=total, initial=done, unit="run", disable=not progress, file=out, dynamic_ncols=True)
  which = f" (cells {', '.join(cells)})" if cells is not None else ""
  print(f"study {plan.study.name}{which}: {done}/{total} runs in the store, {total - done} to go", file=out, flush=True)
  try:
    while True:
      if max_runs is not None and trained >= max_runs:
        break
      if stop_after is not None and time.perf_counter() - t0 > stop_after:
        print(
          f"study {plan.study.name}: stopping after {_fmt_s(time.perf_counter() - t0)} (--stop-after)",
          file=out,
          flush=True,
        )
        break
      runs, waiting = plan.runs(cells)
      pending = [r for r in runs if plan.record(r) is None]
      if not pending and not waiting:
        if _run_probes(plan, cells, max_runs=None if max_runs is None else max_runs - trained, out=out):
          trained += 1
          continue
        break
      ran = False
      for r in pending:
        with plan.store.claim(r.key) as held:
          if not held or plan.record(r) is not None:
            continue
          start = time.perf_counter()
          rec = plan.store.run(plan.datasets[r.cell.data], r.config, info=r.info())
          durations.append(time.perf_counter() - start)
          trained += 1
          ran = True
          done_now = sum(plan.record(x) is not None for x in runs)
          left = total - done_now
          if progress:
            bar.n = done_now
            bar.set_postfix_str(r.describe()[:60])
            bar.refresh()
          else:
            result = (
              f"valid {r.config.valid_metric} {rec['valid'][r.config.valid_metric]:.4f}, test recall@20 "
              f"{rec['test']['recall@20']:.4f}, {rec['epochs']} epochs"
              if rec["status"] == "ok"
              else rec["status"]
            )
            eta = _fmt_s(float(np.mean(durations)) * left)
            print(
              f"[{done_now}/{total}] {r.describe()}: {result}, {durations[-1]:.0f} s; ETA {eta}", file=out, flush=True
            )
        break
      if not ran:
        held = [r for r in pending if (plan.store.work_dir / f"{r.key}.lock").exists()]
        if len(held) == len(pending):  # everything left is running elsewhere or waits for it
          time.sleep(poll_s)
  finally:
    bar.close()
  return trained


def _run_probes(plan: Plan, cells: Optional[Sequence[str]], *, max_runs: Optional[int], out) -> bool:
  """Measures one robustness probe (:mod:`benchmarks.study.probes`) that no other worker holds; ``False``
  when none is left to measure here (all stored, held elsewhere, or ``max_runs`` is 0)."""
  if max_runs is not None and max_runs <= 0:
    return False
  store = probes_lib.probe_store(plan.store)
  todo, _ = probes_lib.planned_probes(plan, cells)
  todo = [p for p in todo if not store.path(p.key).exists()]
  for p in todo:
    with store.claim(p.key) as held:
      if not held or store.path(p.key).exists():
        continue
      rec = probes_lib.measure(plan, p)
      noise = rec["noise"]["results"][0]
      print(
        f"[robustness {len(store.keys())}] {p.describe()}: reproduced {rec['reproduced']}, "
        f"drop at sigma {noise['sigma']:g}: {100 * (noise['recall@5']['drop'] or 0):+.1f} % recall@5, "
        f"top eigenvalue {rec['flatness']['top_eigenvalue']:.4g}, {rec['wall_s']:.0f} s",
        file=out,
        flush=True,
      )
      return True
  return False  # every one left is stored or held by another worker


# --------------------------------------------------------------------------------------------------
# The command's one call
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """What one ``python -m benchmarks.study`` call does, validated on construction.

  Attributes:
    study: the parsed spec (:func:`benchmarks.study.spec.load_spec`).
    store_dir: results directory (records in ``<store_dir>/runs/``, reports beside them).
    work_dir: checkpoints and locks of running runs.
    report_only: train nothing; report from the stored records.
    stop_after: start no new run after this many seconds.
    max_runs: train at most this many runs, then report.
    list_stale: print the stored records no run of the spec uses.
    cells: train only these cells (:func:`benchmarks.study.plan.select_cells`); the report covers every cell.
    progress: a progress bar (``True``), one line per run (``False``), or a bar when stdout is a terminal.
    workers: worker processes (one per core); 1: this process.
    train_only: a ``workers`` worker: train, report nothing.

  Raises:
    benchmarks.runtime.cli.UsageError: a value a user can fix; the message names the flag.
  """

  study: Study
  store_dir: Path
  work_dir: Path
  report_only: bool = False
  stop_after: Optional[float] = None
  max_runs: Optional[int] = None
  list_stale: bool = False
  cells: Optional[tuple[str, ...]] = None
  progress: Optional[bool] = None
  workers: int = 1
  train_only: bool = False

  def __post_init__(self):
    if self.stop_after is not None and not (math.isfinite(self.stop_after) and self.stop_after > 0):
      raise cli.UsageError(f"--stop-after must be a positive number of seconds, got {self.stop_after}")
    if self.max_runs is not None and self.max_runs < 1:
      raise cli.UsageError(f"--max-runs must be >= 1, got {self.max_runs}")
    if self.cells is not None and self.report_only:
      raise cli.UsageError(
        "--cells chooses what to train; it cannot be combined with --report-only (the report covers every cell)"
      )
    if self.workers != 1:
      try:
        workers_lib.check_workers(self.workers)
      except ValueError as e:
        raise cli.UsageError(str(e)) from e
      for flag, given in (
        ("--report-only", self.report_only),
        ("--max-runs", self.max_runs is not None),
        ("--list-stale", self.list_stale),
      ):
        if given:
          raise cli.UsageError(f"--workers {self.workers} cannot be combined with {flag}")
    if self.cells is not None:
      select_cells(self.study, self.cells)  # SpecError (a UsageError) naming --cells
    for flag, d in (("--store", self.store_dir), ("--work-dir", self.work_dir)):
      if d.exists() and not d.is_dir():
        raise cli.UsageError(f"{flag} {d} exists and is not a directory")

  @staticmethod
  def default_store(study: Study) -> Path:
    return REPO_ROOT / "benchmarks" / "results" / study.name

  @staticmethod
  def default_work_dir(study: Study) -> Path:
    return Path("runs") / "study" / study.name


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
  """What :func:`execute` did: the figures (:func:`benchmarks.study.analysis.analyse`; empty for a ``train_only``
  worker) and the report files it wrote."""

  result: dict[str, Any]
  written: list[Path]


def execute(options: StudyOptions, *, out: Optional[TextIO] = None) -> StudyOutcome:
  """Loads the study's data, trains what is missing (unless ``report_only``), analyses every record and writes
  the reports to ``options.store_dir``. Progress goes to ``out`` (default stdout).

  Raises:
    benchmarks.runtime.cli.UsageError: unreadable data (:class:`SpecError`), a damaged record
      (:class:`StoreError`) or a failed worker.
  """
  out = sys.stdout if out is None else out
  study = options.study
  datasets = load_datasets(study)
  for ds_spec, ds in datasets.items():
    print(
      f"data {ds_spec}: {ds.n_users} users, {ds.n_items} items, {len(ds.train)}/{len(ds.valid)}/{len(ds.test)} "
      f"train/valid/test, fingerprint {dataset_fingerprint(ds)[:12]}",
      file=out,
    )
  if options.workers > 1:
    worker_argv = [
      str(Path(study.source).resolve()),
      "--store",
      str(options.store_dir.resolve()),
      "--work-dir",
      str(options.work_dir.resolve()),
      "--no-progress",
      "--train-only",
    ]
    if options.stop_after is not None:
      worker_argv += ["--stop-after", str(options.stop_after)]
    if options.cells is not None:
      worker_argv += ["--cells", ",".join(options.cells)]
    codes = workers_lib.run_workers(options.workers, worker_argv)
    failed = [f"worker {i} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
      raise cli.UsageError(f"{', '.join(failed)} failed; see its output above")
  plan = Plan(study, datasets, RunStore(options.store_dir / "runs", options.work_dir))
  try:
    if options.list_stale:
      runs, _ = plan.runs()
      for p in plan.store.stale({r.key for r in runs}):
        print(p, file=out)
    if not options.report_only and options.workers == 1:
      run_study(
        plan,
        stop_after=options.stop_after,
        max_runs=options.max_runs,
        progress=options.progress,
        cells=options.cells,
        out=out,
      )
    if options.train_only:
      return StudyOutcome({}, [])
    result = analyse(plan)
  except StoreError as e:
    raise cli.UsageError(str(e)) from e
  return StudyOutcome(result, write_outputs(result, options.store_dir))


@dataclasses.dataclass(frozen=True)
class PooledOptions:
  """Several studies reported from their records (each a ``report_only`` :class:`StudyOptions`) and the
  random-effects estimate pooled across all their cells, written to ``out_dir``.

  Raises:
    benchmarks.runtime.cli.UsageError: a study that would train, a study given twice, or ``out_dir`` a file.
  """

  studies: tuple[StudyOptions, ...]
  out_dir: Path

  def __post_init__(self):
    if not self.studies:
      raise cli.UsageError("--pooled: give at least one SPEC")
    trains = [o.study.source for o in self.studies if not o.report_only]
    if trains:
      raise cli.UsageError(f"--pooled reports from the stored records only: add --report-only (would train {trains})")
    names = [o.study.name for o in self.studies]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise cli.UsageError(f"--pooled: study {', '.join(repeated)} given twice")
    if self.out_dir.exists() and not self.out_dir.is_dir():
      raise cli.UsageError(f"--pooled-store {self.out_dir} exists and is not a directory")

  @staticmethod
  def default_out_dir() -> Path:
    return REPO_ROOT / "benchmarks" / "results" / "pooled"


@dataclasses.dataclass(frozen=True)
class PooledOutcome:
  """What :func:`execute_pooled` did: each study's outcome, the pooled figures and the files written for them."""

  studies: tuple[StudyOutcome, ...]
  pooled: dict[str, Any]
  written: list[Path]


def execute_pooled(options: PooledOptions, *, out: Optional[TextIO] = None) -> PooledOutcome:
  """:func:`execute` for every study of ``options`` (each writes its own reports), then the estimate pooled
  across all their cells (:func:`benchmarks.study.analysis.pool_studies`), written to ``options.out_dir``."""
  outcomes = tuple(execute(o, out=out) for o in options.studies)
  try:
    pooled = pool_studies([o.result for o in outcomes])
  except ValueError as e:
    raise cli.UsageError(f"--pooled: {e}") from e
  return PooledOutcome(outcomes, pooled, write_pooled_outputs(pooled, options.out_dir))
