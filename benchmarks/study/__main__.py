"""A powered, honest answer to "does Mirror Gradient help?": tune on validation, evaluate on fresh seeds.

    python -m benchmarks.study benchmarks/studies/tiny.toml            # a minute, synthetic data
    python -m benchmarks.study benchmarks/studies/scientific.toml      # hours; resumable
    python -m benchmarks.study benchmarks/studies/scientific.toml --workers 2   # one worker per core
    python -m benchmarks.study benchmarks/studies/scientific.toml --report-only

For every (data set, model) cell of the spec (:mod:`benchmarks.study.spec`):

1. **Tuning.** Plain training and every grid point of every method on the tuning seeds; a method's
   winner has the best mean *validation* metric (``valid_metric``, default recall@20) -- test metrics
   play no part. A winner on the edge of its grid is flagged.
2. **Evaluation.** Plain and each method's winner (and, with ``defaults_too``, the method at its
   default hyper-parameters) on fresh evaluation seeds, never the tuning seeds. Same seed = same
   initialisation and data order, so each seed gives a paired relative change of every test metric;
   :mod:`benchmarks.study.stats` summarises them (mean, t and bootstrap 95 % CIs, Wilcoxon p, Holm-adjusted
   over every comparison of the study, wins) next to the cost (gradient evaluations, wall time).
3. **The paper's protocol, from the same runs.** On each tuning seed alone, the grid point with the best
   *test* recall@20 against plain on that seed -- the gain a single-seed, tuned-on-test protocol would
   print -- and its **A/A control**: plain against the best of ``k`` plain runs that differ only in
   their data order (``TrainConfig.order_seed``; ``k`` = the method's grid size), i.e. the gain that
   protocol prints when there is nothing to find.

Every run is a record in the run store (:mod:`benchmarks.training.records`, default
``benchmarks/results/<name>/runs/``): a re-run skips finished runs, resumes an interrupted one from its
checkpoint and never reuses a record of another config, data or results version. Several processes can
work on one study at once (start the command again, or give ``--workers N``: one single-threaded
process per core, :mod:`benchmarks.runtime.workers`). ``--report-only`` recomputes every figure from the
records without training. Outputs (``benchmarks/results/<name>/``): ``study.json``, ``study.csv``,
``study.md`` (the comparison as a Markdown table) and ``forest.png``.

**Reading the report.** The spec declares the primary analysis (``[primary]``): one metric, the paired t test
on the per-seed relative change, Holm-adjusted over one family (e.g. MG's winner vs plain, one test per cell);
the Wilcoxon signed-rank p is printed beside it as a sensitivity analysis, every other metric and method is
exploratory (unadjusted), and a comparison whose runs are identical to plain's is dropped from every family.
Beside every cell: its n (finished/planned where incomplete) and the minimum detectable effect at 80 % power.
The report closes with a random-effects (DerSimonian–Laird) estimate pooled over the study's cells.

**Pooled across studies.** ``--pooled`` with several specs and ``--report-only`` reports each study as above and
then pools each method's winner (MG, SAM) against plain over the cells of all of them
(``benchmarks/results/pooled/``: ``study.json``, ``study.md``, ``forest.png``)::

    python -m benchmarks.study --pooled --report-only benchmarks/studies/scientific.toml \
        benchmarks/studies/amazon_lightgcn.toml benchmarks/studies/table9.toml

This module is the command only: it parses the command line into one :class:`~benchmarks.study.runner.StudyOptions`,
makes one call (:func:`benchmarks.study.runner.execute`) and prints the report
(:mod:`benchmarks.study.report`). The plan of runs is :mod:`benchmarks.study.plan`, the figures
:mod:`benchmarks.study.analysis`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from benchmarks.runtime import cli
from benchmarks.study.report import format_pooled_report, format_report
from benchmarks.study.runner import (
  PooledOptions,
  PooledOutcome,
  StudyOptions,
  StudyOutcome,
  execute,
  execute_pooled,
)
from benchmarks.study.spec import load_spec

PROG = "python -m benchmarks.study"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="The report leads with the primary analysis the spec declares ([primary]: one metric, the paired t\n"
    "test, Holm over one family); everything else is exploratory. Pooled across studies (random effects):\n"
    "  python -m benchmarks.study --pooled --report-only benchmarks/studies/scientific.toml \\\n"
    "      benchmarks/studies/amazon_lightgcn.toml benchmarks/studies/table9.toml\n"
    "reports each study, then writes the estimate over all their cells to benchmarks/results/pooled/.",
  )
  p.add_argument(
    "spec",
    nargs="+",
    help="study spec (TOML), e.g. benchmarks/studies/tiny.toml; several only with --pooled --report-only",
  )
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
    "(benchmarks.runtime.workers); default 1: this process, every core",
  )
  p.add_argument(
    "--pooled",
    action="store_true",
    help="with --report-only and one or more SPECs: report each, then pool each method's winner vs plain "
    "(random effects, DerSimonian-Laird) over the cells of all of them",
  )
  p.add_argument(
    "--pooled-store",
    default=None,
    metavar="DIR",
    help="where --pooled writes study.json, study.md and forest.png; default benchmarks/results/pooled",
  )
  p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a --workers worker: no report
  return p


def parse(argv: Optional[Sequence[str]] = None) -> StudyOptions | PooledOptions:
  """The command line as one validated :class:`StudyOptions`, or :class:`PooledOptions` with ``--pooled`` (a bad
  value: :class:`cli.UsageError` naming the flag)."""
  args = build_parser().parse_intermixed_args(argv)
  if args.pooled:
    for flag, given in (("--store", args.store), ("--work-dir", args.work_dir), ("--cells", args.cells)):
      if given is not None:
        raise cli.UsageError(f"--pooled reports every study from its own store: it cannot be combined with {flag}")
    return PooledOptions(
      studies=tuple(_study_options(args, spec) for spec in args.spec),
      out_dir=Path(args.pooled_store) if args.pooled_store else PooledOptions.default_out_dir(),
    )
  if args.pooled_store is not None:
    raise cli.UsageError("--pooled-store is where --pooled writes: give --pooled too")
  if len(args.spec) != 1:
    raise cli.UsageError(f"one SPEC (or several with --pooled --report-only), got {len(args.spec)}")
  return _study_options(args, args.spec[0])


def _study_options(args: argparse.Namespace, spec: str) -> StudyOptions:
  study = load_spec(spec)  # a SpecError is a UsageError naming the file and the key
  cells = None if args.cells is None else tuple(n.strip() for n in args.cells.split(",") if n.strip())
  return StudyOptions(
    study=study,
    store_dir=Path(args.store) if args.store else StudyOptions.default_store(study),
    work_dir=Path(args.work_dir) if args.work_dir else StudyOptions.default_work_dir(study),
    report_only=args.report_only,
    stop_after=args.stop_after,
    max_runs=args.max_runs,
    list_stale=args.list_stale,
    cells=cells,
    progress=False if args.no_progress else None,
    workers=args.workers,
    train_only=args.train_only,
  )


def call(options: StudyOptions | PooledOptions) -> StudyOutcome | PooledOutcome:
  return execute_pooled(options) if isinstance(options, PooledOptions) else execute(options)


def report(outcome: StudyOutcome | PooledOutcome) -> None:
  if isinstance(outcome, PooledOutcome):
    for o in outcome.studies:
      report(o)
    print()
    print(format_pooled_report(outcome.pooled))
    print("\nwrote " + ", ".join(str(p) for p in outcome.written))
    return
  if not outcome.result:  # a --train-only worker
    return
  print()
  print(format_report(outcome.result))
  print("\nwrote " + ", ".join(str(p) for p in outcome.written))


main = cli.command(PROG, parse, call, report)

if __name__ == "__main__":
  main()
