"""Several study workers on one machine: one process per CPU core, each single-threaded and pinned.

``python -m benchmarks.study SPEC --workers N`` starts ``N`` worker processes of the same study (they
share its run store; :mod:`benchmarks.training.records`'s lock files keep any run from being trained twice)
and reports once they have all stopped. Worker ``i`` runs on core ``cores[i]`` of the cores this
process may use (``os.sched_getaffinity``) with XLA:CPU single-threaded
(:data:`SINGLE_THREAD_XLA_FLAGS`), so the workers do not compete for each other's cores. Measured on the
2-core development CPU, two copies of one run side by side (the study workers paused): Scientific VBPR
with MG, 60 epochs, 32.4 s as two multi-threaded processes vs 33.2 s pinned (no gain); Baby LayerGCN
with MG, 4 epochs with compilation, 73.4 s vs 64.1 s (1.14x). So it is mostly a convenience -- one
command that keeps every core busy -- with a modest gain where a run's kernels are large.

Pinning needs ``os.sched_setaffinity`` (Linux); elsewhere the workers are only single-threaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

__all__ = ["SINGLE_THREAD_XLA_FLAGS", "available_cores", "check_workers", "run_workers", "worker_env"]

#: XLA flags that keep XLA:CPU on the calling thread.
SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def available_cores() -> list[int]:
  """The CPU cores this process may run on (all of ``os.cpu_count()`` where affinity is unknown)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def check_workers(n: int, cores: Optional[Sequence[int]] = None) -> list[int]:
  """The cores for ``n`` workers (default: :func:`available_cores`).

  Raises:
    ValueError: ``n`` is not between 1 and the number of cores.
  """
  cores = list(available_cores() if cores is None else cores)
  if not 1 <= n <= len(cores):
    raise ValueError(f"--workers must be between 1 and the {len(cores)} CPU core(s) this process may use, got {n}")
  return cores


def worker_env(base: Optional[dict[str, str]] = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) with the single-thread XLA flags added to ``XLA_FLAGS``, and
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless ``base`` sets it.

  On a GPU each JAX process otherwise reserves 75 % of the device's memory when it starts, so the second
  worker sharing one GPU would fail to allocate; without preallocation they share it (five to eight
  Clothing LightGCN workers shared one H200 this way). On CPU the variable does nothing.
  """
  env = dict(os.environ if base is None else base)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  flags = env.get("XLA_FLAGS", "").split()
  flags += [f for f in SINGLE_THREAD_XLA_FLAGS if f.split("=")[0] not in {x.split("=")[0] for x in flags}]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _pin(core: int):
  def preexec() -> None:  # runs in the child between fork and exec
    if hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {core})

  return preexec


def run_workers(n: int, worker_argv: Sequence[str], *, cores: Optional[Sequence[int]] = None) -> list[int]:
  """Runs ``n`` copies of ``python -m benchmarks.study *worker_argv``, worker ``i`` pinned to ``cores[i]``.

  Their output goes to this process's stdout / stderr. Returns the exit codes in worker order. On
  ``KeyboardInterrupt`` the workers are terminated (a run they were training resumes from its
  checkpoint next time) and the interrupt is re-raised.

  Raises:
    ValueError: ``n`` is not between 1 and the number of ``cores``.
  """
  cores = check_workers(n, cores)
  env = worker_env()
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "benchmarks.study", *worker_argv],
      env=env,
      preexec_fn=_pin(cores[i]),
    )
    for i in range(n)
  ]
  try:
    return [p.wait() for p in procs]
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    for p in procs:
      p.wait()
    raise
