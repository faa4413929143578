"""Compare plain training, Mirror Gradient, SAM and GNP on recommenders -- the main command.

    python -m benchmarks.compare                      # synthetic data, VBPR/LightGCN/BM3 x plain/MG/SAM
    python -m benchmarks.compare --data ../shared/data/scientific --seeds 3
    python -m benchmarks.compare --data ../shared/data/baby --models lightgcn --methods plain,mg

Prints a table (model x method: mean +- sd over seeds of recall/precision/map/ndcg @5 and @20 on
the test split at the best-validation epoch; relative change vs plain from per-seed paired
differences; epochs, wall seconds, gradient evaluations) and writes ``results.json`` (one record
per model/method/seed), ``results.csv`` and ``curves.png`` (validation recall@20 and training loss
against epochs and against gradient evaluations) to ``--out``. Same seed, same data order and same
initialisation for every method, so per-seed differences are paired.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import inspect
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

import models
from benchmarks.training import checkpoints
from benchmarks.data import dataset as data_lib
from benchmarks.parallel import distributed
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.training.methods import METHOD_DEFAULTS, METHODS, OPTIMIZERS, make_method
from benchmarks.training.loop import _CONFIG_FIELDS, TrainConfig, TrainingDiverged, config_with, grid_search, train

TABLE_METRICS = [f"{m}@{k}" for k in (5, 20) for m in ("recall", "precision", "map", "ndcg")]
CHANGE_METRICS = ["recall@5", "ndcg@5", "recall@20", "ndcg@20"]

# The main command's defaults: ~2 minutes on a 2-core CPU for 3 models x 3 methods x 2 seeds on the
# synthetic set (runs early-stop long before the epoch cap; MMRec's cap is 1000, patience 20).
DEFAULTS = {"max_epochs": 300, "patience": 20, "seeds": 2}


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
  names = [n.strip().lower() for n in text.split(",") if n.strip()]
  bad = [n for n in names if n not in valid]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; valid names: {', '.join(valid)}")
  return names


def _value(text: str) -> Any:
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


def _number_problem(value: Any, integer: bool, low: float, inclusive: bool) -> Optional[str]:
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
    problem = _number_problem(value, integer, low, inclusive)
    if problem:
      raise argparse.ArgumentTypeError(problem)
    return value

  parse.__name__ = "integer" if integer else "number"
  return parse


def _rule_type(name: str) -> Callable[[str], Any]:
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


def _alpha_problem(hparams: Mapping[str, Any]) -> Optional[str]:
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
    problem = _number_problem(value, integer, low, inclusive)
    if problem:
      parser.error(f"argument {option}: {problem}")
  if not args.alpha2 < args.alpha1:
    parser.error(
      f"--alpha2 must be smaller than --alpha1 (Mirror Gradient needs alpha1 > alpha2 > 0), "
      f"got --alpha1 {args.alpha1:g} --alpha2 {args.alpha2:g}"
    )
  if args.devices is not None:
    problem = _number_problem(args.devices, True, 1, True)
    if problem:
      parser.error(f"argument --devices: {problem}")
  if args.shard_tables and args.devices is None:
    parser.error("--shard-tables needs --devices N (the devices to shard the tables over)")


def model_hparam_defaults(name: str) -> dict[str, Any]:
  """The hyper-parameters ``models.get_model(name).from_dataset`` accepts, with their defaults: its
  keyword-only arguments (besides ``rngs``) and, when it forwards ``**hparams``, the constructor's."""
  cls = models.get_model(name)
  signatures = [inspect.signature(cls.from_dataset)]
  if any(p.kind is p.VAR_KEYWORD for p in signatures[0].parameters.values()):
    signatures.append(inspect.signature(cls.__init__))
  return {
    p.name: p.default
    for sig in signatures
    for p in sig.parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.name != "rngs"
  }


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
  stand_in = types.SimpleNamespace(
    name="stand-in",
    n_users=2,
    n_items=2,
    train=types.SimpleNamespace(user=ids, item=ids),
    features={m: np.ones((2, 2), np.float32) for m in cls.requires},
  )

  def build():
    return cls.from_dataset(stand_in, rngs=nnx.Rngs(0), **hparams)

  try:
    try:
      nnx.eval_shape(build)
    except jax.errors.JAXTypeError:  # the constructor computes on concrete arrays
      build()
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def _parse_hparams(items: Sequence[str], model_names: Sequence[str]) -> dict[str, dict[str, Any]]:
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
    value = _value(text)
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
  if name in _CONFIG_FIELDS or name in METHOD_DEFAULTS:
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
  searchable = [*sorted(_CONFIG_FIELDS), *METHOD_DEFAULTS, *common]
  hint = f" ({name} cannot be searched: set it with {NUMBER_RULES[name][0]})" if name in NUMBER_RULES else ""
  if name == "lr":
    hint = " (the learning rate is learning_rate in a grid)"
  return f"unknown hyper-parameter {name!r}{hint}; a grid can search {', '.join(searchable)}"


def _grid_value_problem(name: str, value: Any, model_names: Sequence[str]) -> Optional[str]:
  if name in NUMBER_RULES:  # learning_rate, batch_size or a method hyper-parameter
    _, integer, low, inclusive = NUMBER_RULES[name]
    problem = _number_problem(value, integer, low, inclusive)
    return f"{name}: {problem}" if problem else None
  for m in model_names:
    problem = model_hparam_problem(m, name, value)
    if problem:
      return problem
  return None


def _parse_grid(text: str | None, model_names: Sequence[str] = ()) -> dict[str, list[Any]]:
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
      value = _value(t)
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
  p.add_argument("--lr", type=_rule_type("learning_rate"), default=1e-3, help="learning rate, > 0 (default 1e-3)")
  p.add_argument("--batch-size", type=_rule_type("batch_size"), default=2048, help=">= 1 (default 2048)")
  p.add_argument(
    "--max-epochs", type=_rule_type("max_epochs"), default=DEFAULTS["max_epochs"], help=">= 1 (default %(default)s)"
  )
  p.add_argument(
    "--patience",
    type=_rule_type("patience"),
    default=DEFAULTS["patience"],
    help="evaluations without improvement before stopping, >= 0 (MMRec: 20)",
  )
  p.add_argument("--eval-every", type=_rule_type("eval_every"), default=1, help="epochs between evaluations, >= 1")
  p.add_argument("--valid-metric", default="recall@20")
  p.add_argument("--alpha1", type=_rule_type("alpha1"), default=1.0, help="MG alpha1 (> alpha2)")
  p.add_argument("--alpha2", type=_rule_type("alpha2"), default=0.2, help="MG alpha2 (> 0)")
  p.add_argument("--beta", type=_rule_type("beta"), default=3, help="MG interval, an integer >= 1")
  p.add_argument("--rho", type=_rule_type("rho"), default=0.05, help="SAM radius, > 0")
  p.add_argument("--gnp-penalty", type=_rule_type("gnp_penalty"), default=0.01, help="GNP weight of ||grad L||^2, >= 0")
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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.compare",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--data",
    default="synthetic",
    help="MMRec-layout directory, 'synthetic' or 'synthetic:<preset>' (default: synthetic)",
  )
  p.add_argument("--models", default="vbpr,lightgcn,bm3", help="comma list of " + ",".join(models.MODELS))
  p.add_argument("--methods", default="plain,mg,sam", help="comma list of " + ",".join(METHODS))
  p.add_argument("--seeds", type=number(True, 1), default=DEFAULTS["seeds"], help="seeds 0..N-1 (default %(default)s)")
  add_training_arguments(p)
  p.add_argument(
    "--grid",
    default=None,
    metavar="NAME=V1,V2;NAME=...",
    help="grid over learning_rate, batch_size, method hyper-parameters and hyper-parameters every "
    "model in --models takes; the winner is chosen on validation",
  )
  p.add_argument(
    "--out",
    default="results",
    help="output directory (default: results); one that already holds results.json, results.csv "
    "or curves.png is refused unless --overwrite is given",
  )
  p.add_argument(
    "--checkpoint-dir",
    default=None,
    help="orbax checkpoints, one sub-directory per run (<model>-<method>-seed<k>, plus the grid "
    "point with --grid); a run whose sub-directory already holds checkpoints is refused "
    "unless --resume or --overwrite is given",
  )
  p.add_argument(
    "--checkpoint-every",
    type=number(True, 1),
    default=5,
    metavar="N",
    help="save a checkpoint every N epochs and at the end (default 5; a resumed run "
    "replays the epochs after the last one exactly)",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the runs stored in --checkpoint-dir (a finished one is loaded, not retrained)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the results in --out (the old ones are deleted before training) and, without "
    "--resume, delete the checkpoints these runs already have in --checkpoint-dir",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  distributed.add_arguments(p)  # --coordinator/--num-processes/--process-id, --distributed auto
  return p


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str | bytes) -> None:
  """Writes ``path`` via a temporary file in the same directory and ``os.replace``."""
  atomic_write_all({path: text})


def atomic_write_all(files: Mapping[Path, str | bytes]) -> None:
  """Writes every file of ``files`` via a temporary file in its directory, then renames them all.

  Every new content is complete and on disk before the first rename, so an error (or an interrupt)
  while writing changes none of the files, and no temporary file outlives this call (one left by a
  killed process is removed by :func:`clear_outputs` of the next command). Only a kill between the
  consecutive renames could leave some files renamed and others not.
  """
  temps: list[tuple[str, Path]] = []
  try:
    for path, text in files.items():
      path = Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
      temps.append((tmp, path))
      with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o644)  # mkstemp creates 0600
    while temps:
      tmp, path = temps[0]
      os.replace(tmp, path)
      temps.pop(0)
  finally:
    for tmp, _ in temps:
      Path(tmp).unlink(missing_ok=True)


#: The suffix of :func:`atomic_write_all`'s temporary files (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"

#: What the command writes to ``--out``.
OUTPUTS = ("results.json", "results.csv", "curves.png")


def writable_dir_problem(path: Path) -> Optional[str]:
  """Creates the directory ``path`` (and its parents) and writes a file there; why that fails, or ``None``."""
  if path.exists() and not path.is_dir():
    return f"{path} exists and is not a directory"
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    return f"cannot create or write to the directory {path} ({e.strerror or e})"
  return None


def check_out_dir(
  parser: argparse.ArgumentParser, out: Path, names: Sequence[str], *, overwrite: bool, option: str = "--out"
) -> None:
  """``parser.error`` unless ``out`` is (or can be created as) a writable directory and, unless
  ``overwrite``, holds none of the outputs ``names`` of an earlier run."""
  problem = writable_dir_problem(out)
  if problem:
    parser.error(f"{option} {out}: {problem}")
  held = [n for n in names if (out / n).exists()]
  if held and not overwrite:
    parser.error(
      f"{option} {out} already holds {', '.join(held)} of an earlier run; pass --overwrite to "
      f"replace them, or choose another {option}"
    )


def clear_outputs(out: Path, names: Sequence[str], *, overwrite: bool) -> None:
  """Removes the temporary files a killed write of ``names`` left in ``out`` and, with ``overwrite``, the
  old outputs ``names`` themselves (so that ``out`` never mixes an earlier run's files with this one's)."""
  for name in names:
    for tmp in out.glob(f".{name}.*{TEMP_SUFFIX}"):
      tmp.unlink(missing_ok=True)
    if overwrite:
      (out / name).unlink(missing_ok=True)


def write_results(out: Path, records: list[dict[str, Any]]) -> None:
  """``results.json`` and ``results.csv`` of ``records``, both from the same records, written together."""
  atomic_write_all(
    {out / "results.json": json.dumps(records, indent=1, default=_json_default), out / "results.csv": _csv(records)}
  )


def _csv(records: list[dict[str, Any]]) -> str:
  fields = [
    "model",
    "method",
    "optimizer",
    "seed",
    "status",
    "best_epoch",
    "epochs",
    "wall_s",
    "updates",
    "grad_evals",
    "grad_evals_per_update",
  ]
  metric_names = sorted({k for r in records for k in r.get("test", {})})
  header = fields + [f"valid_{m}" for m in metric_names] + [f"test_{m}" for m in metric_names]
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  for r in records:
    w.writerow(
      [r.get(f, "") for f in fields]
      + [r.get("valid", {}).get(m, "") for m in metric_names]
      + [r.get("test", {}).get(m, "") for m in metric_names]
    )
  return buf.getvalue()


def _plot(records: list[dict[str, Any]], path: Path) -> bool:
  """Writes the curves of the successful runs to ``path``; ``False`` (nothing written) if there are none."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in records if r.get("status") == "ok" and r["history"]]
  model_names = list(dict.fromkeys(r["model"] for r in ok))
  if not model_names:
    return False
  fig, axes = plt.subplots(len(model_names), 4, figsize=(16, 3.2 * len(model_names)), squeeze=False)
  colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
  for row, model in zip(axes, model_names):
    for r in (r for r in ok if r["model"] == model):
      h = r["history"]
      ep = [x["epoch"] + 1 for x in h]
      ge = [x["grad_evals"] for x in h]
      rec = [x["valid"]["recall@20"] for x in h]
      loss = [x["loss"] for x in h]
      label = r["method"] if r["seed"] == min(x["seed"] for x in ok) else None
      style = dict(color=colors[r["method"]], alpha=0.9 if label else 0.35, lw=1.2, label=label)
      row[0].plot(ep, rec, **style)
      row[1].plot(ep, loss, **style)
      row[2].plot(ge, rec, **style)
      row[3].plot(ge, loss, **style)
    for ax, (x, y) in zip(
      row,
      [
        ("epoch", "valid recall@20"),
        ("epoch", "train loss"),
        ("gradient evaluations", "valid recall@20"),
        ("gradient evaluations", "train loss"),
      ],
    ):
      ax.set_xlabel(x)
      ax.set_ylabel(y)
      ax.set_title(f"{model}: {y}", fontsize=9)
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=8)
  fig.tight_layout()
  save_png(fig, path, dpi=90)
  return True


def save_png(fig, path: Path, *, dpi: int = 90) -> None:
  """Renders the matplotlib figure ``fig`` to PNG, writes it atomically to ``path`` and closes it."""
  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def _mean_sd(values: Sequence[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f}±{np.std(values, ddof=1):.4f}"


def format_tables(records: list[dict[str, Any]]) -> str:
  """The metrics table and the change-vs-plain table, as printed by the command."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["model"], r["method"]), []).append(r)
  lines = []
  head = f"{'model':9s} {'method':6s} " + " ".join(f"{m:>15s}" for m in TABLE_METRICS)
  lines += ["Test metrics at the best-validation epoch (mean±sd over seeds)", head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = [r for r in rs if r.get("status") == "ok"]
    cells = [_mean_sd([r["test"][m] for r in ok]) for m in TABLE_METRICS]
    note = (
      ""
      if len(ok) == len(rs)
      else f"  ({len(rs) - len(ok)} run(s) failed: {rs[0 if not ok else -1].get('error', '')[:80]})"
    )
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>15s}" for c in cells) + note)

  lines += ["", "Relative change vs plain (mean±sd of paired per-seed differences, %), cost"]
  head = (
    f"{'model':9s} {'method':6s} "
    + " ".join(f"{'Δ' + m:>16s}" for m in CHANGE_METRICS)
    + f" {'best ep':>8s} {'epochs':>7s} {'wall s':>8s} {'grad ev':>9s} {'ev/upd':>7s}"
  )
  lines += [head, "-" * len(head)]
  for (model, method), rs in groups.items():
    ok = {r["seed"]: r for r in rs if r.get("status") == "ok"}
    base = {r["seed"]: r for r in groups.get((model, "plain"), []) if r.get("status") == "ok"}
    cells = []
    for m in CHANGE_METRICS:
      diffs = [
        100 * (ok[s]["test"][m] - base[s]["test"][m]) / base[s]["test"][m]
        for s in ok
        if s in base and base[s]["test"][m] > 0
      ]
      if method == "plain" or not diffs:
        cells.append("-")
      elif len(diffs) == 1:
        cells.append(f"{diffs[0]:+.1f}")
      else:
        cells.append(f"{np.mean(diffs):+.1f}±{np.std(diffs, ddof=1):.1f}")
    vals = list(ok.values())
    cost = (
      f" {_avg(vals, 'best_epoch'):>8s} {_avg(vals, 'epochs'):>7s} {_avg(vals, 'wall_s'):>8s}"
      f" {_avg(vals, 'grad_evals'):>9s} {_avg(vals, 'grad_evals_per_update', '.3f'):>7s}"
    )
    lines.append(f"{model:9s} {method:6s} " + " ".join(f"{c:>16s}" for c in cells) + cost)
  return "\n".join(lines)


def _avg(records, key, fmt=".0f") -> str:
  return format(float(np.mean([r[key] for r in records])), fmt) if records else "-"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


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
  """Loads ``data_spec``, checks it has the features ``names`` need, and prints a one-line summary."""
  ds = data_lib.load(data_spec)
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
      if name in _CONFIG_FIELDS or name in METHOD_DEFAULTS:
        continue
      for value in values:
        problem = model_build_problem(model, {**hp, name: value})
        if problem:
          parser.error(f"--grid {name}={value!r} ({model}): {problem}")


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The points of ``grid`` in the order :func:`benchmarks.train.grid_search` runs them (``[{}]``: none)."""
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]


def _point_label(point: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in point.items())


def check_configs(parser: argparse.ArgumentParser, configs: Sequence[tuple[TrainConfig, str]]) -> None:
  """``parser.error`` (prefixed with the config's ``where``, e.g. its grid point) unless every config's
  numbers are in range, ``alpha2 < alpha1``, and its method builds (:func:`benchmarks.methods.make_method`)."""
  for config, where in configs:
    prefix = f"{where}: " if where else ""
    hp = {**METHOD_DEFAULTS, **config.method_hparams}
    values = {**hp, "learning_rate": config.learning_rate, "batch_size": config.batch_size}
    for name, value in values.items():
      _, integer, low, inclusive = NUMBER_RULES[name]
      problem = _number_problem(value, integer, low, inclusive)
      if problem:
        parser.error(f"{prefix}{name}: {problem}")
    problem = _alpha_problem(hp)
    if problem:
      parser.error(f"{prefix}{problem}")
    try:
      make_method(config.method, optimizer=config.optimizer, learning_rate=config.learning_rate, **hp)
    except ValueError as e:
      parser.error(f"{prefix}{e}")


def _setting(config: TrainConfig, name: str) -> Any:
  if name in _CONFIG_FIELDS:
    return getattr(config, name)
  if name in METHOD_DEFAULTS:
    return {**METHOD_DEFAULTS, **config.method_hparams}[name]
  return config.model_hparams[name]


def run_checkpoint_dir(root: str | Path, config: TrainConfig, grid_names: Sequence[str] = ()) -> Path:
  """``<root>/<model>-<method>-seed<k>`` and, in a grid, ``-<name>=<value>,...`` of the run's grid point
  (model, method and config hyper-parameters alike), so that every grid point has its own directory."""
  name = f"{config.model}-{config.method}-seed{config.seed}"
  if grid_names:
    labels = [
      f"{n}={v if isinstance(v, str) else repr(v)}" for n, v in ((n, _setting(config, n)) for n in sorted(grid_names))
    ]
    name += "-" + ",".join(labels).replace(os.sep, "_")
  return Path(root) / name


def check_checkpoints(
  parser: argparse.ArgumentParser,
  ds: data_lib.Dataset,
  runs: Sequence[tuple[TrainConfig, Path]],
  *,
  resume: bool,
  overwrite: bool,
  option: str = "--checkpoint-dir",
) -> list[Path]:
  """Before training: ``parser.error`` unless every run can use its checkpoint directory.

  The directories' parents must be writable. A run directory that already holds checkpoints is, with
  ``resume``, checked to be continuable (same config, same data fingerprint, a readable step:
  :meth:`benchmarks.checkpoints.RunCheckpoints.verify`); without ``resume`` it is refused unless
  ``overwrite``. Returns the directories to delete before training (``overwrite`` without ``resume``).
  """
  dirs = [d for _, d in runs]
  if len(set(dirs)) != len(dirs):
    parser.error(f"{option}: two runs of this command map to the same checkpoint directory")
  for root in dict.fromkeys(d.parent for d in dirs):
    problem = writable_dir_problem(root)
    if problem:
      parser.error(f"{option} {root}: {problem}")
  held = []
  for config, d in runs:
    if d.exists() and not d.is_dir():
      parser.error(f"{option}: {d} is a file, not a checkpoint directory")
    if d.is_dir() and any(d.iterdir()):
      held.append((config, d))
  if not held:
    return []
  if resume:
    fingerprint = dataset_fingerprint(ds)
    for config, d in held:
      try:
        checkpoints.RunCheckpoints(d, config, data_fingerprint=fingerprint).verify()
      except ValueError as e:
        parser.error(str(e))
    return []
  if overwrite:
    return [d for _, d in held]
  names = ", ".join(str(d) for _, d in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
  parser.error(
    f"{option}: {names} already hold{'s' if len(held) == 1 else ''} checkpoints of an earlier run; "
    f"pass --resume to continue them, --overwrite to delete them and train afresh, or choose "
    f"another {option}"
  )


def train_config(
  args: argparse.Namespace, model: str, method: str, seed: int, model_hparams: Mapping[str, Any]
) -> TrainConfig:
  """The :class:`TrainConfig` of one run from the shared training options (:func:`add_training_arguments`),
  the same for compare, robustness and landscape, so their runs -- and checkpoints -- match."""
  return TrainConfig(
    model=model,
    method=method,
    optimizer=args.optimizer,
    learning_rate=args.lr,
    batch_size=args.batch_size,
    max_epochs=args.max_epochs,
    patience=args.patience,
    eval_every=args.eval_every,
    valid_metric=args.valid_metric,
    model_hparams=dict(model_hparams),
    method_hparams=method_hparams(args),
    devices=args.devices,
    shard_tables=args.shard_tables,
    seed=seed,
  )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
  try:
    model_names = _names(args.models, list(models.MODELS), "model")
    method_names = _names(args.methods, list(METHODS), "method")
    _names(args.optimizer, list(OPTIMIZERS), "optimizer")
    hparams = _parse_hparams(args.hparam, model_names)
    grid = _parse_grid(args.grid, model_names)
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  check_training_arguments(parser, args)
  for name in grid:
    both = [m for m in model_names if name in hparams[m]]
    if both:
      parser.error(f"--grid {name} and --hparam both set {name} (for {', '.join(both)}); give it in one of them")
  if args.resume and not args.checkpoint_dir:
    parser.error("--resume needs --checkpoint-dir (the directory of the runs to continue)")
  distributed.setup_from_args(args, parser)  # several processes: join them before any JAX computation
  # every config the command will train, built and checked before anything is trained
  check_model_hparams(parser, hparams, grid)
  cells: list[TrainConfig] = []
  for model in model_names:
    for method in method_names:
      try:
        cells.append(train_config(args, model, method, 0, hparams[model]))
      except ValueError as e:
        parser.error(str(e))
  planned: list[tuple[TrainConfig, str]] = []
  for config in cells:
    for point in grid_points(grid):
      try:
        planned.append((config_with(config, **point), f"--grid {_point_label(point)}" if point else ""))
      except ValueError as e:
        parser.error(f"--grid {_point_label(point)}: {e}")
  check_configs(parser, planned)
  ds = load_data_for(parser, args.data, model_names)
  out = Path(args.out)
  primary = jax.process_index() == 0
  if primary:
    check_out_dir(parser, out, OUTPUTS, overwrite=args.overwrite)
  stale: list[Path] = []
  if args.checkpoint_dir:
    runs = [
      (c, run_checkpoint_dir(args.checkpoint_dir, c, list(grid)))
      for config, _ in planned
      for c in (dataclasses.replace(config, seed=s) for s in range(args.seeds))
    ]
    stale = check_checkpoints(parser, ds, runs, resume=args.resume, overwrite=args.overwrite)
  # everything is checked; from here on the command trains
  if primary:
    clear_outputs(out, OUTPUTS, overwrite=args.overwrite)
    for d in stale:
      shutil.rmtree(d)
  if stale and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("compare: old checkpoints removed")

  records: list[dict[str, Any]] = []
  for config in cells:
    records += _run_cell(ds, config, args, grid)
    if distributed.is_primary():  # several processes: process 0 alone writes
      write_results(out, records)
  if not distributed.is_primary():
    return records
  plotted = _plot(records, out / "curves.png")
  print()
  print(format_tables(records))
  wrote = [out / "results.json", out / "results.csv"] + ([out / "curves.png"] if plotted else [])
  note = "" if plotted else " (no curves.png: no run succeeded)"
  print(f"\nwrote {', '.join(map(str, wrote))}{note}")
  return records


def _run_cell(ds, config: TrainConfig, args, grid) -> list[dict[str, Any]]:
  """All seeds of one model/method (the grid winner, if a grid is given)."""
  records = []

  def one(ds, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = run_checkpoint_dir(args.checkpoint_dir, cfg, list(grid)) if args.checkpoint_dir else None
    try:
      record = train(
        ds,
        cfg,
        checkpoint_dir=ckpt,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.no_progress,
      )
      record["status"] = "ok"
    except TrainingDiverged as e:
      print(f"  ! {e}", file=sys.stderr)
      record = {
        "model": cfg.model,
        "method": cfg.method,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "status": "diverged",
        "error": str(e),
        "valid": {},
        "test": {},
        "history": [],
        "config": dataclasses.asdict(cfg),
      }
    record["data"] = args.data
    status = (
      f"test recall@20 {record['test']['recall@20']:.4f}, best epoch {record['best_epoch']}, {record['wall_s']:.1f}s"
      if record["status"] == "ok"
      else record["status"]
    )
    print(f"  {cfg.model}/{cfg.method} seed {cfg.seed}: {status}", flush=True)
    return record

  seeds = range(args.seeds)
  if grid:

    def safe_valid(ds, cfg, **kw):
      r = one(ds, cfg)
      if r["status"] != "ok":
        r["valid"] = {config.valid_metric: -math.inf}
      return r

    point, records = grid_search(ds, config, grid, seeds, run=safe_valid)
    print(f"  {config.model}/{config.method}: grid winner on validation {point}")
    return records
  return [one(ds, dataclasses.replace(config, seed=s)) for s in seeds]


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = build_parser()
  args = parser.parse_args(argv)
  return run(args, parser)
