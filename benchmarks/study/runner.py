"""A powered, honest answer to "does Mirror Gradient help?": tune on validation, evaluate on fresh seeds.

    python -m benchmarks.study benchmarks/studies/tiny.toml            # a minute, synthetic data
    python -m benchmarks.study benchmarks/studies/scientific.toml      # hours; resumable
    python -m benchmarks.study benchmarks/studies/scientific.toml --workers 2   # one worker per core
    python -m benchmarks.study benchmarks/studies/scientific.toml --report-only

For every (data set, model) cell of the spec (:mod:`benchmarks.study_spec`):

1. **Tuning.** Plain training and every grid point of every method on the tuning seeds; a method's
   winner has the best mean *validation* metric (``valid_metric``, default recall@20) -- test metrics
   play no part. A winner on the edge of its grid is flagged.
2. **Evaluation.** Plain and each method's winner (and, with ``defaults_too``, the method at its
   default hyper-parameters) on fresh evaluation seeds, never the tuning seeds. Same seed = same
   initialisation and data order, so each seed gives a paired relative change of every test metric;
   :mod:`benchmarks.stats` summarises them (mean, t and bootstrap 95 % CIs, Wilcoxon p, Holm-adjusted
   over every comparison of the study, wins) next to the cost (gradient evaluations, wall time).
3. **The paper's protocol, from the same runs.** On each tuning seed alone, the grid point with the best
   *test* recall@20 against plain on that seed -- the gain a single-seed, tuned-on-test protocol would
   print -- and its **A/A control**: plain against the best of ``k`` plain runs that differ only in
   their data order (``TrainConfig.order_seed``; ``k`` = the method's grid size), i.e. the gain that
   protocol prints when there is nothing to find.

Every run is a record in the run store (:mod:`benchmarks.run_store`, default
``benchmarks/results/<name>/runs/``): a re-run skips finished runs, resumes an interrupted one from its
checkpoint and never reuses a record of another config, data or results version. Several processes can
work on one study at once (start the command again, or give ``--workers N``: one single-threaded
process per core, :mod:`benchmarks.workers`). ``--report-only`` recomputes every figure from the
records without training. Outputs (``benchmarks/results/<name>/``): ``study.json``, ``study.csv``,
``study.md`` (the comparison as a Markdown table) and ``forest.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.data import dataset as data_lib
from benchmarks.study import stats
from benchmarks.runtime import cli
from benchmarks.runtime import workers as workers_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.training.records import RunStore, StoreError, run_key, trained_on
from benchmarks.study.report import beside_paper, format_markdown, format_report, write_outputs
from benchmarks.study.spec import METRICS, REPO_ROOT, SELECT_METRIC, Cell, SpecError, Study, load_spec
from benchmarks.training.config import TrainConfig

__all__ = [
  "INTERRUPTED_EXIT",
  "Plan",
  "PlannedRun",
  "analyse",
  "beside_paper",
  "format_markdown",
  "format_report",
  "main",
  "run_study",
  "write_outputs",
]

#: Exit status after an interrupt (SIGINT), as a shell reports a process ended by it.
INTERRUPTED_EXIT = cli.INTERRUPTED_EXIT


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  cell: Cell
  phase: str  # "tune", "eval" or "aa"
  label: str  # "plain", a method, or "<method>@default"
  point: Mapping[str, Any]
  seed: int
  order_seed: Optional[int]
  config: TrainConfig
  key: str

  def describe(self) -> str:
    model = dict(self.config.model_hparams) if self.cell.model_grid else {}
    point = " ".join(f"{k}={v:g}" for k, v in {**model, **self.point}.items())
    order = f" order {self.order_seed}" if self.order_seed is not None else ""
    return f"{self.cell.name} {self.label}{' ' + point if point else ''} seed {self.seed}{order} ({self.phase})"

  def info(self) -> dict[str, Any]:
    return {
      "cell": self.cell.name,
      "phase": self.phase,
      "label": self.label,
      "point": dict(self.point),
      "seed": self.seed,
      "order_seed": self.order_seed,
      "model_hparams": dict(self.config.model_hparams),
    }


class Plan:
  """The runs of a study, and what the finished ones decide (grid winners)."""

  def __init__(self, study: Study, datasets: Mapping[str, data_lib.Dataset], store: RunStore):
    self.study = study
    self.datasets = datasets
    self.store = store
    self._records: dict[str, dict[str, Any]] = {}

  # -- records -------------------------------------------------------------------------------------

  def record(self, run: PlannedRun) -> Optional[dict[str, Any]]:
    """The finished record of ``run`` (cached once found), or ``None``."""
    rec = self._records.get(run.key)
    if rec is None:
      rec = self.store.get(run.config, self.fingerprint(run.cell))
      if rec is not None:
        self._records[run.key] = rec
    return rec

  def fingerprint(self, cell: Cell) -> str:
    return dataset_fingerprint(self.datasets[cell.data])

  def _run(
    self,
    cell: Cell,
    phase: str,
    label: str,
    point: Mapping[str, Any],
    seed: int,
    order_seed: Optional[int] = None,
    model_point: Optional[Mapping[str, Any]] = None,
  ) -> PlannedRun:
    """One run of ``cell``; its model hyper-parameters are ``model_point`` or else the cell's model winner."""
    method = label.split("@")[0]
    if model_point is None:
      model_point = self.model_winner(cell)
      if model_point is None:
        raise LookupError(f"{cell.name}: the model grid has not been decided yet")
    config = self.study.config(cell, method, point, seed, order_seed, model_point)
    return PlannedRun(
      cell, phase, label, dict(point), seed, order_seed, config, run_key(config, self.fingerprint(cell))
    )

  # -- the phases ----------------------------------------------------------------------------------

  def model_table(self, cell: Cell) -> Optional[list[tuple[dict[str, Any], float]]]:
    """Plain training over the cell's model grid: ``[(model point, mean validation metric)]`` over the
    tuning seeds, or ``None`` until all have run (``[({}, nan)]`` for a cell without a model grid)."""
    src = self.study.cell(cell.tune_from, cell.model) if cell.tune_from else cell
    points = self.study.model_points(src)
    if points == [{}]:
      return [({}, math.nan)]
    return self._mean_valid(
      src, "plain", points, lambda mp, seed: self._run(src, "tune", "plain", {}, seed, model_point=mp)
    )

  def model_winner(self, cell: Cell) -> Optional[dict[str, Any]]:
    """The model grid point with the best mean validation metric of plain training, or ``None`` (not yet)."""
    table = self.model_table(cell)
    return None if table is None else max(table, key=lambda t: -math.inf if math.isnan(t[1]) else t[1])[0]

  def tuning_runs(self, cell: Cell) -> list[PlannedRun]:
    """Plain (over the model grid, if any) and every grid point of every method on the tuning seeds, once
    the model grid is decided (none for a ``tune_from`` cell)."""
    if cell.tune_from is not None:
      return []
    runs = [
      self._run(cell, "tune", "plain", {}, seed, model_point=mp)
      for seed in self.study.tuning_seeds
      for mp in self.study.model_points(cell)
    ]
    if self.model_winner(cell) is None:
      return runs
    for seed in self.study.tuning_seeds:
      for method in cell.methods[1:]:
        runs += [self._run(cell, "tune", method, p, seed) for p in self.study.grid_points(method)]
    return runs

  def _count_after_model_tuning(self, cell: Cell) -> int:
    """How many runs of ``cell`` come after its model grid: method tuning, evaluation and A/A."""
    n = sum(len(self.study.eval_seeds(cell, label)) for label in cell.labels())
    if cell.tune_from is None:
      grids = sum(len(self.study.grid_points(m)) for m in cell.methods[1:])
      n += len(self.study.tuning_seeds) * (grids + self.study.aa_variants)
    return n

  def tuning_table(self, cell: Cell, method: str) -> Optional[list[tuple[dict[str, Any], float]]]:
    """``[(point, mean validation metric)]`` over the tuning seeds, or ``None`` until all have run."""
    src = self.study.cell(cell.tune_from, cell.model) if cell.tune_from else cell
    points = self.study.grid_points(method)
    return self._mean_valid(src, method, points, lambda point, seed: self._run(src, "tune", method, point, seed))

  def _mean_valid(
    self, cell: Cell, method: str, points: list[dict[str, Any]], run_of: Callable[[dict[str, Any], int], PlannedRun]
  ) -> Optional[list[tuple[dict[str, Any], float]]]:
    """``[(point, mean validation metric of run_of(point, seed) over the tuning seeds)]`` (a diverged run
    counts as -inf), or ``None`` while any of those runs has no record."""
    metric = self.study.config(cell, method, {}, 0).valid_metric
    table = []
    for point in points:
      values = []
      for seed in self.study.tuning_seeds:
        rec = self.record(run_of(point, seed))
        if rec is None:
          return None
        values.append(rec["valid"][metric] if rec["status"] == "ok" else -math.inf)
      table.append((point, float(np.mean(values))))
    return table

  def winner(self, cell: Cell, method: str) -> Optional[dict[str, Any]]:
    """The grid point with the best mean validation metric (first in grid order on a tie), or ``None``."""
    table = self.tuning_table(cell, method)
    if table is None:
      return None
    return max(table, key=lambda t: t[1])[0]  # max keeps the first of equal scores

  def variant_point(self, cell: Cell, label: str) -> Optional[dict[str, Any]]:
    if label == "plain" or label.endswith("@default"):
      return {}
    return self.winner(cell, label)

  def eval_runs(self, cell: Cell) -> tuple[list[PlannedRun], int]:
    """The evaluation runs that can be planned now (seed-major), and how many still wait for a winner."""
    labels = cell.labels()
    points = {label: self.variant_point(cell, label) for label in labels}
    runs, waiting = [], 0
    for seed in range(self.study.eval_seed_start, self.study.eval_seed_start + cell.eval_seeds["plain"]):
      for label in labels:
        if seed not in self.study.eval_seeds(cell, label):
          continue
        if points[label] is None:
          waiting += 1
        else:
          runs.append(self._run(cell, "eval", label, points[label], seed))
    return runs, waiting

  def aa_runs(self, cell: Cell) -> list[PlannedRun]:
    """Plain on the tuning seeds with data orders ``1..aa_variants`` (the A/A control; tuned cells only)."""
    if cell.tune_from is not None:
      return []
    return [
      self._run(cell, "aa", "plain", {}, seed, order)
      for seed in self.study.tuning_seeds
      for order in range(1, self.study.aa_variants + 1)
    ]

  def cell_runs(self, cell: Cell) -> tuple[list[PlannedRun], int]:
    """The runs of ``cell`` that can be planned now, in the order to run them, and the number not plannable yet."""
    runs = self.tuning_runs(cell)
    if self.model_winner(cell) is None:
      return runs, self._count_after_model_tuning(cell)
    ev, waiting = self.eval_runs(cell)
    return runs + ev + self.aa_runs(cell), waiting

  def runs(self, cells: Optional[Sequence[str]] = None) -> tuple[list[PlannedRun], int]:
    """Every run that can be planned now, in the order to run them, and the number not plannable yet.

    ``cells`` (names as :attr:`Cell.name`, see :func:`select_cells`): only those cells, in that order, each
    after the tuning runs of the cell it takes its winners from (``tune_from``), which it waits for.
    """
    selected = self.study.cells if cells is None else select_cells(self.study, cells)
    runs, waiting, seen = [], 0, set()
    for cell in selected:
      r, w = self.cell_runs(cell)
      if cells is not None and cell.tune_from is not None:
        r = self.tuning_runs(self.study.cell(cell.tune_from, cell.model)) + r
      for run in r:
        if run.key not in seen:
          seen.add(run.key)
          runs.append(run)
      waiting += w
    return runs, waiting

  def progress(self) -> list[dict[str, Any]]:
    """Per cell: finished runs (diverged ones included), all its runs (planned now or waiting for a winner),
    the mean wall time of its finished ``ok`` runs (``mean_run_s``; ``None`` before the first; a diverged
    record has no wall time) and the time its other runs would take at that pace on one worker (``left_s``)."""
    out = []
    for cell in self.study.cells:
      runs, waiting = self.cell_runs(cell)
      records = [rec for rec in map(self.record, runs) if rec is not None]
      walls = [rec["wall_s"] for rec in records if _ok(rec)]
      total = len(runs) + waiting
      mean_s = float(np.mean(walls)) if walls else None
      left = None if mean_s is None else mean_s * (total - len(records))
      out.append({"cell": cell.name, "done": len(records), "total": total, "mean_run_s": mean_s, "left_s": left})
    return out


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def select_cells(study: Study, names: Sequence[str]) -> list[Cell]:
  """The study's cells named in ``names`` (``"<data>/<model>"``, e.g. ``"clothing/layergcn"``), in that order.

  Raises:
    SpecError: a name that is not one of the study's cells (the message lists them), a repeated name, or none.
  """
  by_name = {cell.name: cell for cell in study.cells}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise SpecError(f"--cells: no cell {', '.join(unknown)} in study {study.name}; its cells: {', '.join(by_name)}")
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  if repeated:
    raise SpecError(f"--cells: {', '.join(repeated)} given twice")
  if not names:
    raise SpecError("--cells: no cell given")
  return [by_name[n] for n in names]


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


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def _edges(study: Study, method: str, point: Mapping[str, Any]) -> list[str]:
  return _edges_of(study.grids.get(method, {}), point)


def _edges_of(grid: Mapping[str, Sequence[Any]], point: Mapping[str, Any]) -> list[str]:
  out = []
  for name, values in grid.items():
    if len(values) > 2 and point[name] in (min(values), max(values)):
      out.append(f"{name}={point[name]:g} is the grid's {'minimum' if point[name] == min(values) else 'maximum'}")
  return out


def _ok(rec: Optional[dict[str, Any]]) -> bool:
  return rec is not None and rec.get("status") == "ok"


def analyse(plan: Plan) -> dict[str, Any]:
  """Every figure of the study from the stored records (runs not finished yet are left out and counted)."""
  study = plan.study
  progress = plan.progress()
  comparisons, tuning, paper_protocol = [], [], []
  for cell in study.cells:
    model_table = plan.model_table(cell)
    if model_table is None:
      continue  # the model grid is not decided yet: nothing else of this cell can be compared
    if cell.tune_from is None and study.model_points(cell) != [{}]:
      win = plan.model_winner(cell)
      tuning.append(
        {
          "cell": cell.name,
          "method": "plain (model)",
          "winner": win,
          "edges": _edges_of(cell.model_grid, win),
          "table": [{"point": p, "valid_mean": v} for p, v in model_table],
        }
      )
    plain = {s: plan.record(plan._run(cell, "eval", "plain", {}, s)) for s in study.eval_seeds(cell, "plain")}
    for label in cell.labels()[1:]:
      method = label.split("@")[0]
      point = plan.variant_point(cell, label)
      if point is None:
        continue
      recs = {s: plan.record(plan._run(cell, "eval", label, point, s)) for s in study.eval_seeds(cell, label)}
      seeds = [s for s in recs if _ok(recs[s]) and _ok(plain.get(s))]
      failed = [s for s in recs if recs[s] is not None and not _ok(recs[s])]
      row = {
        "cell": cell.name,
        "data": cell.data_key,
        "model": cell.model,
        "label": label,
        "method": method,
        "point": point,
        "seeds": seeds,
        "n_planned": len(recs),
        "failed_seeds": failed,
        "metrics": {},
      }
      for metric in METRICS:
        if len(seeds) == 0:
          continue
        d = stats.relative_change([recs[s]["test"][metric] for s in seeds], [plain[s]["test"][metric] for s in seeds])
        summ = stats.summarize_paired(d)
        row["metrics"][metric] = {
          "diffs": d.tolist(),
          "n": summ.n,
          "mean": summ.mean,
          "sd": float(np.std(d, ddof=1)) if summ.n > 1 else math.nan,
          "t_ci": list(summ.t_ci),
          "boot_ci": list(summ.boot_ci),
          "t_p": summ.t_p,
          "wilcoxon_p": summ.wilcoxon_p,
          "wins": summ.wins,
          "losses": summ.losses,
          "ties": summ.ties,
          "method_mean": float(np.mean([recs[s]["test"][metric] for s in seeds])),
          "plain_mean": float(np.mean([plain[s]["test"][metric] for s in seeds])),
          "plain_ci": list(stats.mean_ci([plain[s]["test"][metric] for s in seeds])[1]),
        }
      if seeds:
        row["cost"] = {
          "grad_evals_ratio": float(
            sum(recs[s]["grad_evals"] for s in seeds) / sum(plain[s]["grad_evals"] for s in seeds)
          ),
          "wall_ratio": float(sum(recs[s]["wall_s"] for s in seeds) / sum(plain[s]["wall_s"] for s in seeds)),
          "epochs_method": float(np.mean([recs[s]["epochs"] for s in seeds])),
          "epochs_plain": float(np.mean([plain[s]["epochs"] for s in seeds])),
          "where": sorted({trained_on(r) for s in seeds for r in (recs[s], plain[s])}),
        }
      row["paper"] = [
        dataclasses.asdict(p)
        for p in study.paper
        if p.model == cell.model and p.method == method and label == method and p.data in (None, cell.data_key)
      ]
      comparisons.append(row)

    if cell.tune_from is None:
      for method in cell.methods[1:]:
        table = plan.tuning_table(cell, method)
        if table is None:
          continue
        win = max(table, key=lambda t: t[1])[0]
        tuning.append(
          {
            "cell": cell.name,
            "method": method,
            "winner": win,
            "edges": _edges(study, method, win),
            "table": [{"point": p, "valid_mean": v} for p, v in table],
          }
        )
        paper_protocol.append(_paper_protocol(plan, cell, method))

  p_all = [m["wilcoxon_p"] for row in comparisons for m in row["metrics"].values()]
  adjusted = iter(stats.holm(p_all).tolist())
  for row in comparisons:
    for m in row["metrics"].values():
      m["holm_p"] = next(adjusted)
  result = {
    "study": study.name,
    "description": study.description,
    "source": study.source,
    "runs_done": sum(c["done"] for c in progress),
    "runs_total": sum(c["total"] for c in progress),
    "progress": progress,
    "tuning_seeds": list(study.tuning_seeds),
    "holm_family_size": int(np.sum(np.isfinite(p_all))) if p_all else 0,
    "comparisons": comparisons,
    "tuning": tuning,
    "paper_protocol": [p for p in paper_protocol if p],
  }
  result["beside_paper"] = beside_paper(result)
  return result


def _paper_protocol(plan: Plan, cell: Cell, method: str) -> Optional[dict[str, Any]]:
  """Winner chosen on test on each tuning seed vs plain on that seed, and the A/A control of it."""
  study = plan.study
  points = study.grid_points(method)
  out = {
    "cell": cell.name,
    "method": method,
    "k": len(points),
    "select_metric": SELECT_METRIC,
    "seeds": list(study.tuning_seeds),
    "gain": {},
    "aa_gain": {},
  }
  recs, base = [], []
  for seed in study.tuning_seeds:
    row = [plan.record(plan._run(cell, "tune", method, p, seed)) for p in points]
    b = plan.record(plan._run(cell, "tune", "plain", {}, seed))
    if not all(_ok(r) for r in row) or not _ok(b):
      return None
    recs.append(row)
    base.append(b)
  select = np.array([[r["test"][SELECT_METRIC] for r in row] for row in recs])
  out["winners"] = [points[int(i)] for i in np.argmax(select, axis=1)]
  for metric in METRICS:
    cand = np.array([[r["test"][metric] for r in row] for row in recs])
    g = stats.best_of_k_gain(cand, np.array([b["test"][metric] for b in base]), select)
    out["gain"][metric] = {"per_seed": g.tolist(), "mean": float(np.mean(g))}

  k, n_var = len(points), study.aa_variants
  if n_var >= k:
    aa = [
      [plan.record(plan._run(cell, "aa", "plain", {}, seed, o)) for o in range(1, n_var + 1)]
      for seed in study.tuning_seeds
    ]
    if all(_ok(r) for row in aa for r in row):
      sel = np.array([[r["test"][SELECT_METRIC] for r in row] for row in aa])
      subsets = list(itertools.combinations(range(n_var), k))
      for metric in METRICS:
        cand = np.array([[r["test"][metric] for r in row] for row in aa])
        b = np.array([x["test"][metric] for x in base])
        # every k-subset of the no-op variants is one equally likely "grid": average the gain over them
        g = np.mean([stats.best_of_k_gain(cand[:, list(s)], b, sel[:, list(s)]) for s in subsets], axis=0)
        out["aa_gain"][metric] = {"per_seed": g.tolist(), "mean": float(np.mean(g)), "subsets": len(subsets)}
  return out


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.study",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("spec", help="study spec (TOML), e.g. benchmarks/studies/tiny.toml")
  p.add_argument(
    "--store", default=None, help="results directory (records in <store>/runs/); default benchmarks/results/<name>"
  )
  p.add_argument("--work-dir", default=None, help="checkpoints and locks of running runs; default runs/study/<name>")
  p.add_argument("--report-only", action="store_true", help="train nothing; report from the stored records")
  p.add_argument(
    "--stop-after",
    type=float,
    default=None,
    metavar="SECONDS",
    help="start no new run after this many seconds (a running one finishes)",
  )
  p.add_argument("--max-runs", type=int, default=None, metavar="N", help="train at most N runs, then report")
  p.add_argument(
    "--list-stale",
    action="store_true",
    help="list stored records no run of the spec uses (other config, data or results version)",
  )
  p.add_argument(
    "--cells",
    default=None,
    metavar="NAME[,NAME...]",
    help="train only these cells (<data>/<model>, e.g. clothing/layergcn), in this order, with the tuning "
    "they take their winners from; the report still covers every cell",
  )
  p.add_argument("--no-progress", action="store_true", help="one line per finished run instead of a bar")
  p.add_argument(
    "--workers",
    type=int,
    default=1,
    metavar="N",
    help="train with N worker processes, one per CPU core, each single-threaded and pinned "
    "(benchmarks.workers); default 1: this process, every core",
  )
  p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a --workers worker: no report
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.stop_after is not None and not (math.isfinite(args.stop_after) and args.stop_after > 0):
    parser.error(f"--stop-after must be a positive number of seconds, got {args.stop_after}")
  if args.max_runs is not None and args.max_runs < 1:
    parser.error(f"--max-runs must be >= 1, got {args.max_runs}")
  if args.cells is not None and args.report_only:
    parser.error(
      "--cells chooses what to train; it cannot be combined with --report-only (the report covers every cell)"
    )
  if args.workers != 1:
    try:
      workers_lib.check_workers(args.workers)
    except ValueError as e:
      parser.error(str(e))
    for flag, given in (
      ("--report-only", args.report_only),
      ("--max-runs", args.max_runs is not None),
      ("--list-stale", args.list_stale),
    ):
      if given:
        parser.error(f"--workers {args.workers} cannot be combined with {flag}")
  try:
    study = load_spec(args.spec)
    cells = None if args.cells is None else [n.strip() for n in args.cells.split(",") if n.strip()]
    if cells is not None:
      select_cells(study, cells)
    store_dir = Path(args.store) if args.store else REPO_ROOT / "benchmarks" / "results" / study.name
    work_dir = Path(args.work_dir) if args.work_dir else Path("runs") / "study" / study.name
    for what, d in (("--store", store_dir), ("--work-dir", work_dir)):
      if d.exists() and not d.is_dir():
        parser.error(f"{what} {d} exists and is not a directory")
    datasets = load_datasets(study)
  except SpecError as e:
    parser.error(str(e))
  for ds_spec, ds in datasets.items():
    print(
      f"data {ds_spec}: {ds.n_users} users, {ds.n_items} items, {len(ds.train)}/{len(ds.valid)}/{len(ds.test)} "
      f"train/valid/test, fingerprint {dataset_fingerprint(ds)[:12]}"
    )
  if args.workers > 1:
    worker_argv = [
      str(Path(args.spec).resolve()),
      "--store",
      str(store_dir.resolve()),
      "--work-dir",
      str(work_dir.resolve()),
      "--no-progress",
      "--train-only",
    ]
    if args.stop_after is not None:
      worker_argv += ["--stop-after", str(args.stop_after)]
    if cells is not None:
      worker_argv += ["--cells", ",".join(cells)]
    codes = workers_lib.run_workers(args.workers, worker_argv)
    failed = [f"worker {i} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
      parser.exit(2, f"{parser.prog}: error: {', '.join(failed)} failed; see its output above\n")
  plan = Plan(study, datasets, RunStore(store_dir / "runs", work_dir))
  try:
    if args.list_stale:
      runs, _ = plan.runs()
      for p in plan.store.stale({r.key for r in runs}):
        print(p)
    if not args.report_only and args.workers == 1:
      run_study(
        plan,
        stop_after=args.stop_after,
        max_runs=args.max_runs,
        progress=False if args.no_progress else None,
        cells=cells,
      )
    if args.train_only:
      return {}
    result = analyse(plan)
  except StoreError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  print()
  print(format_report(result))
  written = write_outputs(result, store_dir)
  print("\nwrote " + ", ".join(str(p) for p in written))
  return result
