"""One training loop for every method: plain, MG, SAM, GNP.

The jitted train step is the same for every method::

    loss, grads = value_and_grad(loss_fn)(params, key1)
    grad_fn = lambda p, i: grad(loss_fn)(p, fold_in(key2, i))   # fresh dropout for a 2nd gradient
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

An epoch is one compiled ``lax.scan`` over pre-sampled batches (plus one call for the last,
smaller batch), with the params and optimizer-state buffers donated; the host syncs once per
epoch to read the losses. Randomness is explicit: the negatives of epoch ``e`` come from
``np.random.default_rng([seed, e])`` and the step keys from ``fold_in(key(seed), e)``, so a run
resumed from a checkpoint replays exactly what an uninterrupted run would have done. A model's
per-epoch constants (its optional ``pre_epoch`` hook, e.g. LayerGCN's edge dropout) come from
(seed, epoch) too (:func:`epoch_constants`); the trainer never asks which model it trains.

Protocol (MMRec, DESIGN.md section 4): evaluate every ``eval_every`` epochs on validation, early stop
after ``patience`` evaluations without improvement of ``valid_metric``, report the test metrics of
the parameters of the best validation epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import models
from benchmarks.runtime import backend
from benchmarks.training import checkpoints, kernels
from benchmarks.parallel import mesh as sharding
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.data.dataset import Dataset
from benchmarks.training.config import KS, RESULTS_VERSION, TrainConfig, TrainingDiverged, config_with
from benchmarks.training.methods import Method, make_method
from benchmarks.training.metrics import evaluate
from benchmarks.data.sampling import NegativeSampler

__all__ = [
  "EarlyStopping",
  "EpochBatches",
  "TrainConfig",
  "TrainingDiverged",
  "Fitted",
  "build",
  "epoch_batches",
  "epoch_constants",
  "fit",
  "grid_search",
  "interactions",
  "make_train_fns",
  "run_epoch",
  "train",
]


@dataclasses.dataclass
class EarlyStopping:
  """MMRec's rule: stop once ``patience + 1`` evaluations in a row have not improved the best."""

  patience: int
  best: float = -math.inf
  best_epoch: int = -1
  bad_evals: int = 0

  def update(self, value: float, epoch: int) -> tuple[bool, bool]:
    """Records an evaluation; returns ``(improved, stop)``."""
    if value > self.best:
      self.best, self.best_epoch, self.bad_evals = value, epoch, 0
      return True, False
    self.bad_evals += 1
    return False, self.bad_evals > self.patience


# --------------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
  """A model split for functional use, plus its method."""

  graphdef: nnx.GraphDef
  params: Any  # nnx.State of trainable arrays
  rest: Any  # nnx.State of constants (graph, frozen features)
  method: Method


def interactions(ds: Dataset) -> models.Interactions:
  """What a model is built from, out of a data set: its sizes, training pairs and feature tables."""
  return models.Interactions(ds.n_users, ds.n_items, ds.train.user, ds.train.item, dict(ds.features))


def build(ds: Dataset, config: TrainConfig) -> Built:
  """Instantiates the model (seeded) and the method for ``config``."""
  model_cls = models.get_model(config.model)
  method = make_method(
    config.method,
    optimizer=config.optimizer,
    learning_rate=config.learning_rate,
    **config.method_hparams,
  )
  hparams = {**kernels.model_defaults(model_cls), **config.model_hparams}  # the backend's propagation kernel
  model = model_cls(interactions(ds), rngs=nnx.Rngs(config.seed), **hparams)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return Built(graphdef, nnx.as_pure(params), nnx.as_pure(rest), method)


def make_train_fns(graphdef: nnx.GraphDef, tx: optax.GradientTransformationExtraArgs):
  """Returns jitted ``(run_batches, embed)``.

  ``run_batches(params, opt_state, rest, key, batches)`` scans the train step over the leading
  axis of ``batches`` (a dict of ``(n_batches, batch_size)`` int arrays) and returns
  ``(params, opt_state, losses)``; ``params`` and ``opt_state`` are donated.
  ``embed(params, rest)`` returns the (users, items) representations used for scoring.
  """

  def loss_fn(params, rest, batch, key):
    return nnx.merge(graphdef, params, rest).loss(batch, key)

  def train_step(params, opt_state, rest, batch, key):
    key_first, key_second = jax.random.split(key)
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch, key_first)

    def grad_fn(p, i):
      return jax.grad(loss_fn)(p, rest, batch, jax.random.fold_in(key_second, i))

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_batches(params, opt_state, rest, key, batches):
    n = jax.tree.leaves(batches)[0].shape[0]

    def body(carry, xs):
      params, opt_state = carry
      index, batch = xs
      params, opt_state, loss = train_step(params, opt_state, rest, batch, jax.random.fold_in(key, index))
      return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (jnp.arange(n), batches))
    return params, opt_state, losses

  @jax.jit
  def embed(params, rest):
    return nnx.merge(graphdef, params, rest).embed()

  return run_batches, embed


_TRAIN_FNS: dict[Any, Any] = {}


def _cached_train_fns(graphdef: nnx.GraphDef, config: TrainConfig, tx: optax.GradientTransformationExtraArgs):
  """:func:`make_train_fns` shared by runs that differ only in seed, so seeds reuse compilations.

  The key holds everything the jitted functions depend on: the model's graph definition (its
  structure and static sizes) and the method, optimizer and their hyper-parameters. ``tx`` (the
  transformation built from ``config``) is compiled on a miss.
  """
  key = (
    graphdef,
    config.method,
    config.optimizer,
    config.learning_rate,
    tuple(sorted(config.method_hparams.items())),
  )
  if key not in _TRAIN_FNS:
    _TRAIN_FNS.clear()  # keep only the latest: compiled executables hold memory
    _TRAIN_FNS[key] = make_train_fns(graphdef, tx)
  return _TRAIN_FNS[key]


#: The optional per-epoch hook of a model: ``model.pre_epoch(key, epoch)`` (see :func:`epoch_constants`).
EPOCH_HOOK = "pre_epoch"

#: ``fold_in`` data of the epoch-hook key stream, apart from the epochs' step keys (epoch < 2**32 - 1).
_EPOCH_HOOK_STREAM = 2**32 - 1


def has_epoch_hook(model_cls: type) -> bool:
  """Whether models of ``model_cls`` define the per-epoch hook :data:`EPOCH_HOOK`."""
  return callable(getattr(model_cls, EPOCH_HOOK, None))


@functools.partial(jax.jit, static_argnums=0)
def _run_epoch_hook(graphdef, params, rest, key, epoch):
  model = nnx.merge(graphdef, params, rest)
  getattr(model, EPOCH_HOOK)(key, epoch)
  return nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])


def epoch_constants(graphdef: nnx.GraphDef, params: Any, rest: Any, seed: int, epoch: int) -> Any:
  """The constants ``rest`` that training epoch ``epoch`` runs with: the model's per-epoch hook applied.

  The one model-agnostic hook: a model that needs per-epoch work on its constants (e.g. LayerGCN's
  edge dropout, MMRec's ``pre_epoch_processing``) defines ``pre_epoch(self, key, epoch)``, which may
  reassign its non-parameter variables (never its parameters). It runs jitted on the merged model with
  ``key = fold_in(fold_in(key(seed), 2**32 - 1), epoch)`` -- a stream apart from the step keys
  ``fold_in(fold_in(key(seed), epoch), i)`` -- so the constants of an epoch depend on ``(seed, epoch)``
  only and a resumed run replays them. The result keeps ``rest``'s placement (shardings). Call it only
  for models with the hook (:func:`has_epoch_hook`); models without one train on ``rest`` itself.
  Evaluation always uses the unmodified ``rest``.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EPOCH_HOOK_STREAM), epoch)
  new = _run_epoch_hook(graphdef, params, rest, key, jnp.asarray(epoch, jnp.int32))
  return jax.tree.map(lambda n, old: jax.device_put(n, old.sharding), new, rest)


@jax.jit
def _dot_scores(users, items, user_ids):
  return users[user_ids] @ items.T


def evaluate_params(embed, params, rest, ds: Dataset, split: str, chunk_size: Optional[int]) -> dict[str, float]:
  """Full-ranking metrics of ``split`` for the model at ``params``."""
  if jax.process_count() > 1:  # parameters on a multi-process mesh (benchmarks.parallel.distributed)
    from benchmarks.parallel import evaluation

    return evaluation.evaluate_params(embed, params, rest, ds, split, chunk_size, ks=KS)
  chunk_size = backend.eval_chunk_size(ds.n_items) if chunk_size is None else chunk_size
  users, items = embed(params, rest)
  return evaluate(functools.partial(_dot_scores, users, items), ds, split, ks=KS, chunk_size=chunk_size)


class EpochBatches(NamedTuple):
  """An epoch's samples on the device(s): ``n_full`` full batches stacked ``(n_full, batch_size)`` in ``full``,
  and the last, smaller batch ``(1, rest)`` in ``remainder`` (``None`` when the batch size divides the epoch)."""

  n_full: int
  full: dict[str, jax.Array]
  remainder: Optional[dict[str, jax.Array]]

  @property
  def updates(self) -> int:
    return self.n_full + (self.remainder is not None)


def epoch_batches(sample: Mapping[str, np.ndarray], batch_size: int, mesh: Optional[Any] = None) -> EpochBatches:
  """Splits an epoch's samples into full batches and the remainder, on the device(s).

  With a ``mesh`` (:mod:`benchmarks.parallel.mesh`) the batches are split over its devices.
  """
  n = len(sample["user"])
  full = n // batch_size
  batches = {k: v[: full * batch_size].reshape(full, batch_size) for k, v in sample.items()}
  rest = {k: v[full * batch_size :][None] for k, v in sample.items()} if n % batch_size else None
  if mesh is None:
    put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  else:
    put = functools.partial(sharding.place_batches, mesh)
  return EpochBatches(full, put(batches), (put(rest) if rest is not None else None))


def run_epoch(run_batches: Callable, params: Any, opt_state: Any, rest: Any, key: jax.Array, batches: EpochBatches):
  """The one epoch body (:func:`fit`, ``benchmarks.speed`` and ``benchmarks.scale`` all train through it).

  The full batches go through ``run_batches`` (:func:`make_train_fns`) as one scanned call with step keys
  ``fold_in(key, i)``, the remainder as a second call keyed ``fold_in(key, n_full)``. Returns
  ``(params, opt_state, losses)`` with the per-step losses still on the device (no host sync here).
  """
  losses = []
  if batches.n_full:
    params, opt_state, loss = run_batches(params, opt_state, rest, key, batches.full)
    losses.append(loss)
  if batches.remainder is not None:
    params, opt_state, loss = run_batches(
      params, opt_state, rest, jax.random.fold_in(key, batches.n_full), batches.remainder
    )
    losses.append(loss)
  return params, opt_state, jnp.concatenate(losses)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class Fitted(NamedTuple):
  """A finished run: its result record and the model at the best-validation epoch."""

  record: dict[str, Any]
  graphdef: nnx.GraphDef
  params: Any
  rest: Any

  def model(self) -> nnx.Module:
    """The trained model (best-validation parameters) as an NNX module."""
    return nnx.merge(self.graphdef, self.params, self.rest)


def train(ds: Dataset, config: TrainConfig, **kwargs: Any) -> dict[str, Any]:
  """Trains ``config`` on ``ds`` (see :func:`fit`) and returns the result record."""
  return fit(ds, config, **kwargs).record


def fit(
  ds: Dataset,
  config: TrainConfig,
  *,
  checkpoint_dir: Optional[str | Path] = None,
  checkpoint_every: int = 1,
  resume: bool = False,
  progress: bool = True,
  desc: Optional[str] = None,
) -> Fitted:
  """Trains ``config`` on ``ds`` with early stopping; returns the record and the best model.

  The record (``Fitted.record``, JSON-ready) has ``model``, ``method``, ``optimizer``, ``seed``, ``valid`` and ``test`` (metric
  dicts of the best-validation epoch), ``best_epoch``, ``epochs``, ``wall_s``, ``grad_evals``,
  ``grad_evals_per_update``, ``updates`` and ``history`` (per evaluated epoch: ``epoch``, ``loss``,
  ``valid``, ``grad_evals``, ``wall_s``).

  With ``checkpoint_dir`` the state is saved (orbax) every ``checkpoint_every`` evaluated epochs
  and when the run ends; with ``resume=True`` a run continues from the latest checkpoint there
  (replaying the epochs after it) and ends exactly as an uninterrupted run with the same config
  would.

  Raises:
    TrainingDiverged: the training loss became non-finite (the message says at which epoch).
  """
  from tqdm.auto import tqdm  # progress bars are a harness concern, imported lazily

  built = build(ds, config)
  tx = built.method.tx
  run_batches, embed = _cached_train_fns(built.graphdef, config, tx)
  sampler = NegativeSampler(ds)
  epoch_hook = has_epoch_hook(models.get_model(config.model))
  params, rest = built.params, built.rest
  opt_state = tx.init(params)
  best_params = params
  stopper = EarlyStopping(config.patience)
  history: list[dict[str, Any]] = []
  start_epoch, updates_done, wall_before = 0, 0, 0.0

  manager = (
    checkpoints.RunCheckpoints(checkpoint_dir, config, data_fingerprint=dataset_fingerprint(ds))
    if checkpoint_dir
    else None
  )
  if manager is not None and resume and manager.latest() is not None:
    restored = manager.restore({"params": params, "opt_state": opt_state, "best_params": best_params})
    params, opt_state, best_params = (restored.state[k] for k in ("params", "opt_state", "best_params"))
    meta = restored.meta
    start_epoch, updates_done, wall_before = meta["epoch"] + 1, meta["updates"], meta["wall_s"]
    history = meta["history"]
    stopper = EarlyStopping(config.patience, **meta["stopper"])
    if meta.get("finished"):
      start_epoch = config.max_epochs
  mesh = None
  if config.devices is not None or jax.process_count() > 1:  # several processes: a mesh over all their devices
    mesh = sharding.make_mesh(config.devices)
    params, opt_state, rest = sharding.place_state(
      mesh, built.graphdef, params, opt_state, rest, shard_tables=config.shard_tables
    )
    best_params = jax.device_put(best_params, jax.tree.map(lambda a: a.sharding, params))
  best_params = jax.tree.map(jnp.copy, best_params)

  base_key = jax.random.key(config.seed)
  t0 = time.perf_counter()
  n_train = len(ds.train)
  bar = tqdm(
    range(start_epoch, config.max_epochs),
    desc=desc or f"{config.model}/{config.method}/seed{config.seed}",
    disable=None if progress else True,  # None: no bar when stderr is not a terminal (logs, pipes)
    leave=False,
  )
  finished = False
  for epoch in bar:
    order = [config.seed, epoch] if config.order_seed is None else [config.seed, epoch, config.order_seed]
    sample = sampler.epoch(np.random.default_rng(order))
    batches = epoch_batches(sample, config.batch_size, mesh)
    key = jax.random.fold_in(base_key, epoch)
    train_rest = epoch_constants(built.graphdef, params, rest, config.seed, epoch) if epoch_hook else rest
    params, opt_state, losses = run_epoch(run_batches, params, opt_state, train_rest, key, batches)
    updates_done += batches.updates
    epoch_loss = float(jnp.mean(losses))  # the one host sync of the epoch
    if not math.isfinite(epoch_loss):
      raise TrainingDiverged(
        f"{config.model}/{config.method} seed {config.seed}: training loss is {epoch_loss} at "
        f"epoch {epoch}; lower the learning rate or check the data."
      )
    if (epoch + 1) % config.eval_every and epoch + 1 < config.max_epochs:
      continue
    valid = evaluate_params(embed, params, rest, ds, "valid", config.eval_chunk_size)
    improved, stop = stopper.update(valid[config.valid_metric], epoch)
    if improved:
      best_params = jax.tree.map(jnp.copy, params)
    history.append(
      {
        "epoch": epoch,
        "loss": epoch_loss,
        "valid": valid,
        "grad_evals": built.method.grad_evals(updates_done),
        "wall_s": wall_before + time.perf_counter() - t0,
      }
    )
    bar.set_postfix(loss=f"{epoch_loss:.4f}", **{config.valid_metric: f"{valid[config.valid_metric]:.4f}"})
    finished = stop or epoch + 1 >= config.max_epochs
    if manager is not None and (finished or (epoch + 1) % checkpoint_every == 0):
      manager.save(
        epoch,
        {"params": params, "opt_state": opt_state, "best_params": best_params},
        {
          "epoch": epoch,
          "updates": updates_done,
          "wall_s": wall_before + time.perf_counter() - t0,
          "history": history,
          "stopper": {k: v for k, v in dataclasses.asdict(stopper).items() if k != "patience"},
          "finished": finished,
        },
      )
    if stop:
      break
  bar.close()

  test = evaluate_params(embed, best_params, rest, ds, "test", config.eval_chunk_size)
  best = next(h for h in history if h["epoch"] == stopper.best_epoch) if history else None
  record = {
    "model": config.model,
    "method": config.method,
    "optimizer": config.optimizer,
    "seed": config.seed,
    "config": _config_record(config),
    "results_version": RESULTS_VERSION,
    "data_fingerprint": dataset_fingerprint(ds),
    "valid": best["valid"] if best else {},
    "test": test,
    "best_epoch": stopper.best_epoch,
    "epochs": history[-1]["epoch"] + 1 if history else 0,
    "wall_s": wall_before + time.perf_counter() - t0,
    "updates": updates_done,
    "grad_evals": built.method.grad_evals(updates_done),
    "grad_evals_per_update": built.method.grad_evals(updates_done) / max(updates_done, 1),
    "n_train": n_train,
    "history": history,
  }
  return Fitted(record, built.graphdef, best_params, rest)


def _config_record(config: TrainConfig) -> dict[str, Any]:
  record = dataclasses.asdict(config)
  record["model_hparams"] = dict(config.model_hparams)
  record["method_hparams"] = dict(config.method_hparams)
  return record


# --------------------------------------------------------------------------------------------------
# Hyper-parameter grid, chosen on validation only
# --------------------------------------------------------------------------------------------------


def grid_search(
  ds: Dataset,
  config: TrainConfig,
  grid: Mapping[str, Sequence[Any]],
  seeds: Iterable[int],
  *,
  run: Callable[..., dict[str, Any]] = train,
  **train_kwargs: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Runs every grid point on every seed; the winner has the best MEAN VALIDATION metric.

  Test metrics play no part in the choice. Returns ``(winning_point, records_of_the_winner)``;
  every record carries its grid point under ``"grid_point"``.
  """
  seeds = list(seeds)
  names = list(grid)
  points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]
  best_point, best_score, best_records = None, -math.inf, None
  for point in points:
    records = []
    for seed in seeds:
      record = run(ds, dataclasses.replace(config_with(config, **point), seed=seed), **train_kwargs)
      record["grid_point"] = point
      records.append(record)
    score = float(np.mean([r["valid"][config.valid_metric] for r in records]))
    if score > best_score:
      best_point, best_score, best_records = point, score, records
  return best_point, best_records
