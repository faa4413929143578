r"""Robustness and flatness of trained recommenders: plain vs Mirror Gradient vs SAM (paper section 5).

    python -m benchmarks.robustness                                  # synthetic data, 2 seeds
    python -m benchmarks.robustness --data ../shared/data/scientific --seeds 3 \
        --checkpoint-dir runs/ckpt_scientific --out runs/robustness_scientific

Every model x method x seed is trained with :func:`benchmarks.training.loop.fit` (the protocol and
defaults of ``python -m benchmarks.compare``). Its checkpoints live in ``<checkpoint dir>/<run key>``
(:func:`benchmarks.training.records.checkpoint_dir`, the harness's one checkpoint-directory rule;
``--checkpoint-dir``, default ``<out>/checkpoints``), so running the command again -- or any command that
trains the same config on the same data into that directory -- loads the finished run instead of
retraining it, and resumes an interrupted one. The run key covers every training option (``--max-epochs``
included) and the content fingerprint of the data, so a run of another config or of other data is never
loaded. Before anything is trained, out-of-range options, a ``--data`` that cannot be loaded, a damaged
checkpoint, and an ``--out`` that cannot be written or holds the ``robustness.json`` of another command
line (unless ``--overwrite``; the same command line run again replaces its own) are refused with one
line naming the flag (exit status 2). The model at its best-validation
epoch is then measured on the **test** split (full ranking, :func:`benchmarks.training.metrics.evaluate` on
the scores of the model's ``embed()``, as :func:`benchmarks.training.loop.evaluate_params`):

1. **Noise** (paper table 4): Gaussian noise :math:`\mathcal{N}(0, \sigma^2)` added to the learned
   embedding tables (:mod:`benchmarks.experiments.perturb` lists the tables per model: every ``nnx.Embed`` table
   and BM3's ``FeatureTable`` params), for each ``--sigmas`` value (a standard deviation; the paper's
   variance :math:`10^{-6}` is ``sigma = 1e-3``), ``--repeats`` independent draws. Draw ``r`` of run
   seed ``s`` uses ``fold_in(fold_in(key(1), s), r)`` for every sigma and every method, so methods are
   compared on the same noise.
2. **Information adjustment** (paper table 5), for models that forward item features: a fraction
   :math:`p` (``--fractions``) of the items -- exactly ``round(p * n_items)``, drawn by
   ``np.random.default_rng([2, seed, repeat, count])`` (the same items for every method) -- get

   * ``text_swap``: the text features of another, random, item (never itself);
   * ``image_noise``: Gaussian noise on their image features with per-column std equal to the std of
     that column of the image table;

   as two separate experiments. VBPR's inputs are ``FrozenFeatures`` in the ``rest`` state; BM3's are
   its trained ``FeatureTable`` params. BM3 scores users and items with ``pred(LightGCN(U, H) + H)``
   only -- its feature tables feed the training loss, not ``embed()`` -- so adjustment cannot move its
   ranking: the command checks this (``scores_depend_on_features``, from a vector-Jacobian product of
   ``embed()``) and reports the (zero) drops with that flag; the paper leaves such models out of
   table 5 for the same reason. LightGCN has no features: ``n/a``.
3. **Flatness** (paper fig. 3, as a number): the top Hessian eigenvalue of the training loss at the
   trained parameters (:func:`mirror_optax.top_hessian_eigenvalue`, ``--hessian-iters`` power
   iterations on Hessian-vector products from a fixed random start) and the gradient norm there. The
   loss is the mean batch loss over a fixed set of training batches, identical for every run of a data
   set: the first ``K = max(1, min(--hessian-pairs, n_train) // B)`` batches of size
   ``B = min(--batch-size, n_train, --hessian-pairs)`` of the epoch that
   ``NegativeSampler.epoch(np.random.default_rng(0))`` samples; with
   ``k_loss, k_power = split(key(0))``, batch ``k`` gets the model key ``fold_in(k_loss, k)`` (BM3's
   target dropout, fixed) and the power iteration starts from a Gaussian vector drawn with ``k_power``.
   Power iteration finds the eigenvalue of largest *magnitude*; a negative value means the run did not
   end at a minimum of this loss (e.g. an early-stopped run).

The relative drop of a metric is ``(clean - mean over repeats of perturbed) / clean`` (positive: the
perturbation hurt). The printed tables give, per model x method, the mean ± sample sd over seeds of the
per-seed value (and, for the eigenvalue, of the paired per-seed ratio to plain).

``robustness.json`` (written atomically after every run)::

    {"schema_version": 1, "command": [...argv], "data": str,
     "dataset": {"name", "n_users", "n_items", "n_train", "n_valid", "n_test"},
     "settings": {"sigmas", "fractions", "repeats", "hessian_iters", "hessian_pairs", "metrics",
                  "max_epochs", "patience", "batch_size", "learning_rate", "optimizer"},
     "records": [{
        "model", "method", "seed", "status": "ok" | "diverged" | "error", "error": str (if not ok),
        "key": run key, "checkpoint": "<checkpoint dir>/<key>",
        "from_checkpoint": bool (a checkpoint existed before this command),
        "train": {"best_epoch", "epochs", "wall_s", "updates", "grad_evals", "valid": {metric: v},
                  "test": {metric: v}},
        "clean": {"recall@5": v, "recall@20": v},           # unperturbed test metrics
        "noise": {"tables": [path, ...], "table_rms": {path: root-mean-square entry}, "repeats": R,
                  "results": [
            {"sigma": s, "variance": s**2,
             "recall@5": {"mean", "std", "values": [R values], "drop": fraction | null}, "recall@20": {...}}]},
        "adjustment": {"applicable": false, "reason": str}
                    | {"applicable": true, "repeats": R,
                       "tables": {modality: {"path": str, "state": "params" | "rest",
                                             "scores_depend_on_features": bool}},
                       "results": [{"kind": "text_swap" | "image_noise", "fraction": p,
                                    "n_items_changed": round(p * n_items),  # items selected*
                                    "recall@5": {...}, "recall@20": {...}}]},
        "flatness": {"loss", "grad_norm", "top_eigenvalue", "power_iters", "n_batches", "batch_size",
                     "n_pairs", "wall_s"},
        "wall_s": seconds spent measuring (not training)}]}

(*) a swap donor whose features equal the item's own (duplicate rows exist in real data: 10 of 1,585
text rows of ``scientific`` are repeats) leaves that row unchanged.

References: Zhong, Huang et al., "Mirror Gradient", WWW 2024, section 5 (tables 4, 5; fig. 3);
Pearlmutter 1994 (Hessian-vector products); Li et al., NeurIPS 2018 (loss landscapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import models
from benchmarks.data.dataset import Dataset
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.data.sampling import NegativeSampler
from benchmarks.experiments import perturb
from benchmarks.runtime import cli
from benchmarks.runtime.files import TEMP_SUFFIX, atomic_write, json_default, writable_dir_problem
from benchmarks.training import options, records
from benchmarks.training.checkpoints import RunCheckpoints
from benchmarks.training.config import TrainConfig, TrainingDiverged
from benchmarks.training.loop import Fitted, evaluate_params, fit
from benchmarks.training.methods import METHODS, OPTIMIZERS
from benchmarks.training.options import DEFAULTS, UsageArgumentParser, number, parse_hparams, parse_names
from mirror_optax import top_hessian_eigenvalue

__all__ = [
  "METRICS",
  "OUTPUTS",
  "PROG",
  "RobustnessOptions",
  "RunOptions",
  "add_common_args",
  "adjust_features",
  "adjustment_experiment",
  "build_parser",
  "check_distinct",
  "check_runs",
  "common_fields",
  "fit_run",
  "fixed_batches",
  "flatness_keys",
  "format_tables",
  "heldout_metrics",
  "load_data",
  "noise_experiment",
  "parse_options",
  "run",
  "scores_depend_on",
  "sharpness",
  "training_configs",
  "training_loss_fn",
]

PROG = "python -m benchmarks.robustness"
OUTPUTS = ("robustness.json",)  # what the command writes to --out
METRICS = ("recall@5", "recall@20")
SCHEMA_VERSION = 1
FLATNESS_SEED = 0  # the fixed training batches, BM3 dropout keys and the power-iteration start
NOISE_SEED = 1
ADJUST_SEED = 2
DEFAULT_SIGMAS = "1e-6,1e-4,1e-3,1e-2,1e-1"
DEFAULT_FRACTIONS = "0.01,0.05,0.1"
ADJUSTMENTS = {"text_swap": "text", "image_noise": "image"}  # kind -> modality
CHECKPOINTS = "checkpoints"  # the default checkpoint root, under --out
CHECKPOINT_EVERY = 5  # evaluated epochs between checkpoints (and at the end), as compare's and the study's


# --------------------------------------------------------------------------------------------------
# Options (shared with benchmarks.experiments.landscape)
# --------------------------------------------------------------------------------------------------


#: For the checks of :mod:`benchmarks.training.options` made after parsing (they report through ``.error``).
_ERRORS = UsageArgumentParser(add_help=False)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """What robustness and landscape share: the runs to train (or load) and where their files go."""

  command: tuple[str, ...]  # ("python", "-m", "benchmarks.<command>", *argv), recorded in the output
  data: str  # the --data spec
  configs: tuple[TrainConfig, ...]  # every run, in order
  out: Path
  checkpoint_root: Path  # --checkpoint-dir, default <out>/checkpoints; a run's directory is <root>/<run key>
  hessian_iters: int
  hessian_pairs: int
  overwrite: bool
  progress: bool

  @property
  def model_names(self) -> list[str]:
    return list(dict.fromkeys(c.model for c in self.configs))


@dataclasses.dataclass(frozen=True)
class RobustnessOptions(RunOptions):
  """A checked ``python -m benchmarks.robustness`` command line (:func:`parse_options`)."""

  sigmas: tuple[float, ...]
  fractions: tuple[float, ...]
  repeats: int


def add_common_args(p: argparse.ArgumentParser) -> None:
  """Data, the training options of ``benchmarks.compare`` (same defaults, so the configs -- and hence the
  checkpoints -- of the commands match), checkpoints and the flatness options."""
  p.add_argument(
    "--data",
    default="synthetic",
    help="MMRec-layout directory, 'synthetic' or 'synthetic:<preset>' (default: synthetic)",
  )
  options.add_training_arguments(p)
  p.add_argument(
    "--checkpoint-dir",
    default=None,
    help="orbax checkpoints, <dir>/<run key> (one directory per run, named by its config and data; "
    "default: <out>/checkpoints); a finished run found there is loaded instead of retrained, an "
    "unfinished one is resumed",
  )
  p.add_argument("--hessian-iters", type=number(True, 1), default=20, help="power iterations (default 20)")
  p.add_argument(
    "--hessian-pairs",
    type=number(True, 1),
    default=8192,
    help="training pairs in the fixed loss batches of the flatness measures (default 8192)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the outputs another command line left in --out (trained runs are kept: they are "
    "found again by their run key)",
  )


def check_distinct(parser: argparse.ArgumentParser, flag: str, names: Sequence[str]) -> None:
  """``parser.error`` naming ``flag`` if a name is given twice (the two would be one run, measured twice)."""
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  if repeated:
    parser.error(f"argument {flag}: {', '.join(repeated)} given twice")


def training_configs(
  parser: argparse.ArgumentParser,
  args: argparse.Namespace,
  runs: Sequence[tuple[str, str, int]],
  hparams: Mapping[str, Mapping[str, Any]],
) -> tuple[TrainConfig, ...]:
  """The checked :class:`TrainConfig` of every ``(model, method, seed)`` of ``runs`` from the shared training
  options (the same configs as compare's); ``parser.error`` naming the flag for anything out of range."""
  try:
    parse_names(args.optimizer, list(OPTIMIZERS), "optimizer")
  except argparse.ArgumentTypeError as e:
    parser.error(f"argument --optimizer: {e}")
  for name in ("hessian_iters", "hessian_pairs"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  for flag in ("--out", "--checkpoint-dir"):
    if getattr(args, flag[2:].replace("-", "_")) == "":
      parser.error(f"argument {flag}: expected a directory, got ''")
  options.check_training_arguments(parser, args)
  options.check_model_hparams(parser, hparams)
  configs = []
  for model, method, seed in runs:
    try:
      configs.append(options.train_config(args, model, method, seed, hparams[model]))
    except ValueError as e:
      parser.error(str(e))
  options.check_configs(parser, [(c, "") for c in configs])
  return tuple(configs)


def common_fields(
  args: argparse.Namespace, prog: str, argv: Sequence[str], configs: Sequence[TrainConfig]
) -> dict[str, Any]:
  """The :class:`RunOptions` fields of a parsed command line (``prog``: ``python -m benchmarks.<command>``)."""
  out = Path(args.out)
  return dict(
    command=(*prog.split(), *argv),
    data=args.data,
    configs=tuple(configs),
    out=out,
    checkpoint_root=Path(args.checkpoint_dir) if args.checkpoint_dir is not None else out / CHECKPOINTS,
    hessian_iters=args.hessian_iters,
    hessian_pairs=args.hessian_pairs,
    overwrite=args.overwrite,
    progress=not args.no_progress,
  )


def load_data(spec: str, model_names: Sequence[str]) -> Dataset:
  """Loads ``--data`` and prints its summary (:func:`benchmarks.training.options.load_data_for`):
  :class:`cli.UsageError` naming ``--data`` if it cannot be loaded, or naming the model if the data lacks
  the features one of ``model_names`` needs."""
  return options.load_data_for(_ERRORS, spec, model_names)


def _same_command(document: Path, command: Sequence[str]) -> bool:
  """Whether the JSON output ``document`` was written by the command line ``command``."""
  try:
    return json.loads(document.read_text()).get("command") == list(command)
  except (OSError, ValueError, AttributeError):
    return False


def check_runs(opts: RunOptions, ds: Dataset, outputs: Sequence[str]) -> None:
  """Before training (shared with landscape): :class:`cli.UsageError` naming the flag unless ``--out`` is
  a writable directory holding none of ``outputs`` of another command line (``outputs[0]`` is the JSON
  document that records its command line; ``--overwrite`` lifts this), the checkpoint root is writable
  and every run's checkpoint directory ``<root>/<run key>`` that already holds checkpoints can be
  continued (readable; the key makes its config and data this run's). Then removes the temporary files of
  a killed write and, with ``--overwrite``, the old outputs."""
  out, primary = opts.out, jax.process_index() == 0
  if primary:
    problem = writable_dir_problem(out)
    if problem:
      raise cli.UsageError(f"--out {out}: {problem}")
    held = [n for n in outputs if (out / n).exists()]
    if held and not opts.overwrite and not _same_command(out / outputs[0], opts.command):
      raise cli.UsageError(
        f"--out {out} already holds {', '.join(held)} of another command line; pass --overwrite to "
        "replace them, or choose another --out (the same command line run again replaces its own)"
      )
  root = opts.checkpoint_root
  problem = writable_dir_problem(root)
  if problem:
    raise cli.UsageError(f"--checkpoint-dir {root}: {problem}")
  fingerprint = dataset_fingerprint(ds)
  for config in opts.configs:
    d = records.checkpoint_dir(root, config, fingerprint)
    if d.exists() and not d.is_dir():
      raise cli.UsageError(f"--checkpoint-dir: {d} is a file, not a checkpoint directory")
    if d.is_dir() and any(d.iterdir()):
      try:
        RunCheckpoints(d, config, data_fingerprint=fingerprint).verify()
      except ValueError as e:
        raise cli.UsageError(f"--checkpoint-dir: {e}") from None
  if primary:
    for name in outputs:
      for tmp in out.glob(f".{name}.*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
      if opts.overwrite:
        (out / name).unlink(missing_ok=True)


def fit_run(
  ds: Dataset, config: TrainConfig, *, checkpoint_root: str | Path | None = None, progress: bool = True
) -> tuple[Fitted, dict[str, Any]]:
  """Trains ``config``, or loads / resumes it from ``<checkpoint_root>/<run key>``; returns it and provenance.

  Provenance: ``{"key": run key, "checkpoint": str | None, "from_checkpoint": bool}`` (``from_checkpoint``:
  the directory held a checkpoint before this call).
  """
  fingerprint = dataset_fingerprint(ds)
  ckpt = records.checkpoint_dir(checkpoint_root, config, fingerprint) if checkpoint_root is not None else None
  existed = bool(ckpt is not None and ckpt.is_dir() and any(ckpt.iterdir()))
  fitted = fit(
    ds, config, checkpoint_dir=ckpt, checkpoint_every=CHECKPOINT_EVERY, resume=ckpt is not None, progress=progress
  )
  provenance = {"key": records.run_key(config, fingerprint), "checkpoint": str(ckpt) if ckpt else None}
  return fitted, {**provenance, "from_checkpoint": existed}


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _embed_fn(graphdef: nnx.GraphDef) -> Callable:
  return jax.jit(lambda params, rest: nnx.merge(graphdef, params, rest).embed())


def heldout_metrics(
  graphdef: nnx.GraphDef,
  params: Any,
  rest: Any,
  ds: Dataset,
  chunk_size: Optional[int] = None,
  metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
  """Test ``metrics`` (default recall@5 / recall@20) of the model ``(graphdef, params, rest)``, as the trainer
  computes them."""
  values = evaluate_params(_embed_fn(graphdef), params, rest, ds, "test", chunk_size)
  return {m: values[m] for m in metrics}


def _summary(values: Sequence[float], clean: float) -> dict[str, Any]:
  # identical values (a perturbation that cannot move the ranking) keep their exact mean
  mean = float(values[0]) if len(set(values)) == 1 else float(np.mean(values))
  return {
    "mean": mean,
    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    "values": [float(v) for v in values],
    "drop": (clean - mean) / clean if clean > 0 else None,
  }


@functools.lru_cache(maxsize=None)
def _noise_fn(paths: tuple[perturb.Path, ...]) -> Callable:
  return jax.jit(lambda params, sigma, key: perturb.add_gaussian_noise(params, paths, sigma, key))


def noise_experiment(
  graphdef: nnx.GraphDef,
  params: Any,
  rest: Any,
  ds: Dataset,
  *,
  sigmas: Sequence[float],
  repeats: int,
  seed: int,
  clean: Mapping[str, float],
  chunk_size: Optional[int] = None,
  metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
  """Test metrics under ``N(0, sigma^2)`` noise on the embedding tables (see the module docstring)."""
  paths = tuple(perturb.noise_table_paths(nnx.merge(graphdef, params, rest)))
  add_noise = _noise_fn(paths)
  base = jax.random.fold_in(jax.random.key(NOISE_SEED), seed)
  results = []
  for sigma in sigmas:
    if not sigma >= 0:
      raise ValueError(f"noise sigma must be >= 0, got {sigma!r}")
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for r in range(repeats):
      noisy = add_noise(params, jnp.float32(sigma), jax.random.fold_in(base, r))
      for m, v in heldout_metrics(graphdef, noisy, rest, ds, chunk_size, metrics).items():
        values[m].append(v)
    results.append(
      {"sigma": float(sigma), "variance": float(sigma) ** 2, **{m: _summary(values[m], clean[m]) for m in metrics}}
    )
  rms = {perturb.path_name(p): float(jnp.sqrt(jnp.mean(jnp.square(perturb.get_leaf(params, p))))) for p in paths}
  return {"tables": [perturb.path_name(p) for p in paths], "table_rms": rms, "repeats": repeats, "results": results}


def _with_table(params: Any, rest: Any, where: str, path: perturb.Path, table: Any) -> tuple[Any, Any]:
  new = {path: jnp.asarray(table)}
  if where == "params":
    return perturb.replace_leaves(params, new), rest
  return params, perturb.replace_leaves(rest, new)


def scores_depend_on(graphdef: nnx.GraphDef, params: Any, rest: Any, where: str, path: perturb.Path) -> bool:
  """Whether ``embed()`` reads the table at ``path``: a VJP of ``embed()`` w.r.t. it is non-zero."""
  table = perturb.get_leaf(params if where == "params" else rest, path)
  embed = _embed_fn(graphdef)

  def out(t):
    return embed(*_with_table(params, rest, where, path, t))

  outputs, vjp = jax.vjp(out, table)
  cotangent = jax.tree.map(lambda x: jnp.ones_like(x) / x.size, outputs)
  (grad,) = vjp(cotangent)
  return bool(jnp.any(grad != 0))


def adjust_features(
  params: Any,
  rest: Any,
  table: tuple[str, perturb.Path],
  kind: str,
  items: np.ndarray,
  donors: np.ndarray,
  rng: np.random.Generator,
) -> tuple[Any, Any]:
  """``(params, rest)`` with the feature table ``table = (where, path)`` adjusted on rows ``items``.

  ``kind``: ``"text_swap"`` (rows get the rows ``donors`` of the original table) or ``"image_noise"``
  (rows get Gaussian noise of per-column std = the column's std, drawn from ``rng``). Every other
  leaf and every other row is returned bit-identical.
  """
  where, path = table
  original = np.asarray(perturb.get_leaf(params if where == "params" else rest, path))
  if kind == "text_swap":
    new_table = perturb.swap_rows(original, items, donors)
  elif kind == "image_noise":
    new_table = perturb.noise_rows(original, items, rng)
  else:
    raise ValueError(f"unknown adjustment kind {kind!r}; valid: {', '.join(ADJUSTMENTS)}")
  return _with_table(params, rest, where, path, new_table)


def adjustment_experiment(
  graphdef: nnx.GraphDef,
  params: Any,
  rest: Any,
  ds: Dataset,
  *,
  fractions: Sequence[float],
  repeats: int,
  seed: int,
  clean: Mapping[str, float],
  chunk_size: Optional[int] = None,
  metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
  """Test metrics after information adjustment of a fraction of the items (module docstring)."""
  model = nnx.merge(graphdef, params, rest)
  tables = perturb.feature_table_paths(model)
  kinds = {kind: modality for kind, modality in ADJUSTMENTS.items() if modality in tables}
  if not kinds:
    return {"applicable": False, "reason": f"{type(model).__name__} forwards no item features"}
  n_items = ds.n_items
  results = []
  for fraction in fractions:
    count = round(fraction * n_items)
    values = {kind: {m: [] for m in metrics} for kind in kinds}
    for r in range(repeats):
      rng = np.random.default_rng([ADJUST_SEED, seed, r, count])
      items = perturb.select_items(n_items, fraction, rng)
      donors = perturb.pick_donors(items, n_items, rng)
      noise_rng = np.random.default_rng([ADJUST_SEED, seed, r, count, 1])
      for kind, modality in kinds.items():
        p2, r2 = adjust_features(params, rest, tables[modality], kind, items, donors, noise_rng)
        for m, v in heldout_metrics(graphdef, p2, r2, ds, chunk_size, metrics).items():
          values[kind][m].append(v)
    for kind in kinds:
      results.append(
        {
          "kind": kind,
          "fraction": float(fraction),
          "n_items_changed": int(count),
          **{m: _summary(values[kind][m], clean[m]) for m in metrics},
        }
      )
  return {
    "applicable": True,
    "repeats": repeats,
    "tables": {
      modality: {
        "path": perturb.path_name(path),
        "state": where,
        "scores_depend_on_features": scores_depend_on(graphdef, params, rest, where, path),
      }
      for modality, (where, path) in tables.items()
      if modality in kinds.values()
    },
    "results": results,
  }


def fixed_batches(ds: Dataset, *, batch_size: int, max_pairs: int, seed: int = FLATNESS_SEED) -> dict[str, jax.Array]:
  """``K`` training batches ``{"user","pos","neg"}: (K, B)`` from one sampled epoch with a fixed seed.

  ``B = min(batch_size, n_train, max_pairs)``, ``K = max(1, min(max_pairs, n_train) // B)``: the
  first ``K * B`` pairs of ``NegativeSampler(ds).epoch(np.random.default_rng(seed))``.
  """
  if batch_size < 1 or max_pairs < 1:
    raise ValueError(f"batch_size and max_pairs must be >= 1, got {batch_size} and {max_pairs}")
  sample = NegativeSampler(ds).epoch(np.random.default_rng(seed))
  n = len(sample["user"])
  size = min(batch_size, n, max_pairs)
  k = max(1, min(max_pairs, n) // size)
  return {name: jnp.asarray(v[: k * size].reshape(k, size)) for name, v in sample.items()}


def training_loss_fn(
  graphdef: nnx.GraphDef, rest: Any, batches: Mapping[str, jax.Array], key: jax.Array
) -> Callable[[Any], jax.Array]:
  """``params -> mean_k model.loss(batch_k, fold_in(key, k))`` over the fixed ``batches`` (K, B)."""
  n = jax.tree.leaves(batches)[0].shape[0]

  def loss_fn(params):
    def one(xs):
      index, batch = xs
      return nnx.merge(graphdef, params, rest).loss(batch, jax.random.fold_in(key, index))

    return jnp.mean(jax.lax.map(one, (jnp.arange(n), dict(batches))))

  return loss_fn


def flatness_keys() -> tuple[jax.Array, jax.Array]:
  """``(loss key, power-iteration key)``: the fixed keys of the flatness measures."""
  key_loss, key_power = jax.random.split(jax.random.key(FLATNESS_SEED))
  return key_loss, key_power


@functools.lru_cache(maxsize=None)
def _sharpness_fn(graphdef: nnx.GraphDef, num_iters: int) -> Callable:
  key_loss, key_power = flatness_keys()

  @jax.jit
  def run(params, rest, batches):
    loss_fn = training_loss_fn(graphdef, rest, batches, key_loss)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    eig = top_hessian_eigenvalue(loss_fn, params, key=key_power, num_iters=num_iters)
    return loss, optax.tree.norm(grads), eig.eigenvalue, eig.num_iters

  return run


def sharpness(
  graphdef: nnx.GraphDef, params: Any, rest: Any, batches: Mapping[str, jax.Array], *, num_iters: int = 20
) -> dict[str, Any]:
  """Loss, gradient norm and top Hessian eigenvalue of the fixed-batch training loss at ``params``."""
  if num_iters < 1:
    raise ValueError(f"hessian iterations must be >= 1, got {num_iters}")
  t0 = time.perf_counter()
  loss, grad_norm, eig, iters = _sharpness_fn(graphdef, int(num_iters))(params, rest, dict(batches))
  k, b = jax.tree.leaves(batches)[0].shape
  return {
    "loss": float(loss),
    "grad_norm": float(grad_norm),
    "top_eigenvalue": float(eig),
    "power_iters": int(iters),
    "n_batches": int(k),
    "batch_size": int(b),
    "n_pairs": int(k * b),
    "wall_s": time.perf_counter() - t0,
  }


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _cell(values: Sequence[float], fmt: str = ".4f", scale: float = 1.0, sign: bool = False) -> str:
  values = [v * scale for v in values if v is not None and math.isfinite(v)]
  spec = ("+" if sign else "") + fmt
  if not values:
    return "-"
  mean = _fmt(values[0] if len(set(values)) == 1 else float(np.mean(values)), spec)
  if len(values) == 1:
    return mean
  return f"{mean}±{_fmt(float(np.std(values, ddof=1)), fmt)}"


def _fmt(x: float, spec: str) -> str:
  """``format(x, spec)`` without a minus sign on a value that rounds to zero."""
  text = format(x, spec)
  return text.replace("-", "+" if "+" in spec else "", 1) if text.lstrip("+-").strip("0.") == "" else text


def _groups(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
  out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in records:
    out.setdefault((r["model"], r["method"]), []).append(r)
  return out


def _row(model: str, method: str, cells: Sequence[str], width: int) -> str:
  return f"{model:9s} {method:6s} " + " ".join(f"{c:>{width}s}" for c in cells)


def _failed_note(rs: Sequence[Mapping[str, Any]]) -> str:
  bad = [r for r in rs if r.get("status") != "ok"]
  return f"  ({len(bad)} run(s) {bad[0].get('status')}: {bad[0].get('error', '')[:60]})" if bad else ""


def format_tables(records: Sequence[Mapping[str, Any]]) -> str:
  """The noise, adjustment and flatness tables, as printed by the command."""
  groups = _groups(records)
  ok_all = [r for r in records if r.get("status") == "ok"]
  lines: list[str] = []
  if not ok_all:
    return "no successful run"
  sigmas = [x["sigma"] for x in ok_all[0]["noise"]["results"]]
  repeats = ok_all[0]["noise"]["repeats"]
  w = 15
  for metric in METRICS:
    lines += [
      f"Noise N(0, σ²) on the embedding tables: relative drop of test {metric} (%; mean±sd over "
      f"seeds, each seed the mean of {repeats} draws; σ=1e-3 is the paper's variance 1e-6)"
    ]
    head = _row("model", "method", [f"clean {metric}"] + [f"σ={s:g}" for s in sigmas], w)
    lines += [head, "-" * len(head)]
    for (model, method), rs in groups.items():
      ok = [r for r in rs if r.get("status") == "ok"]
      cells = [_cell([r["clean"][metric] for r in ok])]
      for i in range(len(sigmas)):
        cells.append(_cell([r["noise"]["results"][i][metric]["drop"] for r in ok], ".1f", 100.0, True))
      lines.append(_row(model, method, cells, w) + _failed_note(rs))
    lines.append("")

  adjusted = [r for r in ok_all if r["adjustment"]["applicable"]]
  unread = set()
  if adjusted:
    cols = [(x["kind"], x["fraction"]) for x in adjusted[0]["adjustment"]["results"]]
    cols.sort(key=lambda c: (list(ADJUSTMENTS).index(c[0]), c[1]))
    for metric in METRICS:
      lines += [
        f"Information adjustment: relative drop of test {metric} (%; mean±sd over seeds, each seed "
        f"the mean of {adjusted[0]['adjustment']['repeats']} draws)"
      ]
      head = _row("model", "method", [f"{k.split('_')[0]} {k.split('_')[1]} {100 * p:g}%" for k, p in cols], w)
      lines += [head, "-" * len(head)]
      for (model, method), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        if ok and not ok[0]["adjustment"]["applicable"]:
          lines.append(_row(model, method, ["n/a"] * len(cols), w) + "  (no item features)")
          continue
        cells = []
        for kind, p in cols:
          drops = [
            x[metric]["drop"]
            for r in ok
            for x in r["adjustment"]["results"]
            if x["kind"] == kind and x["fraction"] == p
          ]
          cells.append(_cell(drops, ".1f", 100.0, True))
        note = ""
        if ok and not any(t["scores_depend_on_features"] for t in ok[0]["adjustment"]["tables"].values()):
          note = "  *"
          unread.add(model)
        lines.append(_row(model, method, cells, w) + note + _failed_note(rs))
      lines.append("")
    if unread:
      lines += [
        f"* {', '.join(sorted(unread))}: scores do not read the feature tables at inference "
        "(embed() uses ID/graph embeddings only), so adjustment cannot change the ranking.",
        "",
      ]

  f = ok_all[0]["flatness"]
  lines += [
    f"Flatness of the training loss at the trained parameters ({f['n_batches']} fixed batch(es) of "
    f"{f['batch_size']} pairs; λ_max: the largest-magnitude Hessian eigenvalue by {f['power_iters']} power "
    "iterations; "
    "mean±sd over seeds; λ/λ_plain from paired per-seed ratios)"
  ]
  head = _row("model", "method", ["train loss", "‖∇L‖", "λ_max", "λ/λ_plain"], w)
  lines += [head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = {r["seed"]: r for r in rs if r.get("status") == "ok"}
    base = {r["seed"]: r for r in groups.get((model, "plain"), []) if r.get("status") == "ok"}
    ratios = [
      ok[s]["flatness"]["top_eigenvalue"] / base[s]["flatness"]["top_eigenvalue"]
      for s in ok
      if s in base and base[s]["flatness"]["top_eigenvalue"] != 0
    ]
    cells = [
      _cell([r["flatness"]["loss"] for r in ok.values()]),
      _cell([r["flatness"]["grad_norm"] for r in ok.values()], ".3g"),
      _cell([r["flatness"]["top_eigenvalue"] for r in ok.values()], ".4g"),
      "-" if method == "plain" else _cell(ratios, ".3f"),
    ]
    lines.append(_row(model, method, cells, w) + _failed_note(rs))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def _floats(text: str, what: str, low: float, high: float = math.inf) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{what}: expected comma-separated numbers, got {text!r}") from None
  bad = [v for v in values if not (math.isfinite(v) and low <= v <= high)]
  if not values or bad:
    raise argparse.ArgumentTypeError(f"{what}: every value must be finite and lie in [{low:g}, {high:g}], got {text!r}")
  return values


def build_parser() -> UsageArgumentParser:
  """The command line (errors raise :class:`cli.UsageError`: one line naming the flag, exit status 2)."""
  p = UsageArgumentParser(
    prog="python -m benchmarks.robustness",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--models", default="vbpr,lightgcn,bm3", help="comma list of " + ",".join(models.MODELS))
  p.add_argument("--methods", default="plain,mg,sam", help="comma list of " + ",".join(METHODS))
  p.add_argument("--seeds", type=number(True, 1), default=DEFAULTS["seeds"], help="seeds 0..N-1 (default %(default)s)")
  p.add_argument("--repeats", type=number(True, 1), default=10, help="independent draws per perturbation (default 10)")
  p.add_argument(
    "--sigmas",
    default=DEFAULT_SIGMAS,
    help="noise standard deviations (default %(default)s; the paper: 1e-3, variance 1e-6)",
  )
  p.add_argument(
    "--fractions",
    default=DEFAULT_FRACTIONS,
    help="fractions of items whose features are adjusted (default %(default)s)",
  )
  p.add_argument(
    "--out",
    default="results",
    help="output directory (default: results); one that holds the robustness.json of another command "
    "line is refused unless --overwrite is given",
  )
  add_common_args(p)
  return p


def parse_options(argv: Sequence[str] | None = None) -> RobustnessOptions:
  """The checked options of the command line ``argv`` (default ``sys.argv[1:]``); :class:`cli.UsageError`
  naming the flag for anything that would train or measure nonsense. Reads no data and writes nothing."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    model_names = parse_names(args.models, list(models.MODELS), "model")
    method_names = parse_names(args.methods, list(METHODS), "method")
    hparams = parse_hparams(args.hparam, model_names)
    sigmas = _floats(args.sigmas, "--sigmas", 0.0)
    fractions = _floats(args.fractions, "--fractions", 0.0, 1.0)
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  check_distinct(parser, "--models", model_names)
  check_distinct(parser, "--methods", method_names)
  for name in ("seeds", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  runs = [(model, method, seed) for model in model_names for method in method_names for seed in range(args.seeds)]
  configs = training_configs(parser, args, runs, hparams)
  return RobustnessOptions(
    **common_fields(args, PROG, argv, configs), sigmas=tuple(sigmas), fractions=tuple(fractions), repeats=args.repeats
  )


def run(opts: RobustnessOptions) -> list[dict[str, Any]]:
  """The command: loads the data, checks the outputs and checkpoints, then trains (or loads) and measures
  every run, rewriting ``<out>/robustness.json`` after each; returns the records."""
  ds = load_data(opts.data, opts.model_names)
  check_runs(opts, ds, OUTPUTS)
  first = opts.configs[0]
  batches = fixed_batches(ds, batch_size=first.batch_size, max_pairs=opts.hessian_pairs)
  document = {
    "schema_version": SCHEMA_VERSION,
    "command": list(opts.command),
    "data": opts.data,
    "dataset": {
      "name": ds.name,
      "n_users": ds.n_users,
      "n_items": ds.n_items,
      "n_train": len(ds.train),
      "n_valid": len(ds.valid),
      "n_test": len(ds.test),
    },
    "settings": {
      "sigmas": list(opts.sigmas),
      "fractions": list(opts.fractions),
      "repeats": opts.repeats,
      "hessian_iters": opts.hessian_iters,
      "hessian_pairs": opts.hessian_pairs,
      "metrics": list(METRICS),
      "max_epochs": first.max_epochs,
      "patience": first.patience,
      "batch_size": first.batch_size,
      "learning_rate": first.learning_rate,
      "optimizer": first.optimizer,
    },
    "records": [],
  }
  path = opts.out / OUTPUTS[0]
  records: list[dict[str, Any]] = document["records"]
  for config in opts.configs:
    records.append(_measure_run(ds, config, opts, batches))
    if jax.process_index() == 0:
      atomic_write(path, json.dumps(document, indent=1, default=json_default))
  print(f"wrote {path}")
  return records


def _measure_run(
  ds: Dataset, config: TrainConfig, opts: RobustnessOptions, batches: Mapping[str, jax.Array]
) -> dict[str, Any]:
  head = {"model": config.model, "method": config.method, "seed": config.seed}
  try:
    fitted, provenance = fit_run(ds, config, checkpoint_root=opts.checkpoint_root, progress=opts.progress)
  except TrainingDiverged as e:
    print(f"  ! {e}", file=sys.stderr)
    return {**head, "status": "diverged", "error": str(e)}
  except ValueError as e:  # e.g. a checkpoint that could not be read
    print(f"  ! {config.model}/{config.method} seed {config.seed}: {e}", file=sys.stderr)
    return {**head, "status": "error", "error": str(e)}
  t0 = time.perf_counter()
  r = fitted.record
  g, params, rest = fitted.graphdef, fitted.params, fitted.rest
  clean = heldout_metrics(g, params, rest, ds)
  kw = dict(repeats=opts.repeats, seed=config.seed, clean=clean)
  record = {
    **head,
    "status": "ok",
    **provenance,
    "train": {k: r[k] for k in ("best_epoch", "epochs", "wall_s", "updates", "grad_evals", "valid", "test")},
    "clean": clean,
    "noise": noise_experiment(g, params, rest, ds, sigmas=opts.sigmas, **kw),
    "adjustment": adjustment_experiment(g, params, rest, ds, fractions=opts.fractions, **kw),
    "flatness": sharpness(g, params, rest, batches, num_iters=opts.hessian_iters),
  }
  record["wall_s"] = time.perf_counter() - t0
  paper = next((x for x in record["noise"]["results"] if x["sigma"] == 1e-3), record["noise"]["results"][-1])
  print(
    f"  {config.model}/{config.method} seed {config.seed}: test recall@5 {clean['recall@5']:.4f}, "
    f"noise σ={paper['sigma']:g} drop {100 * (paper['recall@5']['drop'] or 0):+.1f}%, "
    f"λ_max {record['flatness']['top_eigenvalue']:.4g}, "
    f"{'loaded' if provenance['from_checkpoint'] else 'trained'} "
    f"({r['epochs']} epochs), measured in {record['wall_s']:.1f}s",
    flush=True,
  )
  return record
