"""Study specifications: the TOML files under ``benchmarks/studies/`` that ``benchmarks.study`` runs.

A spec names data sets, models, methods, each method's tuning grid, the tuning seeds and how many
evaluation seeds each method gets::

    name = "scientific"                    # results go to benchmarks/results/<name>/
    description = "..."
    tuning_seeds = 3                       # seeds 0, 1, 2 (or a list)
    eval_seed_start = 100                  # evaluation seeds 100, 101, ... (never a tuning seed)
    aa_variants = 6                        # A/A control: plain with this many other data orders
    aa_lr_factors = [0.8, 0.9, 0.95, 1.05, 1.1, 1.25]  # matched A/A: plain, same order, these x learning rate

    [train]                                # TrainConfig fields (defaults: MMRec's)
    max_epochs = 1000
    patience = 20

    [grids]                                # per method; plain has none
    mg = { alpha1 = [1.0, 1.5], alpha2 = [0.1, 0.2, 0.5] }
    sam = { rho = [0.01, 0.05, 0.1] }

    [[cells]]                              # one cell per (data, model)
    data = "../shared/data/scientific"     # relative paths: from the repository root
    models = ["vbpr", "lightgcn"]
    methods = ["plain", "mg", "sam"]
    eval_seeds = { plain = 20, mg = 20, sam = 10 }   # or one number for all; "mg@default" = 8 gives
    #                                      # a defaults_too variant its own number (else its method's)
    # tune_from = "../shared/data/baby"    # no tuning here: use that cell's winners
    # defaults_too = ["mg"]                # also evaluate these methods at their default hyper-parameters
    # model_hparams = { lightgcn = { n_layers = 2 } }
    # model_grids = { layergcn = { reg_weight = [1e-2, 1e-3], dropout = [0.0, 0.1] } }
    #                                      # tuned with plain training first (validation); every run of
    #                                      # the cell then uses the winner

    [primary]                              # the primary analysis, declared before the runs (required)
    metric = "recall@5"                    # one of the test metrics
    test = "paired_t"                      # paired t test on the per-seed relative change (the only one)
    family = "mg-vs-plain"                 # "<method>-vs-plain": that method's winner vs plain, one test
    #                                      # per cell that compares it, Holm-adjusted over those
    alpha = 0.05                           # family-wise level

    [[paper]]                              # published gains to mark in the forest plot
    model = "vbpr"
    method = "mg"
    metric = "recall@5"
    gain = 3.0                             # %
    note = "paper table 3, Baby"
    # plain = 0.0306                       # optional: the published values (both or neither), printed
    # value = 0.0315                       # beside ours; gain must agree with them to 0.1 point

Every mistake is reported with the file and the key before anything trains (:class:`SpecError`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import models
from benchmarks.runtime.cli import UsageError
from benchmarks.training.methods import METHOD_DEFAULTS, METHODS, make_method
from benchmarks.training.config import TrainConfig

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib

__all__ = [
  "Cell",
  "PRIMARY_TESTS",
  "PaperGain",
  "Robustness",
  "Primary",
  "SpecError",
  "Study",
  "load_spec",
  "parse_spec",
  "REPO_ROOT",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS = ("recall@5", "ndcg@5", "recall@20", "ndcg@20")
SELECT_METRIC = "recall@20"  # what the paper's protocol picks its grid winner by (on test)
PRIMARY_TESTS = ("paired_t",)  # the tests a [primary] analysis may declare
_TRAIN_FIELDS = ("optimizer", "learning_rate", "batch_size", "max_epochs", "patience", "eval_every", "valid_metric")
_INT_HPARAMS = {"beta"}


class SpecError(UsageError):
  """A study spec is malformed; the message names the file and the key (a :class:`UsageError`: the command
  prints it as one line and exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class Primary:
  """The pre-specified primary analysis of a study (``[primary]``).

  The family is ``method``'s tuned winner against plain, one comparison per cell that compares ``method``
  (its ``@default`` variants form a secondary family), on ``metric``, tested with ``test`` on the per-seed
  relative change and Holm-adjusted over the family at family-wise level ``alpha``.
  """

  metric: str
  test: str
  method: str
  alpha: float

  @property
  def family(self) -> str:
    return f"{self.method}-vs-plain"


@dataclasses.dataclass(frozen=True)
class Robustness:
  """Study-grade robustness (``[robustness]``; the paper's tables 4-5 as paired measurements).

  Each evaluation run of ``methods`` on the first ``seeds`` evaluation seeds of ``cells`` is retrained (bit for
  bit: the probe checks its test metrics against the stored record) and measured: the relative drop of the
  test ``metrics`` under Gaussian noise of each of ``sigmas`` on the embedding tables (``draws`` draws, the same
  draws for every method of a seed), under text swap / image noise of each of ``fractions`` of the items where
  the model reads item features, and the top Hessian eigenvalue of the training loss on ``hessian_pairs``
  fixed training pairs (``hessian_iters`` power iterations). See :mod:`benchmarks.study.probes`.
  """

  cells: tuple[str, ...]
  methods: tuple[str, ...]
  seeds: int
  sigmas: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
  draws: int = 10
  fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
  hessian_iters: int = 20
  hessian_pairs: int = 8192
  metrics: tuple[str, ...] = ("recall@5", "ndcg@5")

  def settings(self) -> dict[str, Any]:
    """What a probe measures (part of its store key; ``cells``, ``methods`` and ``seeds`` only choose runs)."""
    return {
      "sigmas": list(self.sigmas),
      "draws": self.draws,
      "fractions": list(self.fractions),
      "hessian_iters": self.hessian_iters,
      "hessian_pairs": self.hessian_pairs,
      "metrics": list(self.metrics),
    }


@dataclasses.dataclass(frozen=True)
class PaperGain:
  model: str
  method: str
  metric: str
  gain: float
  note: str
  data: Optional[str] = None  # a data key; None: every cell of that model
  plain: Optional[float] = None  # the published plain value of ``metric`` (reported beside ours)
  value: Optional[float] = None  # the published value with the method


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (data set, model) of a study.

  Attributes:
    data: the data spec as written (a path relative to the repository root, or ``synthetic[:preset]``).
    data_key: a short name for the data set (the directory name or the synthetic spec).
    model: model name.
    methods: the methods compared, ``"plain"`` first.
    eval_seeds: method (or ``"<method>@default"`` variant, which otherwise takes its method's) -> number of
      evaluation seeds (``eval_seed_start, ...``).
    tune_from: data key of the cell (same model) whose grid winners this cell uses; ``None``: tuned here.
    defaults_too: methods also evaluated at their default hyper-parameters (label ``"<method>@default"``).
    model_hparams: the model's constructor arguments.
    model_grid: a grid over model constructor arguments, tuned with plain training on the tuning seeds
      before anything else of the cell; every other run uses its winner (empty: no model tuning).
  """

  data: str
  data_key: str
  model: str
  methods: tuple[str, ...]
  eval_seeds: Mapping[str, int]
  tune_from: Optional[str] = None
  defaults_too: tuple[str, ...] = ()
  model_hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  model_grid: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    return f"{self.data_key}/{self.model}"

  def data_path(self) -> str:
    """``data`` with a relative path resolved against the repository root."""
    if self.data == "synthetic" or self.data.startswith("synthetic:"):
      return self.data
    p = Path(self.data)
    return str(p if p.is_absolute() else (REPO_ROOT / p).resolve())

  def labels(self) -> list[str]:
    """The evaluated variants: ``plain``, each other method (its tuned winner), then ``m@default``."""
    return list(self.methods) + [f"{m}@default" for m in self.defaults_too]


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  description: str
  cells: tuple[Cell, ...]
  grids: Mapping[str, Mapping[str, tuple[Any, ...]]]
  tuning_seeds: tuple[int, ...]
  eval_seed_start: int
  aa_variants: int
  train: Mapping[str, Any]
  paper: tuple[PaperGain, ...] = ()
  source: str = "<spec>"
  primary: Optional[Primary] = None  # required in a spec file; None only for a Study built by hand
  robustness: Optional[Robustness] = None  # [robustness]: None measures none
  # The matched A/A control: plain on the tuning seeds with the same initialisation and data order, at its learning
  # rate times each factor -- candidates that differ from plain as MG's grid points do (in the update only).
  aa_lr_factors: tuple[float, ...] = ()

  def cell(self, data_key: str, model: str) -> Cell:
    for c in self.cells:
      if c.data_key == data_key and c.model == model:
        return c
    raise KeyError(f"{data_key}/{model}")

  def grid_points(self, method: str) -> list[dict[str, Any]]:
    """The grid of ``method`` as a list of points in spec order (``[{}]`` for a method without a grid)."""
    return _points(self.grids.get(method, {}))

  def model_points(self, cell: Cell) -> list[dict[str, Any]]:
    """The cell's model grid as a list of points (``[{}]`` without one)."""
    return _points(cell.model_grid)

  def config(
    self,
    cell: Cell,
    method: str,
    point: Mapping[str, Any],
    seed: int,
    order_seed: Optional[int] = None,
    model_point: Optional[Mapping[str, Any]] = None,
  ) -> TrainConfig:
    """The :class:`TrainConfig` of one run (``model_point`` overrides the cell's model hyper-parameters)."""
    return TrainConfig(
      model=cell.model,
      method=method,
      seed=seed,
      order_seed=order_seed,
      model_hparams={**cell.model_hparams, **(model_point or {})},
      method_hparams=dict(point),
      **self.train,
    )

  def eval_seeds(self, cell: Cell, label: str) -> list[int]:
    n = cell.eval_seeds.get(label, cell.eval_seeds[label.split("@")[0]])
    return list(range(self.eval_seed_start, self.eval_seed_start + n))


def _points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  points: list[dict[str, Any]] = [{}]
  for name, values in grid.items():
    points = [{**p, name: v} for p in points for v in values]
  return points


def load_spec(path: str | Path) -> Study:
  """Reads and validates the spec at ``path`` (see the module docstring)."""
  path = Path(path)
  if not path.is_file():
    raise SpecError(f"study spec {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
  try:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
  except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: not valid TOML: {e}") from e
  return parse_spec(raw, source=str(path))


def _fail(source: str, key: str, msg: str) -> SpecError:
  return SpecError(f"{source}: {key}: {msg}")


def _seeds(source: str, key: str, value: Any) -> tuple[int, ...]:
  if isinstance(value, bool):
    raise _fail(source, key, f"expected a count or a list of seeds, got {value!r}")
  if isinstance(value, int):
    if value < 1:
      raise _fail(source, key, f"must be >= 1, got {value}")
    return tuple(range(value))
  if (
    isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
  ):
    if len(set(value)) != len(value):
      raise _fail(source, key, f"repeats a seed: {value}")
    return tuple(value)
  raise _fail(source, key, f"expected a count >= 1 or a non-empty list of seeds >= 0, got {value!r}")


def _hparam_value(source: str, key: str, name: str, value: Any) -> Any:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _fail(source, key, f"{name} values must be finite numbers, got {value!r}")
  if name in _INT_HPARAMS:
    if float(value) != int(value):
      raise _fail(source, key, f"{name} must be an integer, got {value!r}")
    return int(value)
  return float(value)


def _check_keys(source: str, where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
  unknown = sorted(set(table) - set(allowed))
  if unknown:
    raise _fail(source, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _primary(source: str, raw: Any, cells: Sequence[Cell]) -> Primary:
  """The ``[primary]`` table, validated against the study's cells."""
  if raw is None:
    raise _fail(
      source,
      "[primary]",
      "missing: declare the primary analysis before the runs, e.g. "
      '[primary] metric = "recall@5", test = "paired_t", family = "mg-vs-plain", alpha = 0.05',
    )
  if not isinstance(raw, dict):
    raise _fail(source, "[primary]", f"expected a table, got {raw!r}")
  _check_keys(source, "[primary]", raw, ["metric", "test", "family", "alpha"])
  for key in ("metric", "test", "family", "alpha"):
    if key not in raw:
      raise _fail(source, f"[primary].{key}", "missing")
  metric, test, family, alpha = raw["metric"], raw["test"], raw["family"], raw["alpha"]
  if metric not in METRICS:
    raise _fail(source, "[primary].metric", f"expected one of {list(METRICS)}, got {metric!r}")
  if test not in PRIMARY_TESTS:
    raise _fail(
      source,
      "[primary].test",
      f"expected one of {list(PRIMARY_TESTS)} (the Wilcoxon signed-rank test is reported as a sensitivity "
      f"analysis beside it), got {test!r}",
    )
  compared = sorted({m for c in cells for m in c.methods[1:]})
  method = family[: -len("-vs-plain")] if isinstance(family, str) and family.endswith("-vs-plain") else None
  if method not in compared:
    raise _fail(
      source,
      "[primary].family",
      f"expected '<method>-vs-plain' for a method the cells compare ({', '.join(f'{m}-vs-plain' for m in compared)}), "
      f"got {family!r}",
    )
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
    raise _fail(source, "[primary].alpha", f"expected a number in (0, 1), got {alpha!r}")
  return Primary(metric=metric, test=test, method=method, alpha=float(alpha))


def _numbers(source: str, key: str, value: Any, low: float, high: float) -> tuple[float, ...]:
  """A non-empty list of distinct numbers in ``(low, high)``."""
  if (
    not isinstance(value, list)
    or not value
    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < high for v in value)
    or len(set(value)) != len(value)
  ):
    raise _fail(source, key, f"expected a non-empty list of distinct numbers in ({low:g}, {high:g}), got {value!r}")
  return tuple(float(v) for v in value)


def _robustness(source: str, raw: Any, cells: Sequence[Cell]) -> Optional[Robustness]:
  """The ``[robustness]`` table (``None`` without one), validated against the study's cells."""
  if raw is None:
    return None
  if not isinstance(raw, dict):
    raise _fail(source, "[robustness]", f"expected a table, got {raw!r}")
  fields = [f.name for f in dataclasses.fields(Robustness)]
  _check_keys(source, "[robustness]", raw, fields)
  by_name = {c.name: c for c in cells}
  names = raw.get("cells", list(by_name))
  if not isinstance(names, list) or not names or any(n not in by_name for n in names) or len(set(names)) != len(names):
    raise _fail(source, "[robustness].cells", f"expected distinct cells of {list(by_name)}, got {names!r}")
  methods = raw.get("methods")
  if not isinstance(methods, list) or not methods or methods[0] != "plain" or len(set(methods)) != len(methods):
    raise _fail(source, "[robustness].methods", f"expected distinct methods starting with 'plain', got {methods!r}")
  seeds = raw.get("seeds")
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
    raise _fail(
      source, "[robustness].seeds", f"expected the number (>= 2) of evaluation seeds to measure, got {seeds!r}"
    )
  for name in names:
    cell = by_name[name]
    missing = [m for m in methods if m not in cell.methods]
    if missing:
      raise _fail(source, "[robustness].methods", f"cell {name} does not evaluate {missing}")
    short = {m: cell.eval_seeds[m] for m in methods if cell.eval_seeds[m] < seeds}
    if short:
      raise _fail(source, "[robustness].seeds", f"{seeds} > the evaluation seeds of cell {name}: {short}")
  out = {"cells": tuple(names), "methods": tuple(methods), "seeds": seeds}
  if "sigmas" in raw:
    out["sigmas"] = _numbers(source, "[robustness].sigmas", raw["sigmas"], 0.0, math.inf)
  if "fractions" in raw:
    out["fractions"] = _numbers(source, "[robustness].fractions", raw["fractions"], 0.0, 1.0)
  for key in ("draws", "hessian_iters", "hessian_pairs"):
    if key in raw:
      v = raw[key]
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(source, f"[robustness].{key}", f"expected an integer >= 1, got {v!r}")
      out[key] = v
  if "metrics" in raw:
    m = raw["metrics"]
    if not isinstance(m, list) or not m or any(x not in METRICS for x in m) or len(set(m)) != len(m):
      raise _fail(source, "[robustness].metrics", f"expected distinct metrics of {list(METRICS)}, got {m!r}")
    out["metrics"] = tuple(m)
  return Robustness(**out)


def parse_spec(raw: Mapping[str, Any], *, source: str = "<spec>") -> Study:
  """Validates a parsed TOML spec (a dict) and returns the :class:`Study`."""
  _check_keys(
    source,
    "top level",
    raw,
    [
      "name",
      "description",
      "tuning_seeds",
      "eval_seed_start",
      "aa_variants",
      "aa_lr_factors",
      "train",
      "grids",
      "cells",
      "paper",
      "primary",
      "robustness",
    ],
  )
  name = raw.get("name")
  if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
    raise _fail(source, "name", f"expected a non-empty name of letters, digits, '-', '_' or '.', got {name!r}")
  tuning = _seeds(source, "tuning_seeds", raw.get("tuning_seeds", 3))
  start = raw.get("eval_seed_start", 100)
  if isinstance(start, bool) or not isinstance(start, int) or start < 0:
    raise _fail(source, "eval_seed_start", f"expected an integer >= 0, got {start!r}")
  aa = raw.get("aa_variants", 0)
  if isinstance(aa, bool) or not isinstance(aa, int) or aa < 0:
    raise _fail(source, "aa_variants", f"expected an integer >= 0, got {aa!r}")
  aa_lr = _numbers(source, "aa_lr_factors", raw["aa_lr_factors"], 0.0, math.inf) if "aa_lr_factors" in raw else ()
  if 1.0 in aa_lr:
    raise _fail(source, "aa_lr_factors", "1 is plain itself; give the other factors")

  train = dict(raw.get("train", {}))
  _check_keys(source, "[train]", train, _TRAIN_FIELDS)
  try:
    TrainConfig(**train)
  except (TypeError, ValueError) as e:
    raise _fail(source, "[train]", str(e)) from e

  grids: dict[str, dict[str, tuple[Any, ...]]] = {}
  for method, grid in dict(raw.get("grids", {})).items():
    if method not in METHODS or method == "plain":
      raise _fail(source, f"[grids].{method}", f"not a tunable method; valid: {[m for m in METHODS if m != 'plain']}")
    if not isinstance(grid, dict) or not grid:
      raise _fail(source, f"[grids].{method}", "expected a table of name = [values]")
    clean = {}
    for hp, values in grid.items():
      key = f"[grids].{method}.{hp}"
      if hp not in METHOD_DEFAULTS:
        raise _fail(source, key, f"not a method hyper-parameter; valid: {sorted(METHOD_DEFAULTS)}")
      if not isinstance(values, list) or not values:
        raise _fail(source, key, f"expected a non-empty list, got {values!r}")
      vals = tuple(_hparam_value(source, key, hp, v) for v in values)
      if len(set(vals)) != len(vals):
        raise _fail(source, key, f"repeats a value: {list(vals)}")
      clean[hp] = vals
    grids[method] = clean

  cells: list[Cell] = []
  raw_cells = raw.get("cells")
  if not isinstance(raw_cells, list) or not raw_cells:
    raise _fail(source, "cells", "expected at least one [[cells]] table")
  for i, c in enumerate(raw_cells):
    where = f"cells[{i}]"
    _check_keys(
      source,
      where,
      c,
      ["data", "models", "methods", "eval_seeds", "tune_from", "defaults_too", "model_hparams", "model_grids"],
    )
    data = c.get("data")
    if not isinstance(data, str) or not data:
      raise _fail(source, f"{where}.data", f"expected a data directory or 'synthetic[:preset]', got {data!r}")
    data_key = data if data.startswith("synthetic") else Path(data).name
    model_names = c.get("models")
    if not isinstance(model_names, list) or not model_names or any(m not in models.MODELS for m in model_names):
      raise _fail(source, f"{where}.models", f"expected a list of {sorted(models.MODELS)}, got {model_names!r}")
    methods = c.get("methods")
    if (
      not isinstance(methods, list)
      or not methods
      or methods[0] != "plain"
      or any(m not in METHODS for m in methods)
      or len(set(methods)) != len(methods)
    ):
      raise _fail(
        source,
        f"{where}.methods",
        f"expected a list of distinct {list(METHODS)} starting with "
        f"'plain' (every method is compared with plain), got {methods!r}",
      )
    defaults_too = c.get("defaults_too", [])
    if not isinstance(defaults_too, list) or any(m not in methods or m == "plain" for m in defaults_too):
      raise _fail(source, f"{where}.defaults_too", f"expected methods of {methods[1:]}, got {defaults_too!r}")
    counts = c.get("eval_seeds", 10)
    if isinstance(counts, int) and not isinstance(counts, bool):
      counts = {m: counts for m in methods}
    variants = [f"{m}@default" for m in defaults_too]
    if (
      not isinstance(counts, dict)
      or not set(methods) <= set(counts) <= set(methods) | set(variants)
      or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in counts.values())
    ):
      raise _fail(
        source,
        f"{where}.eval_seeds",
        f"expected a number >= 2 or a table giving every method of {methods} a number >= 2"
        + (f" (and optionally {variants} their own)" if variants else "")
        + f", got {counts!r}",
      )
    if max(counts.values()) > counts["plain"]:
      raise _fail(
        source,
        f"{where}.eval_seeds",
        f"plain needs at least as many seeds as any method (every method's seed is paired with plain's), got {counts}",
      )
    if set(range(start, start + max(counts.values()))) & set(tuning):
      raise _fail(
        source,
        f"{where}.eval_seeds",
        f"evaluation seeds {start}..{start + max(counts.values()) - 1} "
        f"overlap the tuning seeds {list(tuning)}; raise eval_seed_start",
      )
    tune_from = c.get("tune_from")
    if tune_from is not None and not isinstance(tune_from, str):
      raise _fail(source, f"{where}.tune_from", f"expected a data spec of another cell, got {tune_from!r}")
    hp = c.get("model_hparams", {})
    if not isinstance(hp, dict) or any(m not in model_names or not isinstance(v, dict) for m, v in hp.items()):
      raise _fail(source, f"{where}.model_hparams", f"expected tables per model of {model_names}, got {hp!r}")
    model_grids = c.get("model_grids", {})
    if not isinstance(model_grids, dict) or any(
      m not in model_names or not isinstance(v, dict) for m, v in model_grids.items()
    ):
      raise _fail(source, f"{where}.model_grids", f"expected tables per model of {model_names}, got {model_grids!r}")
    if model_grids and tune_from is not None:
      raise _fail(source, f"{where}.model_grids", "a tune_from cell uses its source cell's model winner; tune there")
    clean_model_grids: dict[str, dict[str, tuple[Any, ...]]] = {}
    for model, grid in model_grids.items():
      clean_model_grids[model] = {}
      for hp_name, values in grid.items():
        key = f"{where}.model_grids.{model}.{hp_name}"
        if (
          not isinstance(values, list)
          or not values
          or len(set(map(repr, values))) != len(values)
          or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values)
        ):
          raise _fail(source, key, f"expected a non-empty list of distinct finite numbers, got {values!r}")
        clean_model_grids[model][hp_name] = tuple(values)
    for model in model_names:
      for m in methods[1:]:
        if m not in grids and tune_from is None:
          raise _fail(source, f"{where}.methods", f"method {m!r} has no [grids].{m} to tune")
      cells.append(
        Cell(
          data=data,
          data_key=data_key,
          model=model,
          methods=tuple(methods),
          eval_seeds=dict(counts),
          defaults_too=tuple(defaults_too),
          model_hparams=dict(hp.get(model, {})),
          model_grid=clean_model_grids.get(model, {}),
          tune_from=None
          if tune_from is None
          else (tune_from if tune_from.startswith("synthetic") else Path(tune_from).name),
        )
      )

  names = [c.name for c in cells]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise _fail(source, "cells", f"the same data/model appears twice: {dupes}")
  by_name = {c.name: c for c in cells}
  for c in cells:
    if c.tune_from is not None:
      src = by_name.get(f"{c.tune_from}/{c.model}")
      if src is None or src.tune_from is not None:
        raise _fail(source, f"cells ({c.name}).tune_from", f"no tuned cell {c.tune_from}/{c.model} in this study")
      missing = [m for m in c.methods[1:] if m not in src.methods]
      if missing:
        raise _fail(source, f"cells ({c.name}).tune_from", f"{src.name} does not tune {missing}")

  paper = []
  for i, p in enumerate(raw.get("paper", [])):
    where = f"paper[{i}]"
    _check_keys(source, where, p, ["data", "model", "method", "metric", "gain", "note", "plain", "value"])
    if p.get("metric") not in METRICS or p.get("model") not in models.MODELS or p.get("method") not in METHODS:
      raise _fail(source, where, f"needs model, method and metric (one of {list(METHODS)}, {list(METRICS)}), got {p}")
    if isinstance(p.get("gain"), bool) or not isinstance(p.get("gain"), (int, float)):
      raise _fail(source, f"{where}.gain", f"expected a number (%), got {p.get('gain')!r}")
    published = {}
    for key in ("plain", "value"):
      v = p.get(key)
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise _fail(source, f"{where}.{key}", f"expected the published metric value in (0, 1], got {v!r}")
      published[key] = float(v)
    if len(published) == 1:
      raise _fail(source, where, "give both plain and value (the published figures) or neither")
    if published:
      implied = (published["value"] / published["plain"] - 1) * 100
      if abs(implied - float(p["gain"])) > 0.1:
        raise _fail(
          source,
          f"{where}.gain",
          f"{p['gain']} % disagrees with value / plain = {published['value']} / {published['plain']} "
          f"({implied:+.2f} %)",
        )
    paper.append(
      PaperGain(
        model=p["model"],
        method=p["method"],
        metric=p["metric"],
        gain=float(p["gain"]),
        note=str(p.get("note", "paper")),
        data=p.get("data"),
        **published,
      )
    )

  primary = _primary(source, raw.get("primary"), cells)
  robustness = _robustness(source, raw.get("robustness"), cells)

  study = Study(
    name=name,
    description=str(raw.get("description", "")),
    cells=tuple(cells),
    grids=grids,
    tuning_seeds=tuning,
    eval_seed_start=start,
    aa_variants=aa,
    aa_lr_factors=aa_lr,
    train=train,
    paper=tuple(paper),
    source=source,
    primary=primary,
    robustness=robustness,
  )
  # every run's config and method must build: fail now, not after hours of training
  from benchmarks.training.options import model_build_problem

  for c in cells:
    for mp in study.model_points(c):
      problem = model_build_problem(c.model, {**c.model_hparams, **mp})
      if problem:
        raise _fail(source, f"cells ({c.name}) model {mp or dict(c.model_hparams)}", problem)
    for m in c.methods:
      for point in study.grid_points(m) if m != "plain" else [{}]:
        try:
          cfg = study.config(c, m, point, seed=0)
          make_method(m, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, **cfg.method_hparams)
        except (TypeError, ValueError) as e:
          raise _fail(source, f"cells ({c.name}) method {m} {point}", str(e)) from e
  return study
