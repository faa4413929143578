"""Orbax checkpoints of a training run, for ``--resume`` after a kill at any point.

A checkpoint holds the array state (params, optimizer state, best params; stored as flat leaf
lists, restored into the structure of a freshly built run) and a JSON record (epoch, history,
early-stopping state, the run's config and the content fingerprint of its data). Orbax writes each step to a temporary directory and
renames it when complete, so a kill mid-save leaves the previous checkpoint intact. A step damaged
afterwards (e.g. its metadata JSON truncated) is skipped on restore with a warning naming it, and the
previous kept step is used; if no step is readable the error names the directory and every step.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from benchmarks.training.config import EXECUTION_ONLY

__all__ = ["Restored", "RunCheckpoints"]


class Restored(NamedTuple):
  state: dict[str, Any]
  meta: dict[str, Any]


#: The keys of a checkpoint's JSON record that a resume reads.
META_KEYS = ("epoch", "updates", "wall_s", "history", "stopper")


class DamagedCheckpoint(Exception):
  """A checkpoint step that cannot be read."""


def _config_json(config: Any) -> dict[str, Any]:
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_ONLY}
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


class RunCheckpoints:
  """Checkpoints of one run (one model/method/seed) in ``directory``."""

  def __init__(self, directory: str | Path, config: Any, *, data_fingerprint: str | None = None, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.config = _config_json(config)
    self.data_fingerprint = data_fingerprint
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False),
    )

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    leaves = {name: jax.tree.leaves(tree) for name, tree in state.items()}
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(leaves),
        meta=ocp.args.JsonSave({**meta, "config": self.config, "data_fingerprint": self.data_fingerprint}),
      ),
      force=True,
    )
    self._manager.wait_until_finished()

  def _read_meta(self, step: int) -> dict[str, Any]:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # a truncated / missing / unreadable metadata file
      raise DamagedCheckpoint(f"its metadata cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
      raise DamagedCheckpoint(
        f"its metadata lacks {', '.join(k for k in META_KEYS if not isinstance(meta, dict) or k not in meta)}"
      )
    return meta

  def _check_meta(self, meta: dict[str, Any]) -> None:
    saved = {k: v for k, v in (meta.get("config") or {}).items() if k not in EXECUTION_ONLY}
    if saved != self.config:
      raise ValueError(
        f"checkpoint in {self.directory} was written by a different run config; "
        f"saved {meta.get('config')}, now {self.config}. Use another --checkpoint-dir."
      )
    saved_fp = meta.get("data_fingerprint")
    if saved_fp != self.data_fingerprint:
      raise ValueError(
        f"checkpoint in {self.directory} was written on different data: its data fingerprint is "
        f"{saved_fp or 'missing (an older checkpoint)'}, this run's data has {self.data_fingerprint}. "
        "Use another --checkpoint-dir (or the data set the checkpoint was made on)."
      )

  def _unusable(self, damaged: list[tuple[int, str]]) -> ValueError:
    steps = "; ".join(f"step {s}: {why}" for s, why in damaged)
    return ValueError(
      f"no usable checkpoint in {self.directory}: {steps}. Delete the directory (or pass "
      "--overwrite) to train this run afresh."
    )

  def verify(self) -> int | None:
    """The step :meth:`restore` would start from (``None``: no checkpoint), reading metadata only.

    Raises:
      ValueError: as :meth:`restore`: another config, other data, or no readable step.
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except DamagedCheckpoint as e:
        damaged.append((step, str(e)))
        continue
      self._check_meta(meta)
      return step
    if damaged:
      raise self._unusable(damaged)
    return None

  def restore(self, template: dict[str, Any]) -> Restored:
    """Restores the latest readable checkpoint into the structure of ``template``.

    A damaged step (metadata or arrays unreadable) is skipped with a warning naming it, and deleted so
    that the resumed run can save that step again; the previous kept step is used.

    Raises:
      ValueError: the checkpoint was written by a run with another config, or on other data (its
        data fingerprint differs from this run's), or no kept step is readable (the message names the
        directory and each step).
    """
    abstract = {
      name: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(tree)] for name, tree in template.items()
    }
    damaged: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except DamagedCheckpoint as e:
        damaged.append((step, str(e)))
        continue
      self._check_meta(meta)
      try:
        leaves = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
      except Exception as e:  # unreadable arrays
        damaged.append((step, f"its arrays cannot be read ({type(e).__name__}: {e})"))
        continue
      for bad, why in damaged:
        warnings.warn(
          f"checkpoint step {bad} in {self.directory} is damaged ({why}); deleted it, resuming from step {step}",
          RuntimeWarning,
          stacklevel=2,
        )
        self._manager.delete(bad)
      state = {name: jax.tree.unflatten(jax.tree.structure(template[name]), leaves[name]) for name in template}
      return Restored(state, meta)
    if damaged:
      raise self._unusable(damaged)
    raise ValueError(f"no checkpoint in {self.directory} to restore")
