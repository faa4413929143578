"""The runs of a study and what the finished ones decide: :class:`Plan` (tuning, evaluation and A/A runs of
every cell, grid winners, progress), :class:`PlannedRun` and :func:`select_cells`.

A plan reads the run store (:class:`benchmarks.training.records.RunStore`) and never trains:
:func:`benchmarks.study.runner.run_study` trains what it plans, :func:`benchmarks.study.analysis.analyse`
reports what it finds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from benchmarks.data import dataset as data_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.study.spec import Cell, SpecError, Study
from benchmarks.training.config import TrainConfig, config_with
from benchmarks.training.records import RunStore, run_key

__all__ = ["Plan", "PlannedRun", "is_ok", "select_cells"]


def is_ok(rec: Optional[dict[str, Any]]) -> bool:
  """Whether ``rec`` is a finished record of a run that trained (not ``None``, not diverged)."""
  return rec is not None and rec.get("status") == "ok"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  cell: Cell
  phase: str  # "tune", "eval", "aa" (other data order) or "aa-lr" (neighbouring learning rate)
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

  def planned_run(
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
      src, "plain", points, lambda mp, seed: self.planned_run(src, "tune", "plain", {}, seed, model_point=mp)
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
      self.planned_run(cell, "tune", "plain", {}, seed, model_point=mp)
      for seed in self.study.tuning_seeds
      for mp in self.study.model_points(cell)
    ]
    if self.model_winner(cell) is None:
      return runs
    for seed in self.study.tuning_seeds:
      for method in cell.methods[1:]:
        runs += [self.planned_run(cell, "tune", method, p, seed) for p in self.study.grid_points(method)]
    return runs

  def _count_after_model_tuning(self, cell: Cell) -> int:
    """How many runs of ``cell`` come after its model grid: method tuning, evaluation and A/A."""
    n = sum(len(self.study.eval_seeds(cell, label)) for label in cell.labels())
    if cell.tune_from is None:
      grids = sum(len(self.study.grid_points(m)) for m in cell.methods[1:])
      n += len(self.study.tuning_seeds) * (grids + self.study.aa_variants + len(self.study.aa_lr_factors))
    return n

  def tuning_table(self, cell: Cell, method: str) -> Optional[list[tuple[dict[str, Any], float]]]:
    """``[(point, mean validation metric)]`` over the tuning seeds, or ``None`` until all have run."""
    src = self.study.cell(cell.tune_from, cell.model) if cell.tune_from else cell
    points = self.study.grid_points(method)
    return self._mean_valid(src, method, points, lambda point, seed: self.planned_run(src, "tune", method, point, seed))

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
          runs.append(self.planned_run(cell, "eval", label, points[label], seed))
    return runs, waiting

  def aa_runs(self, cell: Cell) -> list[PlannedRun]:
    """The A/A controls (tuned cells only): plain on the tuning seeds with data orders ``1..aa_variants``,
    then plain on the tuning seeds at each of :meth:`aa_lr_runs`' neighbouring learning rates."""
    if cell.tune_from is not None:
      return []
    return [
      self.planned_run(cell, "aa", "plain", {}, seed, order)
      for seed in self.study.tuning_seeds
      for order in range(1, self.study.aa_variants + 1)
    ] + [r for seed in self.study.tuning_seeds for r in self.aa_lr_runs(cell, seed)]

  def aa_lr_runs(self, cell: Cell, seed: int) -> list[PlannedRun]:
    """The matched A/A candidates of ``seed``: plain with plain's initialisation and data order at its learning
    rate times each of the study's ``aa_lr_factors`` -- like MG's grid points, they change only the update."""
    base = self.planned_run(cell, "tune", "plain", {}, seed)
    runs = []
    for factor in self.study.aa_lr_factors:
      config = config_with(base.config, learning_rate=base.config.learning_rate * factor)
      point = {"learning_rate": config.learning_rate}
      runs.append(
        PlannedRun(cell, "aa-lr", "plain", point, seed, None, config, run_key(config, self.fingerprint(cell)))
      )
    return runs

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
      walls = [rec["wall_s"] for rec in records if is_ok(rec)]
      total = len(runs) + waiting
      mean_s = float(np.mean(walls)) if walls else None
      left = None if mean_s is None else mean_s * (total - len(records))
      out.append({"cell": cell.name, "done": len(records), "total": total, "mean_run_s": mean_s, "left_s": left})
    return out


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
