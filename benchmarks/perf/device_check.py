r"""One prepared accelerator check, finishing within a time budget (8 minutes by default), one JSON summary.

    python -m benchmarks.device_check --json runs/device_check.json        # on the GPU machine
    python -m benchmarks.device_check --quick                                # tiny shapes, seconds, any backend

Stages, in order, each timed and skipped (with the reason) if the budget left cannot hold it:

1. **backend**: ``jax.devices()``, the defaults picked there (propagation kernel from
   :mod:`benchmarks.training.kernels`, evaluation chunk from :mod:`benchmarks.runtime.backend`), the default
   matmul precision;
2. **electronics**: one LightGCN (1 layer) training epoch and one full evaluation at the Electronics shape
   (:func:`benchmarks.perf.speed.run_electronics`, which also times a second epoch and pass), with the device's peak
   memory (``Device.memory_stats()``; CPU: peak RSS) beside :mod:`benchmarks.perf.scale`'s model of it -- first, so
   the peak is this stage's own;
3. **ratios**: the step-time ratio table at the Baby shape -- plain, MG (beta 3) and SAM for VBPR, LightGCN
   (1 layer) and BM3, interleaved, through the trainer's own compiled step (:func:`benchmarks.perf.speed.run_baby`);
4. **tests**: the test modules that run on whatever backend JAX picks (:data:`GPU_TESTS`), with pytest, in a
   subprocess bounded by the budget left.

``XLA_PYTHON_CLIENT_PREALLOCATE`` is set to ``false`` (unless set) before JAX starts, so the test subprocess
can allocate next to this process, and the peak memory means bytes in use rather than XLA's 75 % reservation.
Nothing here invents a figure: every number in the JSON was measured by this run on its backend.
``--quick`` runs the same stages on the tiny synthetic shape (what ``tests/test_backend.py`` runs on CPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts (see the docstring)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from benchmarks.perf import arguments  # noqa: E402  (imports no JAX)
from benchmarks.runtime.files import atomic_write  # noqa: E402

__all__ = [
  "GPU_TESTS",
  "PROG",
  "QUICK_TESTS",
  "STAGES",
  "Options",
  "build_parser",
  "execute",
  "parse_args",
  "report",
  "run",
  "summary_json",
]

ROOT = Path(__file__).resolve().parents[2]

#: Test modules that run in-process on the default backend (no forced CPU subprocesses), i.e. that exercise the
#: accelerator: the backend defaults, graph propagation, metrics, MG itself and the models.
GPU_TESTS = (
  "tests/test_backend.py",
  "tests/test_graph.py",
  "tests/test_metrics.py",
  "tests/test_mirror_gradient.py",
  "tests/test_models.py",
)
#: What ``--quick`` runs (the fast in-process backend tests; not the test that runs this script).
QUICK_TESTS = ("tests/test_backend.py", "-k", "not device_check")

#: Seconds each stage is expected to need on one GPU (a stage starts only if the budget left holds it).
STAGE_S = {"ratios": 200.0, "electronics": 120.0, "tests": 60.0}
QUICK_STAGE_S = {"ratios": 5.0, "electronics": 3.0, "tests": 5.0}


def _device_memory() -> dict[str, Any]:
  """Peak bytes in use on device 0 (accelerators), or this process's peak RSS (CPU)."""
  import jax

  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # not every backend has it
    pass
  if stats:
    return {
      "source": "Device.memory_stats",
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit"),
    }
  from benchmarks.runtime import memory

  rss = memory.peak_rss_mib()
  return {
    "source": "peak RSS of this process",
    "peak_bytes_in_use": int(rss.get("vmhwm_mib", rss["ru_maxrss_mib"]) * 2**20),
  }


def stage_backend() -> dict[str, Any]:
  import jax

  from benchmarks.training import kernels

  return {
    "jax": jax.__version__,
    "platform": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    "defaults_baby": kernels.describe(n_items=7050, n_edges=238_850),
    "defaults_electronics": kernels.describe(n_items=63_001, n_edges=2_542_238),
  }


def stage_ratios(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
  from benchmarks.perf import speed

  cases = ["lightgcn1"] if quick else ["vbpr", "lightgcn1", "bm3"]
  result = speed.run_baby(
    cases,
    quick=quick,
    repeats=2 if quick else 5,
    epoch_repeats=1 if quick else 2,
    variants=speed.make_variants(("plain", "mg", "sam"), betas=(3,)),
    log=log,
  )
  table = {
    key: {
      "plain_step_ms": 1e3 * rec["variants"]["plain"]["step_s"],
      "mg_beta3_ratio": rec["variants"]["mg_beta3"]["ratio"],
      "mg_beta3_ideal": 4 / 3,
      "sam_ratio": rec["variants"]["sam"]["ratio"],
      "sam_ideal": 2.0,
      "train_s_per_epoch": rec["train_s_per_epoch"],
      "eval_s": rec["eval_s"],
    }
    for key, rec in result["models"].items()
  }
  log("\n" + speed.format_ratio_table(result["models"]))
  return {
    "shape": result["data"],
    "batch_size": result["batch_size"],
    "repeats": result["repeats"],
    "table": table,
    "memory": _device_memory(),
  }


def stage_electronics(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
  import jax

  from benchmarks.perf import scale
  from benchmarks.perf import speed

  r = speed.run_electronics(n_layers=1, quick=quick, log=log)
  speed.print_electronics(r, log)
  memory = _device_memory()
  d = r["data"]
  from benchmarks.data.dataset import PRESETS

  interactions = PRESETS["tiny" if quick else "electronics"]["n_interactions"]
  shape = scale.Shape(
    users=d["n_users"],
    items=d["n_items"],
    interactions=interactions,
    train_pairs=d["n_train"],
    model="lightgcn",
    layers=1,
    batch_size=r["model"]["batch_size"],
    backend="cpu" if jax.default_backend() == "cpu" else "gpu",
    image_dim=16 if quick else 4096,
    text_dim=8 if quick else 384,
  )
  model = scale.estimate(shape)
  key = "peak_per_process" if jax.default_backend() == "cpu" else "peak_per_device"
  return {
    "epoch_s": r["second_epoch"]["total_s"],
    "first_epoch_s": r["first_epoch"]["total_s"],
    "eval_s": r["eval_s"],
    "first_eval_s": r["eval_first_s"],
    "updates_per_epoch": r["updates_per_epoch"],
    "eval_users_per_s": r["eval_users_per_s"],
    "data": d,
    "memory": memory,
    "memory_model_bytes": model[key],
    "memory_model_kind": key,
  }


def stage_tests(tests: Sequence[str], timeout_s: float) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(5.0, timeout_s))
  except subprocess.TimeoutExpired as e:
    tail = (e.stdout or b"")[-2000:]
    return {
      "command": " ".join(cmd[1:]),
      "returncode": None,
      "timed_out_s": timeout_s,
      "tail": tail.decode() if isinstance(tail, bytes) else tail,
    }
  lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
  summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)), "")
  return {
    "command": " ".join(cmd[1:]),
    "returncode": out.returncode,
    "summary": summary.strip("= "),
    "wall_s": time.perf_counter() - t0,
    "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:50],
  }


def run(
  *,
  quick: bool = False,
  budget_s: float = 480.0,
  tests: Optional[Sequence[str]] = None,
  skip: Sequence[str] = (),
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """All stages within ``budget_s`` seconds; returns the JSON-ready summary."""
  t0 = time.perf_counter()
  expected = QUICK_STAGE_S if quick else STAGE_S
  summary: dict[str, Any] = {"mode": "quick" if quick else "full", "budget_s": budget_s, "stages": {}}
  summary["backend"] = stage_backend()
  log(f"backend {summary['backend']['platform']}: {summary['backend']['devices']}")
  stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [  # Electronics first: its memory peak is its own
    ("electronics", lambda: stage_electronics(quick, log)),
    ("ratios", lambda: stage_ratios(quick, log)),
    (
      "tests",
      lambda: stage_tests(tests or (QUICK_TESTS if quick else GPU_TESTS), budget_s - (time.perf_counter() - t0) - 5.0),
    ),
  ]
  for name, fn in stages:
    left = budget_s - (time.perf_counter() - t0)
    if name in skip:
      summary["stages"][name] = {"skipped": "--skip"}
      continue
    if left < expected[name]:
      summary["stages"][name] = {"skipped": f"budget: {left:.0f} s left, the stage needs about {expected[name]:.0f}"}
      log(f"[{name}] skipped: only {left:.0f} s of the budget left")
      continue
    log(f"\n[{name}] ({left:.0f} s of the budget left)")
    s0 = time.perf_counter()
    try:
      summary["stages"][name] = fn() | {"stage_s": time.perf_counter() - s0}
    except Exception as e:  # one broken stage does not hide the others' figures
      summary["stages"][name] = {"error": f"{type(e).__name__}: {e}"[:2000], "stage_s": time.perf_counter() - s0}
      log(f"[{name}] failed: {type(e).__name__}: {e}")
  summary["wall_s"] = time.perf_counter() - t0
  summary["ok"] = all("error" not in s and s.get("returncode", 0) == 0 for s in summary["stages"].values())
  return summary


PROG = "python -m benchmarks.device_check"
STAGES = ("electronics", "ratios", "tests")


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``python -m benchmarks.device_check`` runs, checked (:func:`parse_args`)."""

  quick: bool = False
  budget_s: float = 480.0
  tests: Optional[tuple[str, ...]] = None  # None: QUICK_TESTS with quick, else GPU_TESTS
  skip: tuple[str, ...] = ()
  json: Optional[Path] = None


def _stage_list(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
  bad = [n for n in names if n not in STAGES]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown stage {', '.join(bad)}; valid: {', '.join(STAGES)}")
  return names


def build_parser() -> argparse.ArgumentParser:
  p = arguments.ArgumentParser(PROG, __doc__)
  p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; what the CPU test runs)")
  p.add_argument(
    "--budget-s",
    type=arguments.real(0, inclusive=False),
    default=None,
    help="seconds for everything (default 480; quick 300)",
  )
  p.add_argument("--tests", nargs="*", default=None, help=f"pytest arguments (default: {' '.join(GPU_TESTS)})")
  p.add_argument("--skip", type=_stage_list, default=(), help=f"comma list of stages to skip: {', '.join(STAGES)}")
  p.add_argument("--json", type=arguments.json_path, default=None, help="also write the summary to this file")
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
  """The command line as :class:`Options`; a bad flag raises :class:`cli.UsageError` naming it."""
  args = build_parser().parse_args(argv)
  budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else 480.0)
  tests = None if args.tests is None else tuple(args.tests)
  return Options(quick=args.quick, budget_s=budget, tests=tests, skip=args.skip, json=args.json)


def execute(options: Options) -> dict[str, Any]:
  """:func:`run` with :class:`Options` (progress on stderr); the summary is written to ``options.json`` if set."""
  summary = run(
    quick=options.quick,
    budget_s=options.budget_s,
    tests=options.tests,
    skip=options.skip,
    log=lambda s: print(s, file=sys.stderr, flush=True),
  )
  if options.json is not None:
    atomic_write(options.json, summary_json(summary))
  return summary


def summary_json(summary: dict[str, Any]) -> str:
  """The summary as the command prints and writes it."""
  return json.dumps(summary, indent=1, default=str)


def report(summary: dict[str, Any]) -> None:
  """Prints the summary as JSON on stdout (nothing else goes there)."""
  print(summary_json(summary))
