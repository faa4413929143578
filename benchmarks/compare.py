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
import ast
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import models
from benchmarks import data as data_lib
from benchmarks.methods import METHODS, OPTIMIZERS
from benchmarks.train import TrainConfig, TrainingDiverged, grid_search, train

TABLE_METRICS = [f"{m}@{k}" for k in (5, 20) for m in ("recall", "precision", "map", "ndcg")]
CHANGE_METRICS = ["recall@5", "ndcg@5", "recall@20", "ndcg@20"]

# The main command's defaults: ~2 minutes on a 2-core CPU for 3 models x 3 methods x 2 seeds on the
# synthetic set (runs early-stop long before the epoch cap; MMRec's cap is 1000, patience 20).
DEFAULTS = {"max_epochs": 300, "patience": 20, "seeds": 2}


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
  names = [n.strip().lower() for n in text.split(",") if n.strip()]
  bad = [n for n in names if n not in valid]
  if bad or not names:
    raise argparse.ArgumentTypeError(
        f"unknown {what} {', '.join(bad) or repr(text)}; valid names: {', '.join(valid)}"
    )
  return names


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_hparams(items: Sequence[str], model_names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """``["vbpr.reg_weight=2.0", "n_layers=1"]`` -> per-model dicts (no prefix: every model)."""
  out: dict[str, dict[str, Any]] = {m: {} for m in model_names}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"--hparam {item!r}: expected [model.]name=value")
    model, dot, name = key.rpartition(".")
    targets = [model.lower()] if dot else list(model_names)
    for m in targets:
      if m not in out:
        raise argparse.ArgumentTypeError(f"--hparam {item!r}: model {m!r} is not in --models")
      out[m][name] = _value(value)
  return out


def _parse_grid(text: str | None) -> dict[str, list[Any]]:
  """``"reg_weight=1e-4,1e-3;alpha2=0.1,0.2"`` -> ``{"reg_weight": [1e-4, 1e-3], ...}``."""
  grid: dict[str, list[Any]] = {}
  for part in (text or "").split(";"):
    if not part.strip():
      continue
    name, sep, values = part.partition("=")
    if not sep or not values.strip():
      raise argparse.ArgumentTypeError(f"--grid part {part!r}: expected name=v1,v2,...")
    grid[name.strip()] = [_value(v.strip()) for v in values.split(",")]
  return grid


def add_training_arguments(p: argparse.ArgumentParser) -> None:
  """The training options shared by the commands that train (compare, robustness, landscape), with the
  same defaults, so the configs -- and hence the checkpoints -- of all of them match."""
  p.add_argument("--optimizer", default="adam", help="base optimizer: " + ",".join(OPTIMIZERS))
  p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
  p.add_argument("--batch-size", type=int, default=2048)
  p.add_argument("--max-epochs", type=int, default=DEFAULTS["max_epochs"])
  p.add_argument("--patience", type=int, default=DEFAULTS["patience"],
                 help="evaluations without improvement before stopping (MMRec: 20)")
  p.add_argument("--eval-every", type=int, default=1)
  p.add_argument("--valid-metric", default="recall@20")
  p.add_argument("--alpha1", type=float, default=1.0, help="MG alpha1")
  p.add_argument("--alpha2", type=float, default=0.2, help="MG alpha2")
  p.add_argument("--beta", type=int, default=3, help="MG interval")
  p.add_argument("--rho", type=float, default=0.05, help="SAM radius")
  p.add_argument("--gnp-penalty", type=float, default=0.01, help="GNP weight of ||grad L||^2")
  p.add_argument("--hparam", action="append", default=[], metavar="[MODEL.]NAME=VALUE",
                 help="model hyper-parameter, e.g. vbpr.reg_weight=2.0 or n_layers=2 (repeatable)")
  p.add_argument("--devices", type=int, default=None,
                 help="train data-parallel over N devices (JAX sharding; batches split, state replicated)")
  p.add_argument("--shard-tables", action="store_true",
                 help="with --devices: row-shard the embedding tables instead of replicating them")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--data", default="synthetic",
                 help="MMRec-layout directory, 'synthetic' or 'synthetic:<preset>' (default: synthetic)")
  p.add_argument("--models", default="vbpr,lightgcn,bm3", help="comma list of " + ",".join(models.MODELS))
  p.add_argument("--methods", default="plain,mg,sam", help="comma list of " + ",".join(METHODS))
  p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds 0..N-1 (default %(default)s)")
  add_training_arguments(p)
  p.add_argument("--grid", default=None, metavar="NAME=V1,V2;NAME=...",
                 help="grid over model/method hyper-parameters; the winner is chosen on validation")
  p.add_argument("--out", default="results", help="output directory (default: results)")
  p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints, one sub-directory per run")
  p.add_argument("--checkpoint-every", type=int, default=5, metavar="N",
                 help="save a checkpoint every N epochs and at the end (default 5; a resumed run "
                      "replays the epochs after the last one exactly)")
  p.add_argument("--resume", action="store_true", help="continue runs from --checkpoint-dir")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str | bytes) -> None:
  """Writes ``path`` via a temporary file in the same directory and ``os.replace``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(text.encode() if isinstance(text, str) else text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _csv(records: list[dict[str, Any]]) -> str:
  fields = ["model", "method", "optimizer", "seed", "status", "best_epoch", "epochs", "wall_s",
            "updates", "grad_evals", "grad_evals_per_update"]
  metric_names = sorted({k for r in records for k in r.get("test", {})})
  header = fields + [f"valid_{m}" for m in metric_names] + [f"test_{m}" for m in metric_names]
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  for r in records:
    w.writerow([r.get(f, "") for f in fields]
               + [r.get("valid", {}).get(m, "") for m in metric_names]
               + [r.get("test", {}).get(m, "") for m in metric_names])
  return buf.getvalue()


def _plot(records: list[dict[str, Any]], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in records if r.get("status") == "ok" and r["history"]]
  model_names = list(dict.fromkeys(r["model"] for r in ok))
  if not model_names:
    return
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
    for ax, (x, y) in zip(row, [("epoch", "valid recall@20"), ("epoch", "train loss"),
                                ("gradient evaluations", "valid recall@20"),
                                ("gradient evaluations", "train loss")]):
      ax.set_xlabel(x)
      ax.set_ylabel(y)
      ax.set_title(f"{model}: {y}", fontsize=9)
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


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
    note = "" if len(ok) == len(rs) else f"  ({len(rs) - len(ok)} run(s) failed: {rs[0 if not ok else -1].get('error', '')[:80]})"
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>15s}" for c in cells) + note)

  lines += ["", "Relative change vs plain (mean±sd of paired per-seed differences, %), cost"]
  head = (f"{'model':9s} {'method':6s} " + " ".join(f"{'Δ' + m:>16s}" for m in CHANGE_METRICS)
          + f" {'best ep':>8s} {'epochs':>7s} {'wall s':>8s} {'grad ev':>9s} {'ev/upd':>7s}")
  lines += [head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = {r["seed"]: r for r in rs if r.get("status") == "ok"}
    base = {r["seed"]: r for r in groups.get((model, "plain"), []) if r.get("status") == "ok"}
    cells = []
    for m in CHANGE_METRICS:
      diffs = [100 * (ok[s]["test"][m] - base[s]["test"][m]) / base[s]["test"][m]
               for s in ok if s in base and base[s]["test"][m] > 0]
      if method == "plain" or not diffs:
        cells.append("-")
      elif len(diffs) == 1:
        cells.append(f"{diffs[0]:+.1f}")
      else:
        cells.append(f"{np.mean(diffs):+.1f}±{np.std(diffs, ddof=1):.1f}")
    vals = list(ok.values())
    cost = (f" {_avg(vals, 'best_epoch'):>8s} {_avg(vals, 'epochs'):>7s} {_avg(vals, 'wall_s'):>8s}"
            f" {_avg(vals, 'grad_evals'):>9s} {_avg(vals, 'grad_evals_per_update', '.3f'):>7s}")
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>16s}" for c in cells) + cost)
  return "\n".join(lines)


def _avg(records, key, fmt=".0f") -> str:
  return format(float(np.mean([r[key] for r in records])), fmt) if records else "-"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def check_models_have_features(parser: argparse.ArgumentParser, ds, names: Sequence[str],
                               data_spec: str) -> None:
  """``parser.error`` naming the model and the modalities it needs if ``ds`` lacks them."""
  for name in names:
    missing = [m for m in models.get_model(name).requires if m not in ds.features]
    if missing:
      parser.error(
          f"model {name} needs the {', '.join(missing)} features, which data set {ds.name!r} "
          f"({data_spec}) does not have (it has: {', '.join(ds.features) or 'none'}); "
          "drop it from --models or use a data set with those *_feat.npy files"
      )


def load_data_for(parser: argparse.ArgumentParser, data_spec: str, names: Sequence[str]) -> data_lib.Dataset:
  """Loads ``data_spec``, checks it has the features ``names`` need, and prints a one-line summary."""
  ds = data_lib.load(data_spec)
  check_models_have_features(parser, ds, names, data_spec)
  print(f"data {ds.name}: {ds.n_users} users, {ds.n_items} items, "
        f"{len(ds.train)}/{len(ds.valid)}/{len(ds.test)} train/valid/test, "
        f"features: {', '.join(f'{k} {v.shape[1]}-d' for k, v in ds.features.items()) or 'none'}")
  return ds


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
  try:
    model_names = _names(args.models, list(models.MODELS), "model")
    method_names = _names(args.methods, list(METHODS), "method")
    _names(args.optimizer, list(OPTIMIZERS), "optimizer")
    hparams = _parse_hparams(args.hparam, model_names)
    grid = _parse_grid(args.grid)
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  if args.seeds < 1:
    parser.error(f"--seeds must be >= 1, got {args.seeds}")
  ds = load_data_for(parser, args.data, model_names)
  out = Path(args.out)

  records: list[dict[str, Any]] = []
  for model in model_names:
    for method in method_names:
      try:
        config = TrainConfig(
            model=model, method=method, optimizer=args.optimizer, learning_rate=args.lr,
            batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
            eval_every=args.eval_every, valid_metric=args.valid_metric, model_hparams=hparams[model],
            method_hparams={"alpha1": args.alpha1, "alpha2": args.alpha2, "beta": args.beta,
                            "rho": args.rho, "gnp_penalty": args.gnp_penalty},
            devices=args.devices, shard_tables=args.shard_tables,
        )
      except ValueError as e:
        parser.error(str(e))
      records += _run_cell(ds, config, args, grid)
      atomic_write(out / "results.json", json.dumps(records, indent=1, default=_json_default))
      atomic_write(out / "results.csv", _csv(records))
  _plot(records, out / "curves.png")
  print()
  print(format_tables(records))
  print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'curves.png'}")
  return records


def _run_cell(ds, config: TrainConfig, args, grid) -> list[dict[str, Any]]:
  """All seeds of one model/method (the grid winner, if a grid is given)."""
  records = []

  def one(ds, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = None
    if args.checkpoint_dir:
      point = "_".join(f"{k}{v}" for k, v in sorted(cfg.model_hparams.items()))
      ckpt = Path(args.checkpoint_dir) / f"{cfg.model}-{cfg.method}-seed{cfg.seed}{'-' + point if grid else ''}"
    try:
      record = train(ds, cfg, checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, progress=not args.no_progress)
      record["status"] = "ok"
    except TrainingDiverged as e:
      print(f"  ! {e}", file=sys.stderr)
      record = {"model": cfg.model, "method": cfg.method, "optimizer": cfg.optimizer, "seed": cfg.seed,
                "status": "diverged", "error": str(e), "valid": {}, "test": {}, "history": [],
                "config": dataclasses.asdict(cfg)}
    record["data"] = args.data
    status = (f"test recall@20 {record['test']['recall@20']:.4f}, best epoch {record['best_epoch']}, "
              f"{record['wall_s']:.1f}s" if record["status"] == "ok" else record["status"])
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


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = build_parser()
  args = parser.parse_args(argv)
  return run(args, parser)


if __name__ == "__main__":
  main()
