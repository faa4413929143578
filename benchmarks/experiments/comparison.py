"""Compare plain training, Mirror Gradient, SAM and GNP on recommenders -- the main command.

    python -m benchmarks.compare                      # synthetic data, VBPR/LightGCN/BM3 x plain/MG/SAM
    python -m benchmarks.compare --data ../shared/data/scientific --seeds 3
    python -m benchmarks.compare --data ../shared/data/baby --models lightgcn --methods plain,mg

Prints two tables: the test metrics at the best-validation epoch (mean±sd over the seeds), and the relative
change vs plain -- the mean of the paired per-seed changes with its 95 % t interval, beside the number of
seeds -- with the cost of each method (epochs, wall seconds, gradient evaluations). Same seed, same data
order and same initialisation for every method, so per-seed differences are paired.

Everything lives in ``--out``: ``command.json`` (this command's resolved flags), ``runs/<key>.json`` (one
record per finished run, keyed by its config and the data's content fingerprint), ``work/<key>/`` (the
checkpoints of a run still training) and the outputs ``results.json`` (one record per model/method/seed),
``results.csv`` and ``curves.png``. Running the same command again -- after it finished, after Ctrl-C or after
``kill -9`` -- reuses the finished runs, resumes an interrupted one from its last checkpoint and writes the
complete outputs; a different command in the same ``--out`` is refused (naming the flags that differ) unless
``--overwrite`` is given, which deletes that ``--out``'s runs and outputs first.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import shutil
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from benchmarks.parallel import distributed
from benchmarks.runtime.cli import UsageError
from benchmarks.runtime.files import TEMP_SUFFIX, atomic_write, atomic_write_all, json_default, save_png
from benchmarks.runtime.files import writable_dir_problem
from benchmarks.study.stats import mean_ci
from benchmarks.training import checkpoints, options
from benchmarks.training.config import RESULTS_VERSION, TrainConfig
from benchmarks.training.loop import grid_search
from benchmarks.training.methods import METHODS
from benchmarks.training.records import RunRecord, RunStore, StoreError, run_key

__all__ = [
  "CHANGE_METRICS",
  "COMMAND_FILE",
  "CompareOptions",
  "OUTPUTS",
  "Outcome",
  "PROG",
  "TABLE_METRICS",
  "build_parser",
  "format_tables",
  "parse",
  "report",
  "result_record",
  "results_csv",
  "run",
  "write_results",
]

PROG = "python -m benchmarks.compare"
TABLE_METRICS = [f"{m}@{k}" for k in (5, 20) for m in ("recall", "precision", "map", "ndcg")]
CHANGE_METRICS = ["recall@5", "ndcg@5", "recall@20", "ndcg@20"]

#: What the command writes to ``--out`` besides its store (``runs/``, ``work/``) and ``command.json``.
OUTPUTS = ("results.json", "results.csv", "curves.png")
#: The command's resolved flags, written before the first run trains: a rerun must match them.
COMMAND_FILE = "command.json"
RUNS, WORK = "runs", "work"
NOTE_WIDTH = 120  # footnotes under the tables are wrapped to this width
#: ``<out>/work/<LOCK>.lock``: held by the process that runs a compare in that ``--out``.
LOCK = "compare"


def build_parser() -> options.UsageArgumentParser:
  p = options.UsageArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  options.add_run_arguments(p)
  options.add_training_arguments(p)
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
    help="the command's directory (default: results): results.json, results.csv, curves.png, command.json "
    "(its flags), runs/ (a record per finished run) and work/ (checkpoints of runs in progress). The same "
    "command run again reuses the finished runs and resumes an interrupted one; another command there is "
    "refused unless --overwrite is given",
  )
  p.add_argument(
    "--checkpoint-every",
    type=options.number(True, 1),
    default=5,
    metavar="N",
    help="save a run's checkpoint (in <out>/work) every N epochs and at its end (default 5); an interrupted "
    "run resumes from its last one and replays the epochs after it exactly",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="start afresh: delete the runs, checkpoints and outputs that --out holds before training",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="deprecated, no effect: running the same command again always resumes",
  )
  p.add_argument("--checkpoint-dir", default=None, help=argparse.SUPPRESS)  # removed: refused with a hint
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  distributed.add_arguments(p)  # --coordinator/--num-processes/--process-id, --distributed auto
  return p


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompareOptions:
  """A checked compare command line: the shared training options and where the command keeps its runs."""

  train: options.TrainOptions
  out: Path
  overwrite: bool = False
  checkpoint_every: int = 5

  def store(self) -> RunStore:
    return _OutStore(self.out / RUNS, self.out / WORK)

  def settings(self) -> dict[str, Any]:
    """What ``command.json`` holds and a rerun must match: :meth:`TrainOptions.settings`."""
    return self.train.settings()


def parse(argv: Optional[Sequence[str]] = None) -> CompareOptions:
  """The command line as one checked :class:`CompareOptions`; :class:`UsageError` names the first bad flag.

  Besides the shared flags (:func:`benchmarks.training.options.train_options`) it checks ``--out``: writable,
  and -- unless ``--overwrite`` -- holding nothing but this command's own runs (its ``command.json`` has the same
  settings), readable records and usable checkpoints.
  """
  args = build_parser().parse_args(argv)
  if args.checkpoint_dir is not None:
    raise UsageError(
      "--checkpoint-dir was removed: a run's checkpoints now live in <out>/work/ and running the same command "
      "again resumes it; drop --checkpoint-dir"
    )
  opts = CompareOptions(
    options.train_options(args), Path(args.out), overwrite=args.overwrite, checkpoint_every=args.checkpoint_every
  )
  _agree(out_problem(opts))
  return opts


def out_problem(opts: CompareOptions) -> Optional[str]:
  """Why this command cannot run in ``opts.out`` (one line naming ``--out``), or ``None``."""
  out = opts.out
  problem = writable_dir_problem(out)
  if problem:
    return f"--out {out}: {problem}"
  if opts.overwrite:
    return None
  saved_file = out / COMMAND_FILE
  if saved_file.exists():
    try:
      saved = json.loads(saved_file.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"--out {out}: {saved_file} cannot be read ({type(e).__name__}: {e}); pass --overwrite to start afresh"
    differ = options.settings_differences(saved, opts.settings())
    if differ:
      return (
        f"--out {out} holds the runs of another command ({'; '.join(differ)}); run that command to continue "
        "it, pass --overwrite to delete its runs and start afresh, or choose another --out"
      )
  else:
    held = [n for n in (*OUTPUTS, RUNS) if (out / n).exists()]
    if held:
      return (
        f"--out {out} already holds {', '.join(held)} of an earlier run that recorded no {COMMAND_FILE}; "
        "pass --overwrite to replace them, or choose another --out"
      )
  store, fp = opts.store(), opts.train.data_fingerprint
  for config, _ in opts.train.runs():
    try:
      store.get(config, fp)
    except StoreError as e:
      return f"--out {out}: {e}"
    directory = store.checkpoint_dir(config, fp)
    if directory.is_dir() and any(directory.iterdir()):
      try:
        checkpoints.RunCheckpoints(directory, config, data_fingerprint=fp).verify()
      except ValueError as e:
        return f"--out {out}: {e}"
  return None


def _agree(problem: Optional[str]) -> None:
  """Raises :class:`UsageError` with ``problem`` -- on every process if any process has one, so that no
  process trains alone and waits for the others forever."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is None and flags.any():
      problem = f"process(es) {', '.join(map(str, np.flatnonzero(flags)))} refused the command; see their error"
  if problem:
    raise UsageError(problem)


def _from_primary(values: list[bool]) -> list[bool]:
  """``values`` as process 0 has them (every process decides alike, even if ``--out`` is not shared)."""
  if jax.process_count() == 1 or not values:
    return values
  from jax.experimental import multihost_utils

  return [bool(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32)))]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class _OutStore(RunStore):
  """The run store of one ``--out``. With several processes, process 0 alone writes a record, and every process
  waits until it is written (so no process deletes a run's checkpoints before the run's record exists)."""

  def put(self, record: RunRecord) -> Path:
    path = super().put(record) if distributed.is_primary() else self.path(record["key"])
    _sync(f"compare: record {record['key']} written")
    return path


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class Outcome(list):
  """The records of a comparison, in results.json's order (what ``compare.main`` returns), and what
  :func:`report` prints about them."""

  def __init__(
    self,
    records: Sequence[dict[str, Any]],
    *,
    primary: bool = True,
    out: Optional[Path] = None,
    wrote: Sequence[Path] = (),
    trained: int = 0,
    resumed: int = 0,
    reused: int = 0,
  ):
    super().__init__(records)
    self.primary, self.out, self.wrote = primary, out, list(wrote)
    self.trained, self.resumed, self.reused = trained, resumed, reused


def run(opts: CompareOptions) -> Outcome:
  """Trains (or reuses) every run of ``opts`` in ``opts.out``'s store and writes the outputs.

  Runs finished by an earlier invocation of the same command are read back, an interrupted one resumes from its
  checkpoint in ``<out>/work/<key>``; ``--overwrite`` first deletes the runs, checkpoints and outputs that
  ``--out`` holds. With several processes every process trains (the collectives need them all) and process 0
  alone writes records and outputs.
  """
  t = opts.train
  ds, fp = t.dataset, t.data_fingerprint
  store = opts.store()
  primary = distributed.is_primary()
  single = jax.process_count() == 1
  counts = {"trained": 0, "resumed": 0, "reused": 0}
  with _holding(opts, store):
    if primary:
      _prepare(opts, store)
    _sync("compare: --out prepared")
    planned = [config for config, _ in t.runs()]
    finished = _from_primary([store.get(config, fp) is not None for config in planned])
    done = {run_key(config, fp): was for config, was in zip(planned, finished)}

    def one(ds, config: TrainConfig) -> dict[str, Any]:
      key = run_key(config, fp)
      if done[key]:
        stored = store.get(config, fp)
        counts["reused"] += 1
        how = "reused (finished earlier)"
      else:
        with store.claim(key) if single else contextlib.nullcontext(True) as held:
          if not held:
            raise UsageError(f"--out {opts.out}: run {key} is being trained by another process; wait for it to end")
          stored = store.run(ds, config, checkpoint_every=opts.checkpoint_every, progress=t.progress)
        counts["trained"] += 1
        counts["resumed"] += bool(stored.get("resumed"))
        how = "resumed from its checkpoint" if stored.get("resumed") else "trained"
        if stored["status"] != "ok" and primary:
          print(f"  ! {stored['error']}", file=sys.stderr)
      if stored is None:  # another process's --out, not shared with this one
        return {"model": config.model, "method": config.method, "seed": config.seed, "status": "elsewhere"}
      record = result_record(stored, config, data=t.data)
      if primary:
        print(f"  {config.model}/{config.method} seed {config.seed}: {how}: {_summary(record)}", flush=True)
      return record

    records: list[dict[str, Any]] = []
    for cell in t.cells():
      if not t.grid:
        records += [one(ds, dataclasses.replace(cell, seed=s)) for s in t.seeds]
        continue

      def scored(ds, config, **_):
        record = one(ds, config)
        return {**record, "valid": record.get("valid") or {config.valid_metric: -math.inf}}

      point, cell_records = grid_search(ds, cell, dict(t.grid), t.seeds, run=scored)
      for r in cell_records:
        if r.get("status") != "ok":
          r["valid"] = {}
      if primary:
        print(f"  {cell.model}/{cell.method}: grid winner on validation {point}")
      records += cell_records

    if not primary:
      return Outcome(records, primary=False, **counts)
    write_results(opts.out, records)
    wrote = [opts.out / "results.json", opts.out / "results.csv"]
    if _plot(records, opts.out / "curves.png"):
      wrote.append(opts.out / "curves.png")
    else:
      (opts.out / "curves.png").unlink(missing_ok=True)  # none of an earlier run beside these results
    return Outcome(records, out=opts.out, wrote=wrote, **counts)


@contextlib.contextmanager
def _holding(opts: CompareOptions, store: RunStore) -> Iterator[None]:
  """Holds ``--out`` (``<out>/work/compare.lock``) while the command runs: a second compare in the same ``--out``
  is refused. A lock left by a killed process of this host is taken over."""
  if not distributed.is_primary():
    _agree(None)
    yield
    return
  with store.claim(LOCK) as held:
    lock = store.work_dir / f"{LOCK}.lock"
    _agree(None if held else f"--out {opts.out} is in use by another compare ({lock}); wait for it to end")
    yield


def _prepare(opts: CompareOptions, store: RunStore) -> None:
  """Before the first run (process 0): ``--overwrite`` deletes what ``--out`` holds; temporary files of a killed
  write and records of an older results version go; ``command.json`` records this command."""
  out = opts.out
  if opts.overwrite:
    removed = len(store.keys())
    shutil.rmtree(out / RUNS, ignore_errors=True)
    for p in store.work_dir.iterdir() if store.work_dir.is_dir() else ():
      if p.is_dir():
        shutil.rmtree(p)
      elif p.name != f"{LOCK}.lock":
        p.unlink(missing_ok=True)
    for name in (*OUTPUTS, COMMAND_FILE):
      (out / name).unlink(missing_ok=True)
    print(f"--overwrite: deleted the {removed} run(s) and the outputs that {out} held")
  for name in (*OUTPUTS, COMMAND_FILE):
    for tmp in out.glob(f".{name}.*{TEMP_SUFFIX}"):
      tmp.unlink(missing_ok=True)
  fp = opts.train.data_fingerprint
  wanted = {run_key(config, fp) for config, _ in opts.train.runs()}
  stale = store.stale(wanted)  # same flags, another results version of the trainer: never mixed in
  for path in stale:
    path.unlink(missing_ok=True)
    shutil.rmtree(store.work_dir / path.stem, ignore_errors=True)
  if stale:
    print(f"removed {len(stale)} run record(s) of results version != {RESULTS_VERSION} from {out / RUNS}")
  finished = store.keys()
  for p in store.work_dir.iterdir() if store.work_dir.is_dir() else ():
    # checkpoints of a run finished (but killed before they were deleted), or of no run of this command
    if p.is_dir() and (p.name in finished or p.name not in wanted):
      shutil.rmtree(p, ignore_errors=True)
  document = {"command": PROG, "results_version": RESULTS_VERSION, "settings": opts.settings()}
  atomic_write(out / COMMAND_FILE, json.dumps(document, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Records and outputs
# --------------------------------------------------------------------------------------------------


def _stopped_by(stored: RunRecord, config: TrainConfig) -> str:
  """``"patience"`` (early stopping) or ``"max_epochs"`` (the cap ended the run while it still improved within
  the patience)."""
  after_best = sum(1 for row in stored["history"] if row[0] > stored["best_epoch"])
  return "patience" if after_best > config.patience else "max_epochs"


def result_record(stored: RunRecord, config: TrainConfig, *, data: str) -> dict[str, Any]:
  """A ``results.json`` record from the store's record of the run: everything comes from the store, so the
  same command gives the same file however often it runs.

  ``best_epoch`` is 0-based, ``epochs`` a count; ``stopped_by`` is ``"patience"`` (early stopping) or
  ``"max_epochs"`` (stopped by ``--max-epochs``); ``history`` has one dict per evaluated epoch.
  """
  stored = json.loads(json.dumps(stored, sort_keys=True))  # as the store holds it, whether just written or read
  record: dict[str, Any] = {
    "model": stored["model"],
    "method": stored["method"],
    "optimizer": config.optimizer,
    "seed": stored["seed"],
    "status": stored["status"],
  }
  if stored["status"] != "ok":
    record.update(error=stored.get("error", ""), valid={}, test={}, history=[])
  else:
    updates = stored["updates"]
    fields = stored["history_fields"]
    record.update(
      valid=stored["valid"],
      test=stored["test"],
      best_epoch=stored["best_epoch"],
      epochs=stored["epochs"],
      stopped_by=_stopped_by(stored, config),
      wall_s=stored["wall_s"],
      updates=updates,
      grad_evals=stored["grad_evals"],
      grad_evals_per_update=stored["grad_evals"] / max(updates, 1),
      history=[dict(zip(fields, row)) for row in stored["history"]],
    )
  record.update(
    config=stored["identity"]["config"],
    data=data,
    data_fingerprint=stored["identity"]["data_fingerprint"],
    key=stored["key"],
    resumed=stored.get("resumed", False),
    platform=stored.get("platform", {}),
  )
  return record


def _summary(record: dict[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  cap = ", stopped by --max-epochs" if record["stopped_by"] == "max_epochs" else ""
  return (
    f"test recall@20 {record['test']['recall@20']:.4f}, best epoch {record['best_epoch'] + 1} of "
    f"{record['epochs']}{cap}, {record['wall_s']:.1f}s"
  )


def write_results(out: Path, records: list[dict[str, Any]]) -> None:
  """``results.json`` and ``results.csv`` of ``records``, both from the same records, written together."""
  atomic_write_all(
    {
      out / "results.json": json.dumps(records, indent=1, default=json_default),
      out / "results.csv": results_csv(records),
    }
  )


def results_csv(records: list[dict[str, Any]]) -> str:
  fields = [
    "model",
    "method",
    "optimizer",
    "seed",
    "status",
    "best_epoch",
    "epochs",
    "stopped_by",
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
  first_seed = min(r["seed"] for r in ok)
  for row, model in zip(axes, model_names):
    metric = "valid"
    for r in (r for r in ok if r["model"] == model):
      h = r["history"]
      metric = next(k for k in h[0] if k.startswith("valid_"))
      ep = [x["epoch"] + 1 for x in h]
      ge = [x["grad_evals"] for x in h]
      rec = [x[metric] for x in h]
      loss = [x["loss"] for x in h]
      label = r["method"] if r["seed"] == first_seed else None
      style = dict(color=colors[r["method"]], alpha=0.9 if label else 0.35, lw=1.2, label=label)
      row[0].plot(ep, rec, **style)
      row[1].plot(ep, loss, **style)
      row[2].plot(ge, rec, **style)
      row[3].plot(ge, loss, **style)
    name = metric.replace("_", " ")
    for ax, (x, y) in zip(
      row,
      [
        ("epoch", name),
        ("epoch", "train loss"),
        ("gradient evaluations", name),
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


# --------------------------------------------------------------------------------------------------
# The printed tables
# --------------------------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f}±{np.std(values, ddof=1):.4f}"


def _change(diffs: Sequence[float]) -> tuple[str, Optional[bool]]:
  """``"+1.2 [-3.4,+5.6]"`` (mean and 95 % t interval) and whether the interval covers 0 (``None``: no
  interval, fewer than 2 pairs)."""
  if not diffs:
    return "-", None
  mean, (lo, hi) = mean_ci(diffs)
  if len(diffs) < 2:
    return f"{mean:+.1f}", None
  return f"{mean:+.1f} [{lo:+.1f},{hi:+.1f}]", bool(lo <= 0 <= hi)


def _avg(records: Sequence[dict[str, Any]], key: str, fmt: str = ".0f", shift: float = 0) -> str:
  return format(float(np.mean([r[key] for r in records])) + shift, fmt) if records else "-"


def format_tables(records: Sequence[dict[str, Any]]) -> str:
  """The metrics table, the change-vs-plain table with its cost columns, their footnotes and one line on what
  the number of seeds can tell -- as the command prints them."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["model"], r["method"]), []).append(r)
  n_seeds = len({r["seed"] for r in records})
  lines = []
  head = f"{'model':9s} {'method':6s} {'n':>2s} " + " ".join(f"{m:>15s}" for m in TABLE_METRICS)
  seeds = f"n = {n_seeds} seed{'s' if n_seeds != 1 else ''}"
  lines += [f"Test metrics at the best-validation epoch (mean±sd over {seeds})", head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = [r for r in rs if r.get("status") == "ok"]
    cells = [_mean_sd([r["test"][m] for r in ok]) for m in TABLE_METRICS]
    failed = [r for r in rs if r.get("status") != "ok"]
    note = f"  ({len(failed)} run(s) failed: {failed[0].get('error', failed[0].get('status'))[:80]})" if failed else ""
    lines.append(f"{model:9s} {method:6s} {len(ok):>2d} " + " ".join(f"{c:>15s}" for c in cells) + note)

  w = 20
  lines += [
    "",
    "Relative change vs plain, % (mean of the paired per-seed changes [95 % t interval]; n paired seeds), and cost",
  ]
  head = (
    f"{'model':9s} {'method':6s} {'n':>2s} "
    + " ".join(f"{'Δ' + m:>{w}s}" for m in CHANGE_METRICS)
    + f" {'best ep':>8s} {'epochs':>7s} {'wall s':>8s} {'grad ev':>9s} {'ev/upd':>7s}"
  )
  lines += [head, "-" * len(head)]
  covers: list[Optional[bool]] = []
  excluding: list[str] = []
  pair_counts: list[int] = []
  capped_runs = 0
  for (model, method), rs in groups.items():
    ok = {r["seed"]: r for r in rs if r.get("status") == "ok"}
    base = {r["seed"]: r for r in groups.get((model, "plain"), []) if r.get("status") == "ok"}
    pairs = [s for s in ok if s in base]
    cells = []
    for m in CHANGE_METRICS:
      if method == "plain":
        cells.append("-")
        continue
      diffs = [
        100 * (ok[s]["test"][m] - base[s]["test"][m]) / base[s]["test"][m] for s in pairs if base[s]["test"][m] > 0
      ]
      text, covered = _change(diffs)
      cells.append(text)
      if diffs:
        covers.append(covered)
        if covered is False:
          excluding.append(f"{model}/{method} {m}")
    if method != "plain":
      pair_counts.append(len(pairs))
    vals = list(ok.values())
    capped = sum(r.get("stopped_by") == "max_epochs" for r in vals)
    capped_runs += capped
    epochs = _avg(vals, "epochs") + ("*" if capped else " ")
    cost = (
      f" {_avg(vals, 'best_epoch', shift=1):>8s} {epochs:>7s} {_avg(vals, 'wall_s'):>8s}"
      f" {_avg(vals, 'grad_evals'):>9s} {_avg(vals, 'grad_evals_per_update', '.3f'):>7s}"
    )
    n = len(pairs) if method != "plain" else len(ok)
    lines.append(f"{model:9s} {method:6s} {n:>2d} " + " ".join(f"{c:>{w}s}" for c in cells) + cost)

  notes = [
    "n: seeds with a run of the method and of plain (for plain: its runs). Δ: 100 × (method − plain) / plain of the "
    "test metric on the same seed, averaged over the n seeds, with the 95 % t interval of that mean (n − 1 degrees "
    "of freedom; none for n = 1).",
    "Cost, means over seeds: best ep = the epoch (1-based) with the best validation metric, whose parameters give "
    "the test metrics; epochs = epochs trained; wall s = seconds of training and validation; grad ev = gradient "
    "evaluations; ev/upd = gradient evaluations per parameter update (plain 1, MG (β+1)/β, SAM and GNP 2).",
  ]
  if capped_runs:
    notes.append(
      f"*: {capped_runs} run(s) ended at --max-epochs (the cap) before early stopping ended them (fewer than "
      "--patience evaluations without improvement since their best): a longer run may find a better epoch; "
      "raise --max-epochs."
    )
  lines += ["", *(textwrap.fill(note, NOTE_WIDTH, subsequent_indent="  ") for note in notes)]
  lines.append(_reading(covers, excluding, pair_counts))  # the verdict: one line
  return "\n".join(lines)


def _reading(covers: list[Optional[bool]], excluding: list[str], pair_counts: list[int]) -> str:
  """One line on what the intervals can tell."""
  if not pair_counts:
    return "No method to compare with plain (add plain and another method to --methods)."
  n = min(pair_counts)
  if n < 3:
    why = (
      "no interval from one seed"
      if n < 2
      else "a 95 % t interval from 2 seeds spans ±12.7 standard errors, and the standard error itself comes from 2 "
      "values"
    )
    return (
      f"With n = {n} paired seed{'s' if n != 1 else ''} these numbers cannot tell an effect from seed noise "
      f"({why}); run --seeds 5 or more, or python -m benchmarks.study."
    )
  if all(c is not False for c in covers):
    return (
      f"Every 95 % interval covers 0: at n = {n} seeds no change vs plain is distinguishable from seed noise "
      "(which is not evidence of no effect)."
    )
  return (
    f"{len(excluding)} of {len(covers)} intervals exclude 0 ({', '.join(excluding)}); they are not corrected for "
    f"the {len(covers)} comparisons: confirm on fresh seeds before reading them as effects."
  )


def report(outcome: Outcome) -> None:
  """Prints the tables (process 0 only), what was trained or reused, and what was written."""
  if not outcome.primary:
    return
  print()
  print(format_tables(outcome))
  resumed = f" ({outcome.resumed} resumed from a checkpoint)" if outcome.resumed else ""
  print(
    f"\nruns: {outcome.trained} trained{resumed}, {outcome.reused} reused from {outcome.out / RUNS}; "
    f"checkpoints in {outcome.out / WORK}"
  )
  note = "" if any(p.name == "curves.png" for p in outcome.wrote) else " (no curves.png: no run succeeded)"
  print(f"wrote {', '.join(map(str, outcome.wrote))}{note}")
