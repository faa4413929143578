"""A store of finished training runs: one JSON record per run, keyed by everything that defines it.

A run's *identity* is the results version of the trainer (:data:`benchmarks.training.loop.RESULTS_VERSION`),
the content fingerprint of its data (:func:`benchmarks.data.fingerprint.dataset_fingerprint`) and its full
:class:`~benchmarks.training.loop.TrainConfig` less the fields that only change how it executes (devices, table
sharding, evaluation chunk). The record of a run is ``<records>/<key>.json`` with ``key`` a SHA-256 of the
identity, so

* a finished run is found again and skipped;
* a run with another config, other data or another results version has another key: an old record is
  never reused for it (it stays in the store, unused, until pruned -- :meth:`RunStore.stale`);
* a record whose stored identity does not match its file name (edited or damaged by hand) is refused
  with an error naming the file and the fields that differ.

While a run trains, its orbax checkpoints live in ``<work>/<key>/``; a run that was interrupted is
resumed from there (exactly: see :func:`benchmarks.training.loop.fit`) and the directory is removed once the
record is written. Several worker processes can share a store: a run is claimed by creating
``<work>/<key>.lock`` exclusively; a lock left by a dead process of this host is taken over.

Records keep the test and validation metrics of the best-validation epoch, the costs, and a thinned
history (per evaluated epoch: epoch, training loss, the validation metric, gradient evaluations, wall
seconds), so a study's records stay small enough to commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional, TypedDict

from benchmarks.runtime.files import atomic_write
from benchmarks.data.dataset import Dataset
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.training.config import EXECUTION_ONLY, RESULTS_VERSION, TrainConfig, TrainingDiverged
from benchmarks.training.loop import fit

__all__ = ["RunRecord", "RunStore", "StoreError", "checkpoint_dir", "identity", "platform", "run_key", "trained_on"]


class RunRecord(TypedDict, total=False):
  """A finished run, as the store holds it in ``<records>/<key>.json``: the harness's one run-record type.

  Written by :meth:`RunStore.run` alone (through :meth:`RunStore.put`), read back by :meth:`RunStore.get` /
  :meth:`RunStore.read` alone; compare, study, robustness and landscape all keep their runs this way.
  A ``"diverged"`` record has ``error`` and empty ``valid`` / ``test``, and none of the cost fields.
  """

  key: str  # run_key(config, data fingerprint)
  identity: dict[str, Any]  # identity(config, data fingerprint): what the key is the hash of
  info: dict[str, Any]  # the caller's labels (e.g. the study's cell, phase, grid point)
  model: str
  method: str
  seed: int
  host: str
  platform: dict[str, str]  # platform(): where it trained (not part of the identity)
  resumed: bool  # continued from a checkpoint of an interrupted attempt
  status: Literal["ok", "diverged"]
  error: str
  valid: dict[str, float]  # metrics of the best-validation epoch
  test: dict[str, float]  # test metrics of the best-validation parameters
  best_epoch: int
  epochs: int
  wall_s: float
  updates: int
  grad_evals: int
  history: list[list[float]]  # per evaluated epoch, the fields of history_fields
  history_fields: list[str]
  finished_at: str  # UTC, ISO 8601


class StoreError(ValueError):
  """A record in the store contradicts its key, or cannot be read."""


def _canonical_config(config: TrainConfig) -> dict[str, Any]:
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_ONLY}
  fields["model_hparams"] = dict(sorted(dict(config.model_hparams).items()))
  fields["method_hparams"] = dict(sorted(config.method_hparams.items()))
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


def identity(config: TrainConfig, data_fingerprint: str) -> dict[str, Any]:
  """What defines a run: results version, data fingerprint and the canonical config (JSON-ready)."""
  return {"results_version": RESULTS_VERSION, "data_fingerprint": data_fingerprint, "config": _canonical_config(config)}


def run_key(config: TrainConfig, data_fingerprint: str) -> str:
  """The store key of a run: 24 hex digits of the SHA-256 of its :func:`identity`."""
  text = json.dumps(identity(config, data_fingerprint), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def checkpoint_dir(root: str | Path, config: TrainConfig, data_fingerprint: str) -> Path:
  """The harness's one checkpoint-directory rule: ``<root>/<run key>`` -- a run's checkpoints are found
  again by what the run is, whichever command trains it."""
  return Path(root) / run_key(config, data_fingerprint)


def platform() -> dict[str, str]:
  """Where a run trained: JAX's backend, the first device's kind and the jax / jaxlib versions.

  Not part of a run's identity (a run's results do not depend on it beyond floating-point rounding),
  but stored with its record so that a report can say which runs ran where and compare wall times
  only between runs of one platform.
  """
  import jax
  import jaxlib

  return {
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
  }


def trained_on(record: dict[str, Any]) -> str:
  """Where a record's run trained, from its :func:`platform`: ``"cpu"`` or the accelerator's device kind
  (e.g. ``"NVIDIA H200"``).

  Records written before runs stored their platform (2026-12-04) all trained on CPUs: no accelerator had
  been lent to the sessions that wrote them.
  """
  p = record.get("platform")
  return "cpu" if not p or p.get("backend") == "cpu" else str(p.get("device") or p.get("backend"))


def _thin_history(history: list[dict[str, Any]], metric: str) -> list[list[float]]:
  return [
    [
      h["epoch"],
      round(float(h["loss"]), 6),
      round(float(h["valid"][metric]), 6),
      int(h["grad_evals"]),
      round(float(h["wall_s"]), 2),
    ]
    for h in history
  ]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunStore:
  """Finished-run records in ``records_dir``; checkpoints and locks of running runs in ``work_dir``."""

  def __init__(self, records_dir: str | Path, work_dir: str | Path):
    self.records_dir = Path(records_dir)
    self.work_dir = Path(work_dir)

  # -- records -------------------------------------------------------------------------------------

  def path(self, key: str) -> Path:
    return self.records_dir / f"{key}.json"

  def read(self, path: Path) -> RunRecord:
    """The record in ``path`` (no check of its key; :meth:`get` checks)."""
    try:
      return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise StoreError(f"run record {path} cannot be read ({e}); delete it to rerun that run") from e

  def get(self, config: TrainConfig, data_fingerprint: str) -> Optional[RunRecord]:
    """The finished record of this run, or ``None`` if it has not run.

    Raises:
      StoreError: the file for this key holds a record of another identity (names the fields).
    """
    key = run_key(config, data_fingerprint)
    path = self.path(key)
    if not path.exists():
      return None
    record = self.read(path)
    expected = identity(config, data_fingerprint)
    differ = [k for k in expected if record.get("identity", {}).get(k) != expected[k]]
    if differ:
      if "config" in differ:
        saved = record.get("identity", {}).get("config", {})
        differ[differ.index("config")] = (
          "config ("
          + ", ".join(
            sorted(k for k in set(saved) | set(expected["config"]) if saved.get(k) != expected["config"].get(k))
          )
          + ")"
        )
      raise StoreError(
        f"run record {path} does not match its key: its {', '.join(differ)} differ from the run that "
        "key stands for; the file was edited or damaged -- delete it to rerun that run"
      )
    return record

  def put(self, record: RunRecord) -> Path:
    """Writes ``record`` (which carries its ``key``) atomically; returns its path."""
    path = self.path(record["key"])
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path

  def keys(self) -> set[str]:
    """Keys of every record file in the store."""
    if not self.records_dir.is_dir():
      return set()
    return {p.stem for p in self.records_dir.glob("*.json")}

  def stale(self, wanted: set[str]) -> list[Path]:
    """Record files whose key is not in ``wanted`` (another config, data or results version)."""
    return sorted(self.path(k) for k in self.keys() - wanted)

  # -- running -------------------------------------------------------------------------------------

  def checkpoint_dir(self, config: TrainConfig, data_fingerprint: str) -> Path:
    return checkpoint_dir(self.work_dir, config, data_fingerprint)

  @contextlib.contextmanager
  def claim(self, key: str) -> Iterator[bool]:
    """Context manager: ``True`` if this process holds the run's lock (released on exit), else ``False``."""
    self.work_dir.mkdir(parents=True, exist_ok=True)
    lock = self.work_dir / f"{key}.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    held = False
    for _ in range(2):
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          owner = json.loads(lock.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
          owner = {}
        if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
          lock.unlink(missing_ok=True)  # left by a dead process of this host
          continue
        break
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      held = True
      break
    try:
      yield held
    finally:
      if held:
        lock.unlink(missing_ok=True)

  def run(
    self,
    ds: Dataset,
    config: TrainConfig,
    *,
    info: Optional[dict[str, Any]] = None,
    checkpoint_every: int = 5,
    progress: bool = False,
  ) -> RunRecord:
    """Trains ``config`` on ``ds`` (resuming an interrupted attempt), stores and returns its record.

    The caller must hold the run's :meth:`claim`. ``info`` (e.g. the study's labels for the run) is
    stored in the record under ``"info"``. A run whose loss diverges is stored with status
    ``"diverged"`` (it would diverge again).
    """
    fp = dataset_fingerprint(ds)
    key = run_key(config, fp)
    ckpt = self.checkpoint_dir(config, fp)
    resumed = ckpt.is_dir() and any(ckpt.iterdir())
    base: RunRecord = {
      "key": key,
      "identity": identity(config, fp),
      "info": dict(info or {}),
      "model": config.model,
      "method": config.method,
      "seed": config.seed,
      "host": socket.gethostname(),
      "platform": platform(),
      "resumed": resumed,
    }
    try:
      fitted = fit(ds, config, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, resume=True, progress=progress)
    except TrainingDiverged as e:
      record = {**base, "status": "diverged", "error": str(e), "valid": {}, "test": {}}
    else:
      r = fitted.record
      record = {
        **base,
        "status": "ok",
        "valid": r["valid"],
        "test": r["test"],
        "best_epoch": r["best_epoch"],
        "epochs": r["epochs"],
        "wall_s": r["wall_s"],
        "updates": r["updates"],
        "grad_evals": r["grad_evals"],
        "history": _thin_history(r["history"], config.valid_metric),
        "history_fields": ["epoch", "loss", f"valid_{config.valid_metric}", "grad_evals", "wall_s"],
      }
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    self.put(record)
    shutil.rmtree(ckpt, ignore_errors=True)
    return record
