"""What defines a training run (:class:`TrainConfig`), and the version of what training computes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from benchmarks.training.methods import METHOD_DEFAULTS, resolve_method_hparams

__all__ = [
  "CONFIG_FIELDS",
  "EXECUTION_ONLY",
  "KS",
  "RESULTS_VERSION",
  "TrainConfig",
  "TrainingDiverged",
  "config_with",
]

KS = (5, 10, 20, 50)

#: Version of what a training run computes. Bump it with every change that alters training results
#: (metrics, losses, epochs) of an existing config on existing data: stored run records
#: (``benchmarks.training.records``) of another version are stale and are rerun, never mixed in.
RESULTS_VERSION = 1


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines one training run.

  ``model_hparams`` go to the model's constructor (e.g. ``reg_weight``, ``n_layers``);
  ``method_hparams`` override :data:`benchmarks.training.methods.METHOD_DEFAULTS` (resolved to the full set on
  construction) (``alpha1``, ``alpha2``,
  ``beta``, ``rho``, ``gnp_penalty``). ``devices`` trains data-parallel over that many devices
  with :mod:`benchmarks.parallel.mesh` (batches split over the mesh, parameters and optimizer state
  replicated, or embedding tables row-sharded with ``shard_tables``); the results equal one
  device's up to floating-point summation order.
  """

  model: str = "lightgcn"
  method: str = "plain"
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  batch_size: int = 2048
  max_epochs: int = 1000
  patience: int = 20
  eval_every: int = 1
  valid_metric: str = "recall@20"
  eval_chunk_size: Optional[int] = None  # None: the evaluator picks (about 24 MiB of scores on CPU)
  seed: int = 0
  model_hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  method_hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  devices: Optional[int] = None  # data-parallel over this many devices (benchmarks.parallel.mesh); None: one
  shard_tables: bool = False  # with devices: row-shard the embedding tables instead of replicating them
  # None: the negatives and batch order of epoch e come from default_rng([seed, e]). An integer k draws
  # them from default_rng([seed, e, k]) instead -- same initialisation, another data order: a no-op
  # variation of a run (the A/A control of benchmarks.study).
  order_seed: Optional[int] = None

  def __post_init__(self):
    for name in ("batch_size", "max_epochs", "eval_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.patience < 0:
      raise ValueError(f"TrainConfig.patience must be >= 0, got {self.patience!r}")
    if self.devices is not None and int(self.devices) < 1:
      raise ValueError(f"TrainConfig.devices must be None or >= 1, got {self.devices!r}")
    if self.order_seed is not None and int(self.order_seed) < 0:
      raise ValueError(f"TrainConfig.order_seed must be None or >= 0, got {self.order_seed!r}")
    if self.shard_tables and self.devices is None:
      raise ValueError("TrainConfig.shard_tables needs TrainConfig.devices (the number of devices to shard over)")
    valid = [f"{m}@{k}" for m in ("recall", "precision", "ndcg", "map") for k in KS]
    if self.valid_metric not in valid:
      raise ValueError(f"unknown valid_metric {self.valid_metric!r}; valid: {', '.join(valid)}")
    # Resolved once, here: every reader (the method, the record's identity, checkpoints) sees the full set.
    object.__setattr__(self, "method_hparams", resolve_method_hparams(self.method_hparams))
    object.__setattr__(self, "model_hparams", dict(self.model_hparams))


#: Config fields that change how a run executes, not what it computes: a run keeps its identity (and a
#: checkpoint can be resumed) with other values of these.
EXECUTION_ONLY = frozenset({"devices", "shard_tables", "eval_chunk_size"})

#: The :class:`TrainConfig` fields a hyper-parameter grid can search (besides method and model hyper-parameters).
CONFIG_FIELDS = {"learning_rate", "batch_size"}


def config_with(config: TrainConfig, **overrides: Any) -> TrainConfig:
  """``config`` with overrides routed to the right place (config field, method or model hparam)."""
  fields, method_hp, model_hp = {}, dict(config.method_hparams), dict(config.model_hparams)
  for name, value in overrides.items():
    if name in CONFIG_FIELDS:
      fields[name] = value
    elif name in METHOD_DEFAULTS:
      method_hp[name] = value
    else:
      model_hp[name] = value
  return dataclasses.replace(config, **fields, method_hparams=method_hp, model_hparams=model_hp)
