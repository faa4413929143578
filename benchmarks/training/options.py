"""The options the training commands share (compare, robustness, landscape), parsed and checked once.

Every check runs before anything is trained or loaded, and a bad value is an argparse error that names the
flag (``--hparam``, ``--grid``, ``--lr`` ...), the item and the valid choices.

:func:`train_options` turns a parsed command line into one frozen :class:`TrainOptions` -- names, numbers,
``--hparam``, ``--grid``, ``alpha2 < alpha1``, the models against the data -- and raises
:class:`benchmarks.runtime.cli.UsageError` (one line naming the flag; status 2 through ``cli``) for anything a
user can fix. :class:`UsageArgumentParser` makes argparse's own errors (a bad ``type``, an unknown flag) the same
one-line ``UsageError``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Optional

import jax
import numpy as np
from flax import nnx

import models
from benchmarks.data import dataset as data_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.parallel import distributed
from benchmarks.runtime.cli import UsageError
from benchmarks.training.config import CONFIG_FIELDS, TrainConfig, config_with
from benchmarks.training.methods import METHOD_DEFAULTS, METHODS, OPTIMIZERS, make_method

# The main command's defaults: ~2 minutes on a 2-core CPU for 3 models x 3 methods x 2 seeds on the
# synthetic set (runs early-stop long before the epoch cap; MMRec's cap is 1000, patience 20).
DEFAULTS = {"max_epochs": 300, "patience": 20, "seeds": 2}


def parse_names(text: str, valid: Sequence[str], what: str) -> list[str]:
  names = [n.strip().lower() for n in text.split(",") if n.strip()]
  bad = [n for n in names if n not in valid]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; valid names: {', '.join(valid)}")
  return names


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text


# --------------------------------------------------------------------------------------------------
# Checks of the options, all made before anything is trained
# --------------------------------------------------------------------------------------------------

#: The valid range of every numeric training setting, by its ``TrainConfig`` field or method
#: hyper-parameter name: ``(option, integer, lower bound, bound allowed)``. Every value must be finite.
NUMBER_RULES: dict[str, tuple[str, bool, float, bool]] = {
  "learning_rate": ("--lr", False, 0, False),
  "batch_size": ("--batch-size", True, 1, True),
  "max_epochs": ("--max-epochs", True, 1, True),
  "patience": ("--patience", True, 0, True),
  "eval_every": ("--eval-every", True, 1, True),
  "alpha1": ("--alpha1", False, 0, False),
  "alpha2": ("--alpha2", False, 0, False),
  "beta": ("--beta", True, 1, True),
  "rho": ("--rho", False, 0, False),
  "gnp_penalty": ("--gnp-penalty", False, 0, True),
}


def number_problem(value: Any, integer: bool, low: float, inclusive: bool) -> Optional[str]:
  """Why ``value`` is not a finite number (an integer if ``integer``) above ``low``; ``None`` if it is."""
  want = f"{'an integer' if integer else 'a finite number'} {'>=' if inclusive else '>'} {low:g}"
  is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
  if (
    isinstance(value, bool)
    or not is_number
    or (isinstance(value, float) and not math.isfinite(value))
    or value < low
    or (value == low and not inclusive)
  ):
    return f"expected {want}, got {value!r}"
  return None


def number(integer: bool, low: float, inclusive: bool = True) -> Callable[[str], Any]:
  """An argparse ``type``: a finite number (an ``int`` if ``integer``) ``>= low`` (``> low`` unless
  ``inclusive``); anything else is an argparse error naming the option."""

  def parse(text: str) -> Any:
    try:
      value: Any = int(text) if integer else float(text)
    except ValueError:
      value = text
    problem = number_problem(value, integer, low, inclusive)
    if problem:
      raise argparse.ArgumentTypeError(problem)
    return value

  parse.__name__ = "integer" if integer else "number"
  return parse


def rule_type(name: str) -> Callable[[str], Any]:
  _, integer, low, inclusive = NUMBER_RULES[name]
  return number(integer, low, inclusive)


def method_hparams(args: argparse.Namespace) -> dict[str, Any]:
  """The method hyper-parameters of the options of :func:`add_training_arguments`."""
  return {
    "alpha1": args.alpha1,
    "alpha2": args.alpha2,
    "beta": args.beta,
    "rho": args.rho,
    "gnp_penalty": args.gnp_penalty,
  }


def alpha_problem(hparams: Mapping[str, Any]) -> Optional[str]:
  a1, a2 = hparams["alpha1"], hparams["alpha2"]
  if not a2 < a1:
    return f"alpha2 must be smaller than alpha1 (Mirror Gradient needs alpha1 > alpha2 > 0), got alpha1={a1!r}, alpha2={a2!r}"
  return None


def check_training_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """``parser.error`` unless every option of :func:`add_training_arguments` is in range.

  The argparse types check each number as it is parsed; this checks them again (for namespaces built by
  hand) and the ones that depend on each other: ``0 < --alpha2 < --alpha1``, ``--shard-tables`` needs
  ``--devices``.
  """
  for option, integer, low, inclusive in NUMBER_RULES.values():
    value = getattr(args, option[2:].replace("-", "_"))
    problem = number_problem(value, integer, low, inclusive)
    if problem:
      parser.error(f"argument {option}: {problem}")
  if not args.alpha2 < args.alpha1:
    parser.error(
      f"--alpha2 must be smaller than --alpha1 (Mirror Gradient needs alpha1 > alpha2 > 0), "
      f"got --alpha1 {args.alpha1:g} --alpha2 {args.alpha2:g}"
    )
  if args.devices is not None:
    problem = number_problem(args.devices, True, 1, True)
    if problem:
      parser.error(f"argument --devices: {problem}")
  if args.shard_tables and args.devices is None:
    parser.error("--shard-tables needs --devices N (the devices to shard the tables over)")


def model_hparam_defaults(name: str) -> dict[str, Any]:
  """The hyper-parameters model ``name`` takes, with their defaults: its constructor's keyword-only
  arguments besides ``rngs``."""
  signature = inspect.signature(models.get_model(name).__init__)
  return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name != "rngs"}


def _type_problem(value: Any, default: Any) -> Optional[str]:
  """Why ``value`` cannot stand for a hyper-parameter whose default is ``default`` (its type decides)."""
  if isinstance(default, bool):
    return None if isinstance(value, bool) else f"expected True or False, got {value!r}"
  if isinstance(default, int):
    return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
  if isinstance(default, float):
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value):
      return None
    return f"expected a finite number, got {value!r}"
  if isinstance(default, str):
    return None if isinstance(value, str) else f"expected a name (like {default!r}), got {value!r}"
  return None


def model_hparam_problem(model: str, name: str, value: Any) -> Optional[str]:
  """Why ``model`` does not take ``name=value`` -- an unknown name or a value of the wrong type; ``None``
  if it does. Pure Python (no JAX); :func:`model_build_problem` checks the value's range."""
  defaults = model_hparam_defaults(model)
  if name not in defaults:
    hint = f"; {name} is a training option: use {NUMBER_RULES[name][0]}" if name in NUMBER_RULES else ""
    return f"{model} has no hyper-parameter {name!r} (it takes: {', '.join(defaults) or 'none'}){hint}"
  problem = _type_problem(value, defaults[name])
  return f"{model}.{name}: {problem}" if problem else None


def model_build_problem(model: str, hparams: Mapping[str, Any]) -> Optional[str]:
  """The error ``model`` raises when built with ``hparams`` on a 2-user, 2-item stand-in data set with
  the features it needs, or ``None``. Shapes only (nothing is allocated), unless the constructor needs
  concrete arrays; then it is built for real, which costs next to nothing at that size."""
  cls = models.get_model(model)
  ids = np.arange(2, dtype=np.int32)
  stand_in = models.Interactions(2, 2, ids, ids, {m: np.ones((2, 2), np.float32) for m in cls.requires})

  def build():
    return cls(stand_in, rngs=nnx.Rngs(0), **hparams)

  try:
    try:
      nnx.eval_shape(build)
    except jax.errors.JAXTypeError:  # the constructor computes on concrete arrays
      build()
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def parse_hparams(items: Sequence[str], model_names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """``["vbpr.reg_weight=2.0", "n_layers=1"]`` -> per-model dicts (no prefix: every model).

  ``argparse.ArgumentTypeError`` naming the item for an empty name or value, a model not in
  ``model_names``, a name the model does not take, a value of the wrong type (e.g. ``n_layers=1.5``),
  or a name set twice for a model.
  """
  out: dict[str, dict[str, Any]] = {m: {} for m in model_names}
  origin: dict[tuple[str, str], str] = {}
  for item in items:
    key, sep, text = item.partition("=")
    model, dot, name = key.strip().rpartition(".")
    name, text = name.strip(), text.strip()
    if not sep or not name or not text or (dot and not model.strip()):
      raise argparse.ArgumentTypeError(
        f"--hparam {item!r}: expected [model.]name=value with a non-empty name and value"
      )
    value = parse_value(text)
    targets = [model.strip().lower()] if dot else list(model_names)
    for m in targets:
      if m not in out:
        raise argparse.ArgumentTypeError(f"--hparam {item!r}: model {m!r} is not in --models")
      problem = model_hparam_problem(m, name, value)
      if problem:
        raise argparse.ArgumentTypeError(f"--hparam {item!r}: {problem}")
      if name in out[m]:
        raise argparse.ArgumentTypeError(
          f"--hparam {item!r}: {m}.{name} is already set by --hparam {origin[m, name]!r}; give it once"
        )
      out[m][name] = value
      origin[m, name] = item
  return out


def _grid_key_problem(name: str, model_names: Sequence[str]) -> Optional[str]:
  if name in CONFIG_FIELDS or name in METHOD_DEFAULTS:
    return None
  takers = [m for m in model_names if name in model_hparam_defaults(m)]
  if takers and len(takers) == len(model_names):
    return None
  if takers:
    others = [m for m in model_names if m not in takers]
    return (
      f"{name} is a hyper-parameter of {', '.join(takers)} but not of {', '.join(others)}; a grid "
      "applies to every model in --models: run those models separately"
    )
  common = [n for n in model_hparam_defaults(model_names[0]) if all(n in model_hparam_defaults(m) for m in model_names)]
  searchable = [*sorted(CONFIG_FIELDS), *METHOD_DEFAULTS, *common]
  hint = f" ({name} cannot be searched: set it with {NUMBER_RULES[name][0]})" if name in NUMBER_RULES else ""
  if name == "lr":
    hint = " (the learning rate is learning_rate in a grid)"
  return f"unknown hyper-parameter {name!r}{hint}; a grid can search {', '.join(searchable)}"


def _grid_value_problem(name: str, value: Any, model_names: Sequence[str]) -> Optional[str]:
  if name in NUMBER_RULES:  # learning_rate, batch_size or a method hyper-parameter
    _, integer, low, inclusive = NUMBER_RULES[name]
    problem = number_problem(value, integer, low, inclusive)
    return f"{name}: {problem}" if problem else None
  for m in model_names:
    problem = model_hparam_problem(m, name, value)
    if problem:
      return problem
  return None


def parse_grid(text: str | None, model_names: Sequence[str] = ()) -> dict[str, list[Any]]:
  """``"reg_weight=1e-4,1e-3;alpha2=0.1,0.2"`` -> ``{"reg_weight": [1e-4, 1e-3], ...}``.

  ``argparse.ArgumentTypeError`` naming the part for an empty name or value, a name given twice, a value
  given twice, and -- with ``model_names`` -- a name that is neither ``learning_rate``, ``batch_size``, a
  method hyper-parameter nor a hyper-parameter of every model, or a value of the wrong type or range.
  """
  grid: dict[str, list[Any]] = {}
  if text is None:
    return grid
  for part in text.split(";"):
    if not part.strip():
      continue
    name, sep, values = part.partition("=")
    name = name.strip()
    texts = [v.strip() for v in values.split(",")]
    if not sep or not name or not all(texts):
      raise argparse.ArgumentTypeError(
        f"--grid part {part.strip()!r}: expected name=v1,v2,... with a non-empty name and values"
      )
    if name in grid:
      raise argparse.ArgumentTypeError(
        f"--grid: {name} is given twice; give all its values in one part, {name}=v1,v2,..."
      )
    problem = _grid_key_problem(name, model_names) if model_names else None
    if problem:
      raise argparse.ArgumentTypeError(f"--grid part {part.strip()!r}: {problem}")
    grid[name] = []
    for t in texts:
      value = parse_value(t)
      problem = _grid_value_problem(name, value, model_names) if model_names or name in NUMBER_RULES else None
      if problem:
        raise argparse.ArgumentTypeError(f"--grid {name}={t}: {problem}")
      if any(type(value) is type(v) and value == v for v in grid[name]):
        raise argparse.ArgumentTypeError(f"--grid {name}: value {t} is given twice")
      grid[name].append(value)
  if not grid:
    raise argparse.ArgumentTypeError(f"--grid {text!r} names no hyper-parameter; expected name=v1,v2;name=...")
  return grid


def add_training_arguments(p: argparse.ArgumentParser) -> None:
  """The training options shared by the commands that train (compare, robustness, landscape), with the
  same defaults, so the configs -- and hence the checkpoints -- of all of them match."""
  p.add_argument("--optimizer", default="adam", help="base optimizer: " + ",".join(OPTIMIZERS))
  p.add_argument("--lr", type=rule_type("learning_rate"), default=1e-3, help="learning rate, > 0 (default 1e-3)")
  p.add_argument("--batch-size", type=rule_type("batch_size"), default=2048, help=">= 1 (default 2048)")
  p.add_argument(
    "--max-epochs", type=rule_type("max_epochs"), default=DEFAULTS["max_epochs"], help=">= 1 (default %(default)s)"
  )
  p.add_argument(
    "--patience",
    type=rule_type("patience"),
    default=DEFAULTS["patience"],
    help="evaluations without improvement before stopping, >= 0 (MMRec: 20)",
  )
  p.add_argument("--eval-every", type=rule_type("eval_every"), default=1, help="epochs between evaluations, >= 1")
  p.add_argument("--valid-metric", default="recall@20")
  p.add_argument("--alpha1", type=rule_type("alpha1"), default=1.0, help="MG alpha1 (> alpha2)")
  p.add_argument("--alpha2", type=rule_type("alpha2"), default=0.2, help="MG alpha2 (> 0)")
  p.add_argument("--beta", type=rule_type("beta"), default=3, help="MG interval, an integer >= 1")
  p.add_argument("--rho", type=rule_type("rho"), default=0.05, help="SAM radius, > 0")
  p.add_argument("--gnp-penalty", type=rule_type("gnp_penalty"), default=0.01, help="GNP weight of ||grad L||^2, >= 0")
  p.add_argument(
    "--hparam",
    action="append",
    default=[],
    metavar="[MODEL.]NAME=VALUE",
    help="model hyper-parameter, e.g. vbpr.reg_weight=2.0 or n_layers=2 (repeatable; once per "
    "name and model; the name must be one the model's constructor takes)",
  )
  p.add_argument(
    "--devices",
    type=number(True, 1),
    default=None,
    help="train data-parallel over N devices (JAX sharding; batches split, state replicated)",
  )
  p.add_argument(
    "--shard-tables",
    action="store_true",
    help="with --devices: row-shard the embedding tables instead of replicating them",
  )


def check_models_have_features(parser: argparse.ArgumentParser, ds, names: Sequence[str], data_spec: str) -> None:
  """``parser.error`` naming the model and the modalities it needs if ``ds`` lacks them."""
  for name in names:
    missing = [m for m in models.get_model(name).requires if m not in ds.features]
    if missing:
      parser.error(
        f"model {name} needs the {', '.join(missing)} features, which data set {ds.name!r} "
        f"({data_spec}) does not have (it has: {', '.join(ds.features) or 'none'}); "
        "drop it from --models or use a data set with those *_feat.npy files"
      )


def load_data_for(parser: argparse.ArgumentParser, data_spec: str, names: Sequence[str]) -> data_lib.Dataset:
  """Loads ``data_spec``, checks it has the features ``names`` need, and prints a one-line summary.

  Data that cannot be loaded (:class:`benchmarks.data.dataset.DataError`: a missing path, an unknown synthetic
  preset, a malformed file) is a ``parser.error`` prefixed ``--data <spec>: `` and naming the file, line and
  column."""
  try:
    ds = data_lib.load(data_spec)
  except data_lib.DataError as e:
    parser.error(f"--data {data_spec}: {e}")
  check_models_have_features(parser, ds, names, data_spec)
  print(
    f"data {ds.name}: {ds.n_users} users, {ds.n_items} items, "
    f"{len(ds.train)}/{len(ds.valid)}/{len(ds.test)} train/valid/test, "
    f"features: {', '.join(f'{k} {v.shape[1]}-d' for k, v in ds.features.items()) or 'none'}"
  )
  return ds


def check_model_hparams(
  parser: argparse.ArgumentParser,
  hparams: Mapping[str, Mapping[str, Any]],
  grid: Mapping[str, Sequence[Any]] | None = None,
) -> None:
  """``parser.error`` naming the ``--hparam`` / ``--grid`` item unless every model builds with its
  hyper-parameters (the ranges its constructor checks, e.g. ``n_layers >= 0``; on a stand-in data set)."""
  for model, hp in hparams.items():
    for name, value in hp.items():
      problem = model_build_problem(model, {name: value})
      if problem:
        parser.error(f"--hparam {model}.{name}={value!r}: {problem}")
    if len(hp) > 1:
      problem = model_build_problem(model, hp)
      if problem:
        parser.error(f"--hparam for {model} ({', '.join(f'{k}={v!r}' for k, v in hp.items())}): {problem}")
    for name, values in (grid or {}).items():
      if name in CONFIG_FIELDS or name in METHOD_DEFAULTS:
        continue
      for value in values:
        problem = model_build_problem(model, {**hp, name: value})
        if problem:
          parser.error(f"--grid {name}={value!r} ({model}): {problem}")


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The points of ``grid`` in the order :func:`benchmarks.training.loop.grid_search` runs them (``[{}]``: none)."""
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]


def point_label(point: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in point.items())


def check_configs(parser: argparse.ArgumentParser, configs: Sequence[tuple[TrainConfig, str]]) -> None:
  """``parser.error`` (prefixed with the config's ``where``, e.g. its grid point) unless every config's
  numbers are in range, ``alpha2 < alpha1``, and its method builds (:func:`benchmarks.training.methods.make_method`)."""
  for config, where in configs:
    prefix = f"{where}: " if where else ""
    hp = dict(config.method_hparams)
    values = {**hp, "learning_rate": config.learning_rate, "batch_size": config.batch_size}
    for name, value in values.items():
      _, integer, low, inclusive = NUMBER_RULES[name]
      problem = number_problem(value, integer, low, inclusive)
      if problem:
        parser.error(f"{prefix}{name}: {problem}")
    problem = alpha_problem(hp)
    if problem:
      parser.error(f"{prefix}{problem}")
    try:
      make_method(config.method, optimizer=config.optimizer, learning_rate=config.learning_rate, **hp)
    except ValueError as e:
      parser.error(f"{prefix}{e}")


def setting(config: TrainConfig, name: str) -> Any:
  if name in CONFIG_FIELDS:
    return getattr(config, name)
  if name in METHOD_DEFAULTS:
    return config.method_hparams[name]
  return config.model_hparams[name]


#: The :class:`TrainConfig` fields every run of a command line shares, taken as they are from the parsed flags
#: (:func:`train_config`) or from :class:`TrainOptions` (:meth:`TrainOptions.config`): one list for both.
RUN_FIELDS = (
  "optimizer",
  "learning_rate",
  "batch_size",
  "max_epochs",
  "patience",
  "eval_every",
  "valid_metric",
  "devices",
  "shard_tables",
)
#: The flag (argparse destination) of a :data:`RUN_FIELDS` field where its name differs.
ARGUMENT_OF = {"learning_rate": "lr"}


def train_config(
  args: argparse.Namespace, model: str, method: str, seed: int, model_hparams: Mapping[str, Any]
) -> TrainConfig:
  """The :class:`TrainConfig` of one run from the shared training options (:func:`add_training_arguments`),
  the same for compare, robustness and landscape, so their runs -- and checkpoints -- match."""
  return TrainConfig(
    model=model,
    method=method,
    seed=seed,
    model_hparams=dict(model_hparams),
    method_hparams=method_hparams(args),
    **{field: getattr(args, ARGUMENT_OF.get(field, field)) for field in RUN_FIELDS},
  )


# --------------------------------------------------------------------------------------------------
# One options object: every shared flag parsed and checked once
# --------------------------------------------------------------------------------------------------


class UsageArgumentParser(argparse.ArgumentParser):
  """An ``argparse.ArgumentParser`` whose errors raise :class:`~benchmarks.runtime.cli.UsageError` instead of
  printing the usage and exiting, so that a bad flag ends a command as every other bad input does: one line
  ``prog: error: <message>`` and status 2 (:func:`benchmarks.runtime.cli.run`). ``--help`` still prints and exits 0.
  It also stands in for a parser in the checks above that take one (their ``parser.error`` raises)."""

  def error(self, message: str) -> NoReturn:
    raise UsageError(message)


def add_run_arguments(
  p: argparse.ArgumentParser, *, models_default: str = "vbpr,lightgcn,bm3", methods_default: str = "plain,mg,sam"
) -> None:
  """What a training command trains: ``--data``, ``--models``, ``--methods``, ``--seeds`` (compare's defaults)."""
  p.add_argument(
    "--data",
    default="synthetic",
    help="MMRec-layout directory, 'synthetic' or 'synthetic:<preset>' (default: synthetic)",
  )
  p.add_argument("--models", default=models_default, help="comma list of " + ",".join(models.MODELS))
  p.add_argument("--methods", default=methods_default, help="comma list of " + ",".join(METHODS))
  p.add_argument("--seeds", type=number(True, 1), default=DEFAULTS["seeds"], help="seeds 0..N-1 (default %(default)s)")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """The shared training flags of one command line, parsed and checked (:func:`train_options`).

  ``model_hparams`` maps every model to its ``--hparam`` settings; ``grid`` is ``--grid`` (name -> values);
  ``dataset`` is the loaded ``--data``, checked to have every model's features. :meth:`config` builds the
  :class:`TrainConfig` of one run, the same way for every command, so their runs (and checkpoints) match.
  """

  data: str
  dataset: data_lib.Dataset = dataclasses.field(repr=False, compare=False)
  models: tuple[str, ...]
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  optimizer: str
  learning_rate: float
  batch_size: int
  max_epochs: int
  patience: int
  eval_every: int
  valid_metric: str
  method_hparams: Mapping[str, Any]
  model_hparams: Mapping[str, Mapping[str, Any]]
  grid: Mapping[str, tuple[Any, ...]]
  devices: Optional[int] = None
  shard_tables: bool = False
  progress: bool = True
  multiprocess: Optional[distributed.Options] = None  # the jax.distributed run this process joined

  @property
  def data_fingerprint(self) -> str:
    """The content fingerprint of the data (:func:`benchmarks.data.fingerprint.dataset_fingerprint`)."""
    return dataset_fingerprint(self.dataset)

  def config(self, model: str, method: str, seed: int = 0, point: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """The :class:`TrainConfig` of one run: ``model`` x ``method`` at ``seed`` and grid point ``point``."""
    config = TrainConfig(
      model=model,
      method=method,
      seed=seed,
      model_hparams=dict(self.model_hparams[model]),
      method_hparams=dict(self.method_hparams),
      **{field: getattr(self, field) for field in RUN_FIELDS},
    )
    return config_with(config, **point) if point else config

  def cells(self) -> list[TrainConfig]:
    """One config per model x method (seed 0, no grid point), models first."""
    return [self.config(model, method) for model in self.models for method in self.methods]

  def points(self) -> list[dict[str, Any]]:
    """The grid points (``[{}]`` without ``--grid``), in the order the grid runs them."""
    return grid_points(self.grid)

  def runs(self) -> list[tuple[TrainConfig, dict[str, Any]]]:
    """Every run the options ask for, with its grid point: cell by cell, point by point, seed by seed."""
    return [
      (self.config(cell.model, cell.method, seed, point), point)
      for cell in self.cells()
      for point in self.points()
      for seed in self.seeds
    ]

  def settings(self) -> dict[str, Any]:
    """What decides the results, by flag and JSON-ready: the resolved value of every shared flag (defaults
    included) and the data's content fingerprint. Not the flags that only change how runs execute
    (``--devices``, ``--shard-tables``, progress, the multi-process flags)."""
    seeds: Any = len(self.seeds) if self.seeds == tuple(range(len(self.seeds))) else list(self.seeds)
    out: dict[str, Any] = {
      "--data": self.data,
      "data fingerprint": self.data_fingerprint,
      "--models": ",".join(self.models),
      "--methods": ",".join(self.methods),
      "--seeds": seeds,
      "--optimizer": self.optimizer,
      "--lr": self.learning_rate,
      "--batch-size": self.batch_size,
      "--max-epochs": self.max_epochs,
      "--patience": self.patience,
      "--eval-every": self.eval_every,
      "--valid-metric": self.valid_metric,
    }
    out.update({NUMBER_RULES[name][0]: value for name, value in self.method_hparams.items()})
    out["--hparam"] = [f"{m}.{k}={v!r}" for m in self.models for k, v in sorted(self.model_hparams[m].items())]
    out["--grid"] = ";".join(f"{k}={','.join(repr(v) for v in vs)}" for k, vs in self.grid.items())
    return out


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """The settings (:meth:`TrainOptions.settings` and the like) that differ, one phrase each:
  ``"--max-epochs 5 there, 10 here"`` (``saved`` is "there"). ``--data`` counts by its content: another path to
  data with the same fingerprint is no difference, the same path to changed data is one."""

  def show(value: Any) -> str:
    if value is _ABSENT:
      return "(not set)"
    if isinstance(value, list):
      return " ".join(map(str, value)) or "none"
    return "''" if value == "" else str(value)

  same_data = saved.get("data fingerprint", _ABSENT) == current.get("data fingerprint")
  out = []
  for name in dict.fromkeys([*current, *saved]):
    there, here = saved.get(name, _ABSENT), current.get(name, _ABSENT)
    if there == here or (name == "--data" and same_data):  # the same data under another path is the same data
      continue
    if name == "data fingerprint":
      if saved.get("--data", _ABSENT) != current.get("--data"):
        continue  # said by --data
      out.append(f"the data changed (content fingerprint {str(there)[:12]} there, {str(here)[:12]} here)")
    else:
      out.append(f"{name} {show(there)} there, {show(here)} here")
  return out


_ABSENT = object()


def train_options(args: argparse.Namespace) -> TrainOptions:
  """The one :class:`TrainOptions` of a parsed command line, every shared flag checked; raises
  :class:`~benchmarks.runtime.cli.UsageError` (one line naming the flag) on the first problem.

  Reads the flags of :func:`add_training_arguments` and :func:`add_run_arguments` (or ``--model`` / ``--seed``
  for a command that trains one model or seed), ``--grid`` and ``--no-progress`` if the command has them, and
  the multi-process flags (:func:`benchmarks.parallel.distributed.add_arguments`). In this order: names,
  numbers, ``--hparam``, ``--grid`` and ``alpha2 < alpha1`` (pure Python); then it joins the multi-process run
  if one is asked for (before any JAX computation; ``--devices`` then defaults to every device of every
  process); then the models are built with their hyper-parameters on a stand-in data set, every config's
  method is built, and ``--data`` is loaded (a :class:`~benchmarks.data.dataset.DataError` becomes
  ``--data <spec>: <the reader's message>``) and checked to have every model's features.
  """
  refuse = UsageArgumentParser(add_help=False)

  def names(flag: str, text: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
    try:
      return tuple(parse_names(text, list(valid), what))
    except argparse.ArgumentTypeError as e:
      raise UsageError(f"{flag}: {e}") from None

  if hasattr(args, "models"):
    model_names = names("--models", args.models, models.MODELS, "model")
  else:
    model_names = names("--model", args.model, models.MODELS, "model")
    if len(model_names) != 1:
      raise UsageError(f"--model: give one model, got {args.model!r}")
  method_names = names("--methods", args.methods, METHODS, "method")
  optimizer = names("--optimizer", args.optimizer, OPTIMIZERS, "optimizer")
  if len(optimizer) != 1:
    raise UsageError(f"--optimizer: give one optimizer, got {args.optimizer!r}")
  for flag, given in (("--models", model_names), ("--methods", method_names)):
    repeated = sorted({n for n in given if given.count(n) > 1})
    if repeated:
      raise UsageError(f"{flag}: {', '.join(repeated)} given twice")
  try:
    hparams = parse_hparams(args.hparam, model_names)
    grid = parse_grid(getattr(args, "grid", None), model_names)
  except argparse.ArgumentTypeError as e:
    raise UsageError(str(e)) from None
  check_training_arguments(refuse, args)
  for name in grid:
    both = [m for m in model_names if name in hparams[m]]
    if both:
      raise UsageError(f"--grid {name} and --hparam both set {name} (for {', '.join(both)}); give it in one of them")
  if hasattr(args, "seeds"):
    problem = number_problem(args.seeds, True, 1, True)
    if problem:
      raise UsageError(f"argument --seeds: {problem}")
    seeds = tuple(range(args.seeds))
  elif hasattr(args, "seed"):
    problem = number_problem(args.seed, True, 0, True)
    if problem:
      raise UsageError(f"argument --seed: {problem}")
    seeds = (args.seed,)
  else:
    seeds = (0,)
  try:
    TrainConfig(valid_metric=args.valid_metric)
  except ValueError as e:
    raise UsageError(f"--valid-metric: {e}") from None

  joined = distributed.setup_from_args(args, refuse)  # before any JAX computation; may set args.devices
  check_model_hparams(refuse, hparams, grid)
  options = TrainOptions(
    data=args.data,
    dataset=None,  # loaded last, after every cheaper check
    models=model_names,
    methods=method_names,
    seeds=seeds,
    optimizer=optimizer[0],
    learning_rate=args.lr,
    batch_size=args.batch_size,
    max_epochs=args.max_epochs,
    patience=args.patience,
    eval_every=args.eval_every,
    valid_metric=args.valid_metric,
    method_hparams=method_hparams(args),
    model_hparams={m: dict(hparams[m]) for m in model_names},
    grid={name: tuple(values) for name, values in grid.items()},
    devices=args.devices,
    shard_tables=args.shard_tables,
    progress=not getattr(args, "no_progress", False),
    multiprocess=joined,
  )
  planned = []
  for cell in options.cells():
    for point in options.points():
      try:
        planned.append(
          (options.config(cell.model, cell.method, 0, point), f"--grid {point_label(point)}" if point else "")
        )
      except ValueError as e:
        raise UsageError(f"--grid {point_label(point)}: {e}") from None
  check_configs(refuse, planned)
  ds = load_data_for(refuse, args.data, model_names)
  return dataclasses.replace(options, dataset=ds)
