"""Compare plain training, Mirror Gradient, SAM and GNP on recommenders -- the main command.

    python -m benchmarks.compare                      # synthetic data, VBPR/LightGCN/BM3 x plain/MG/SAM
    python -m benchmarks.compare --data ../shared/data/scientific --seeds 3
    python -m benchmarks.compare --data ../shared/data/baby --models lightgcn --methods plain,mg

Prints a table (model x method: mean +- sd over seeds of recall/precision/map/ndcg @5 and @20 on
the test split at the best-validation epoch; relative change vs plain from per-seed paired
differences; epochs, wall seconds, gradient evaluations) and writes ``results.json`` (one record
per model/method/seed), ``results.csv`` and ``curves.png`` (validation recall@20 and training loss
against epochs and against gradient evaluations) to ``--out``. Same seed, same data order and same
initialisation for every method, so per-seed differences are paired.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import models
from benchmarks.training import checkpoints
from benchmarks.data import dataset as data_lib
from benchmarks.parallel import distributed
from benchmarks.training.options import (
  DEFAULTS,
  add_training_arguments,
  check_configs,
  check_model_hparams,
  check_training_arguments,
  grid_points,
  load_data_for,
  number,
  parse_grid,
  parse_hparams,
  parse_names,
  point_label,
  setting,
  train_config,
)
from benchmarks.runtime.files import TEMP_SUFFIX, atomic_write_all, json_default, save_png, writable_dir_problem
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.training.methods import METHODS, OPTIMIZERS
from benchmarks.training.config import TrainConfig, TrainingDiverged, config_with
from benchmarks.training.loop import grid_search, train

TABLE_METRICS = [f"{m}@{k}" for k in (5, 20) for m in ("recall", "precision", "map", "ndcg")]
CHANGE_METRICS = ["recall@5", "ndcg@5", "recall@20", "ndcg@20"]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.compare",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--data",
    default="synthetic",
    help="MMRec-layout directory, 'synthetic' or 'synthetic:<preset>' (default: synthetic)",
  )
  p.add_argument("--models", default="vbpr,lightgcn,bm3", help="comma list of " + ",".join(models.MODELS))
  p.add_argument("--methods", default="plain,mg,sam", help="comma list of " + ",".join(METHODS))
  p.add_argument("--seeds", type=number(True, 1), default=DEFAULTS["seeds"], help="seeds 0..N-1 (default %(default)s)")
  add_training_arguments(p)
  p.add_argument(
    "--grid",
    default=None,
    metavar="NAME=V1,V2;NAME=...",
    help="grid over learning_rate, batch_size, method hyper-parameters and hyper-parameters every "
    "model in --models takes; the winner is chosen on validation",
  )
  p.add_argument(
    "--out",
    default="results",
    help="output directory (default: results); one that already holds results.json, results.csv "
    "or curves.png is refused unless --overwrite is given",
  )
  p.add_argument(
    "--checkpoint-dir",
    default=None,
    help="orbax checkpoints, one sub-directory per run (<model>-<method>-seed<k>, plus the grid "
    "point with --grid); a run whose sub-directory already holds checkpoints is refused "
    "unless --resume or --overwrite is given",
  )
  p.add_argument(
    "--checkpoint-every",
    type=number(True, 1),
    default=5,
    metavar="N",
    help="save a checkpoint every N epochs and at the end (default 5; a resumed run "
    "replays the epochs after the last one exactly)",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the runs stored in --checkpoint-dir (a finished one is loaded, not retrained)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the results in --out (the old ones are deleted before training) and, without "
    "--resume, delete the checkpoints these runs already have in --checkpoint-dir",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  distributed.add_arguments(p)  # --coordinator/--num-processes/--process-id, --distributed auto
  return p


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


#: What the command writes to ``--out``.
OUTPUTS = ("results.json", "results.csv", "curves.png")


def check_out_dir(
  parser: argparse.ArgumentParser, out: Path, names: Sequence[str], *, overwrite: bool, option: str = "--out"
) -> None:
  """``parser.error`` unless ``out`` is (or can be created as) a writable directory and, unless
  ``overwrite``, holds none of the outputs ``names`` of an earlier run."""
  problem = writable_dir_problem(out)
  if problem:
    parser.error(f"{option} {out}: {problem}")
  held = [n for n in names if (out / n).exists()]
  if held and not overwrite:
    parser.error(
      f"{option} {out} already holds {', '.join(held)} of an earlier run; pass --overwrite to "
      f"replace them, or choose another {option}"
    )


def clear_outputs(out: Path, names: Sequence[str], *, overwrite: bool) -> None:
  """Removes the temporary files a killed write of ``names`` left in ``out`` and, with ``overwrite``, the
  old outputs ``names`` themselves (so that ``out`` never mixes an earlier run's files with this one's)."""
  for name in names:
    for tmp in out.glob(f".{name}.*{TEMP_SUFFIX}"):
      tmp.unlink(missing_ok=True)
    if overwrite:
      (out / name).unlink(missing_ok=True)


def write_results(out: Path, records: list[dict[str, Any]]) -> None:
  """``results.json`` and ``results.csv`` of ``records``, both from the same records, written together."""
  atomic_write_all(
    {out / "results.json": json.dumps(records, indent=1, default=json_default), out / "results.csv": _csv(records)}
  )


def _csv(records: list[dict[str, Any]]) -> str:
  fields = [
    "model",
    "method",
    "optimizer",
    "seed",
    "status",
    "best_epoch",
    "epochs",
    "wall_s",
    "updates",
    "grad_evals",
    "grad_evals_per_update",
  ]
  metric_names = sorted({k for r in records for k in r.get("test", {})})
  header = fields + [f"valid_{m}" for m in metric_names] + [f"test_{m}" for m in metric_names]
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  for r in records:
    w.writerow(
      [r.get(f, "") for f in fields]
      + [r.get("valid", {}).get(m, "") for m in metric_names]
      + [r.get("test", {}).get(m, "") for m in metric_names]
    )
  return buf.getvalue()


def _plot(records: list[dict[str, Any]], path: Path) -> bool:
  """Writes the curves of the successful runs to ``path``; ``False`` (nothing written) if there are none."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in records if r.get("status") == "ok" and r["history"]]
  model_names = list(dict.fromkeys(r["model"] for r in ok))
  if not model_names:
    return False
  fig, axes = plt.subplots(len(model_names), 4, figsize=(16, 3.2 * len(model_names)), squeeze=False)
  colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
  for row, model in zip(axes, model_names):
    for r in (r for r in ok if r["model"] == model):
      h = r["history"]
      ep = [x["epoch"] + 1 for x in h]
      ge = [x["grad_evals"] for x in h]
      rec = [x["valid"]["recall@20"] for x in h]
      loss = [x["loss"] for x in h]
      label = r["method"] if r["seed"] == min(x["seed"] for x in ok) else None
      style = dict(color=colors[r["method"]], alpha=0.9 if label else 0.35, lw=1.2, label=label)
      row[0].plot(ep, rec, **style)
      row[1].plot(ep, loss, **style)
      row[2].plot(ge, rec, **style)
      row[3].plot(ge, loss, **style)
    for ax, (x, y) in zip(
      row,
      [
        ("epoch", "valid recall@20"),
        ("epoch", "train loss"),
        ("gradient evaluations", "valid recall@20"),
        ("gradient evaluations", "train loss"),
      ],
    ):
      ax.set_xlabel(x)
      ax.set_ylabel(y)
      ax.set_title(f"{model}: {y}", fontsize=9)
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=8)
  fig.tight_layout()
  save_png(fig, path, dpi=90)
  return True


def _mean_sd(values: Sequence[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f}±{np.std(values, ddof=1):.4f}"


def format_tables(records: list[dict[str, Any]]) -> str:
  """The metrics table and the change-vs-plain table, as printed by the command."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["model"], r["method"]), []).append(r)
  lines = []
  head = f"{'model':9s} {'method':6s} " + " ".join(f"{m:>15s}" for m in TABLE_METRICS)
  lines += ["Test metrics at the best-validation epoch (mean±sd over seeds)", head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = [r for r in rs if r.get("status") == "ok"]
    cells = [_mean_sd([r["test"][m] for r in ok]) for m in TABLE_METRICS]
    note = (
      ""
      if len(ok) == len(rs)
      else f"  ({len(rs) - len(ok)} run(s) failed: {rs[0 if not ok else -1].get('error', '')[:80]})"
    )
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>15s}" for c in cells) + note)

  lines += ["", "Relative change vs plain (mean±sd of paired per-seed differences, %), cost"]
  head = (
    f"{'model':9s} {'method':6s} "
    + " ".join(f"{'Δ' + m:>16s}" for m in CHANGE_METRICS)
    + f" {'best ep':>8s} {'epochs':>7s} {'wall s':>8s} {'grad ev':>9s} {'ev/upd':>7s}"
  )
  lines += [head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = {r["seed"]: r for r in rs if r.get("status") == "ok"}
    base = {r["seed"]: r for r in groups.get((model, "plain"), []) if r.get("status") == "ok"}
    cells = []
    for m in CHANGE_METRICS:
      diffs = [
        100 * (ok[s]["test"][m] - base[s]["test"][m]) / base[s]["test"][m]
        for s in ok
        if s in base and base[s]["test"][m] > 0
      ]
      if method == "plain" or not diffs:
        cells.append("-")
      elif len(diffs) == 1:
        cells.append(f"{diffs[0]:+.1f}")
      else:
        cells.append(f"{np.mean(diffs):+.1f}±{np.std(diffs, ddof=1):.1f}")
    vals = list(ok.values())
    cost = (
      f" {_avg(vals, 'best_epoch'):>8s} {_avg(vals, 'epochs'):>7s} {_avg(vals, 'wall_s'):>8s}"
      f" {_avg(vals, 'grad_evals'):>9s} {_avg(vals, 'grad_evals_per_update', '.3f'):>7s}"
    )
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>16s}" for c in cells) + cost)
  return "\n".join(lines)


def _avg(records, key, fmt=".0f") -> str:
  return format(float(np.mean([r[key] for r in records])), fmt) if records else "-"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def run_checkpoint_dir(root: str | Path, config: TrainConfig, grid_names: Sequence[str] = ()) -> Path:
  """``<root>/<model>-<method>-seed<k>`` and, in a grid, ``-<name>=<value>,...`` of the run's grid point
  (model, method and config hyper-parameters alike), so that every grid point has its own directory."""
  name = f"{config.model}-{config.method}-seed{config.seed}"
  if grid_names:
    labels = [
      f"{n}={v if isinstance(v, str) else repr(v)}" for n, v in ((n, setting(config, n)) for n in sorted(grid_names))
    ]
    name += "-" + ",".join(labels).replace(os.sep, "_")
  return Path(root) / name


def check_checkpoints(
  parser: argparse.ArgumentParser,
  ds: data_lib.Dataset,
  runs: Sequence[tuple[TrainConfig, Path]],
  *,
  resume: bool,
  overwrite: bool,
  option: str = "--checkpoint-dir",
) -> list[Path]:
  """Before training: ``parser.error`` unless every run can use its checkpoint directory.

  The directories' parents must be writable. A run directory that already holds checkpoints is, with
  ``resume``, checked to be continuable (same config, same data fingerprint, a readable step:
  :meth:`benchmarks.checkpoints.RunCheckpoints.verify`); without ``resume`` it is refused unless
  ``overwrite``. Returns the directories to delete before training (``overwrite`` without ``resume``).
  """
  dirs = [d for _, d in runs]
  if len(set(dirs)) != len(dirs):
    parser.error(f"{option}: two runs of this command map to the same checkpoint directory")
  for root in dict.fromkeys(d.parent for d in dirs):
    problem = writable_dir_problem(root)
    if problem:
      parser.error(f"{option} {root}: {problem}")
  held = []
  for config, d in runs:
    if d.exists() and not d.is_dir():
      parser.error(f"{option}: {d} is a file, not a checkpoint directory")
    if d.is_dir() and any(d.iterdir()):
      held.append((config, d))
  if not held:
    return []
  if resume:
    fingerprint = dataset_fingerprint(ds)
    for config, d in held:
      try:
        checkpoints.RunCheckpoints(d, config, data_fingerprint=fingerprint).verify()
      except ValueError as e:
        parser.error(str(e))
    return []
  if overwrite:
    return [d for _, d in held]
  names = ", ".join(str(d) for _, d in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
  parser.error(
    f"{option}: {names} already hold{'s' if len(held) == 1 else ''} checkpoints of an earlier run; "
    f"pass --resume to continue them, --overwrite to delete them and train afresh, or choose "
    f"another {option}"
  )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
  try:
    model_names = parse_names(args.models, list(models.MODELS), "model")
    method_names = parse_names(args.methods, list(METHODS), "method")
    parse_names(args.optimizer, list(OPTIMIZERS), "optimizer")
    hparams = parse_hparams(args.hparam, model_names)
    grid = parse_grid(args.grid, model_names)
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  check_training_arguments(parser, args)
  for name in grid:
    both = [m for m in model_names if name in hparams[m]]
    if both:
      parser.error(f"--grid {name} and --hparam both set {name} (for {', '.join(both)}); give it in one of them")
  if args.resume and not args.checkpoint_dir:
    parser.error("--resume needs --checkpoint-dir (the directory of the runs to continue)")
  distributed.setup_from_args(args, parser)  # several processes: join them before any JAX computation
  # every config the command will train, built and checked before anything is trained
  check_model_hparams(parser, hparams, grid)
  cells: list[TrainConfig] = []
  for model in model_names:
    for method in method_names:
      try:
        cells.append(train_config(args, model, method, 0, hparams[model]))
      except ValueError as e:
        parser.error(str(e))
  planned: list[tuple[TrainConfig, str]] = []
  for config in cells:
    for point in grid_points(grid):
      try:
        planned.append((config_with(config, **point), f"--grid {point_label(point)}" if point else ""))
      except ValueError as e:
        parser.error(f"--grid {point_label(point)}: {e}")
  check_configs(parser, planned)
  ds = load_data_for(parser, args.data, model_names)
  out = Path(args.out)
  primary = jax.process_index() == 0
  if primary:
    check_out_dir(parser, out, OUTPUTS, overwrite=args.overwrite)
  stale: list[Path] = []
  if args.checkpoint_dir:
    runs = [
      (c, run_checkpoint_dir(args.checkpoint_dir, c, list(grid)))
      for config, _ in planned
      for c in (dataclasses.replace(config, seed=s) for s in range(args.seeds))
    ]
    stale = check_checkpoints(parser, ds, runs, resume=args.resume, overwrite=args.overwrite)
  # everything is checked; from here on the command trains
  if primary:
    clear_outputs(out, OUTPUTS, overwrite=args.overwrite)
    for d in stale:
      shutil.rmtree(d)
  if stale and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("compare: old checkpoints removed")

  records: list[dict[str, Any]] = []
  for config in cells:
    records += _run_cell(ds, config, args, grid)
    if distributed.is_primary():  # several processes: process 0 alone writes
      write_results(out, records)
  if not distributed.is_primary():
    return records
  plotted = _plot(records, out / "curves.png")
  print()
  print(format_tables(records))
  wrote = [out / "results.json", out / "results.csv"] + ([out / "curves.png"] if plotted else [])
  note = "" if plotted else " (no curves.png: no run succeeded)"
  print(f"\nwrote {', '.join(map(str, wrote))}{note}")
  return records


def _run_cell(ds, config: TrainConfig, args, grid) -> list[dict[str, Any]]:
  """All seeds of one model/method (the grid winner, if a grid is given)."""
  records = []

  def one(ds, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = run_checkpoint_dir(args.checkpoint_dir, cfg, list(grid)) if args.checkpoint_dir else None
    try:
      record = train(
        ds,
        cfg,
        checkpoint_dir=ckpt,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.no_progress,
      )
      record["status"] = "ok"
    except TrainingDiverged as e:
      print(f"  ! {e}", file=sys.stderr)
      record = {
        "model": cfg.model,
        "method": cfg.method,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "status": "diverged",
        "error": str(e),
        "valid": {},
        "test": {},
        "history": [],
        "config": dataclasses.asdict(cfg),
      }
    record["data"] = args.data
    status = (
      f"test recall@20 {record['test']['recall@20']:.4f}, best epoch {record['best_epoch']}, {record['wall_s']:.1f}s"
      if record["status"] == "ok"
      else record["status"]
    )
    print(f"  {cfg.model}/{cfg.method} seed {cfg.seed}: {status}", flush=True)
    return record

  seeds = range(args.seeds)
  if grid:

    def safe_valid(ds, cfg, **kw):
      r = one(ds, cfg)
      if r["status"] != "ok":
        r["valid"] = {config.valid_metric: -math.inf}
      return r

    point, records = grid_search(ds, config, grid, seeds, run=safe_valid)
    print(f"  {config.model}/{config.method}: grid winner on validation {point}")
    return records
  return [one(ds, dataclasses.replace(config, seed=s)) for s in seeds]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = build_parser()
  args = parser.parse_args(argv)
  return run(args, parser)
