"""Orbax checkpoints of a training run, for ``--resume`` after a kill at any point.

A checkpoint holds the array state (params, optimizer state, best params; stored as flat leaf
lists, restored into the structure of a freshly built run) and a JSON record (epoch, history,
early-stopping state, the run's config and the content fingerprint of its data). Orbax writes each step to a temporary directory and
renames it when complete, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

__all__ = ["Restored", "RunCheckpoints"]


class Restored(NamedTuple):
  state: dict[str, Any]
  meta: dict[str, Any]


#: Config fields that change how a run executes, not what it computes: a checkpoint can be resumed
#: with other values of these.
EXECUTION_ONLY = frozenset({"devices", "shard_tables", "eval_chunk_size"})


def _config_json(config: Any) -> dict[str, Any]:
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_ONLY}
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


class RunCheckpoints:
  """Checkpoints of one run (one model/method/seed) in ``directory``."""

  def __init__(self, directory: str | Path, config: Any, *, data_fingerprint: str | None = None,
               max_to_keep: int = 2):
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

  def restore(self, template: dict[str, Any]) -> Restored:
    """Restores the latest checkpoint into the structure of ``template``.

    Raises:
      ValueError: the checkpoint was written by a run with another config, or on other data (its
        data fingerprint differs from this run's).
    """
    step = self.latest()
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
    abstract = {name: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
                for name, tree in template.items()}
    leaves = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
    state = {name: jax.tree.unflatten(jax.tree.structure(template[name]), leaves[name]) for name in template}
    return Restored(state, meta)
