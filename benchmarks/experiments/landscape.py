r"""Training-loss landscapes of plain / MG / SAM runs on one shared random plane (paper fig. 3).

    python -m benchmarks.landscape                                   # BM3 on synthetic data
    python -m benchmarks.landscape --data ../shared/data/scientific --model bm3 \
        --checkpoint-dir runs/ckpt_scientific --out runs/landscape_scientific

Each method is trained with the **same seed** (``--seed``; same data order and initialisation) by
:func:`benchmarks.experiments.robustness.fit_run`: its checkpoints live in ``<checkpoint dir>/<run key>``
(the harness's one rule, :func:`benchmarks.training.records.checkpoint_dir`; ``--checkpoint-dir``, default
``<out>/checkpoints``), so running the command again -- or ``benchmarks.robustness`` with the same training
options and ``--checkpoint-dir`` -- loads a finished run instead of retraining it. The options, ``--out``
(refused if it holds the ``landscape.json`` / ``landscape.png`` of another command line, unless
``--overwrite``) and the checkpoints are checked as by ``benchmarks.robustness`` before anything is trained.
Then, following Li et al. (2018):

* two raw Gaussian directions :math:`n_1, n_2` are drawn **once**
  (:func:`mirror_optax.random_directions` with ``key(--direction-seed)``; they depend only on the
  parameter shapes, which all methods share);
* with ``--filter-normalize`` (default) each method's copy is filter-normalised against **its own**
  trained parameters :math:`\theta`: every filter :math:`d_k` becomes
  :math:`d_k \lVert\theta_k\rVert / \lVert d_k\rVert`. Filters are the rows of the embedding tables and
  of BM3's feature tables (one user's / item's vector; ``filter_axis=0``) and the output units of the
  ``nnx.Linear`` kernels, stored ``(in, out)`` (``filter_axis=-1``); biases (1-D) get a zero direction
  and stay at their trained values, as in Li et al.;
* the training loss :math:`Z_{ij} = L(\theta + x_i n_1 + y_j n_2)` is evaluated on the grid
  :math:`x, y \in \mathrm{linspace}(-R, R, \text{--grid-points})` by
  :func:`mirror_optax.loss_landscape` (``--grid-batch`` points per vectorised batch to bound memory).
  :math:`L` is the fixed-batch training loss of :mod:`benchmarks.experiments.robustness` (the first batches of
  one epoch sampled with a fixed seed, at most ``--hessian-pairs`` pairs; BM3 dropout with fixed keys),
  so the planes of all methods are measured on the same data.

Outputs in ``--out``: ``landscape.png`` (top row: filled contours, one panel per method, the same
colour levels for all; bottom row: the same grids as surfaces with a common z range) and
``landscape.json``::

    {"schema_version": 1, "command": [...], "data", "model", "seed",
     "settings": {"grid_points", "radius", "filter_normalize", "direction_seed", "grid_batch",
                  "hessian_iters", "loss_batches": {"n_batches", "batch_size"},
                  "filter_axes": {param path: 0 | -1 | null (zero direction)}},
     "xs": [...], "ys": [...],      # loss_grid[i][j] = L(theta + xs[i] n1 + ys[j] n2)
     "methods": {method: {"loss_grid", "center_loss", "mean_rise", "max_rise", "top_eigenvalue",
                          "grad_norm", "power_iters", "test": {"recall@5", "recall@20"},
                          "best_epoch", "epochs", "key", "checkpoint", "from_checkpoint"}}}

``mean_rise`` / ``max_rise`` are the mean / maximum of :math:`Z - L(\theta)` over the plane: a flatter
minimum rises less. The top Hessian eigenvalue and gradient norm at :math:`\theta` are printed per
method. Note that the paper draws unnormalised directions on :math:`[-100, 100]^2`; without filter
normalisation the directions have :math:`\mathcal{N}(0, 1)` entries, which dwarf embedding entries of
size ~0.1, so choose a small ``--radius`` with ``--no-filter-normalize``.

References: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018; Zhong, Huang et al., "Mirror Gradient", WWW 2024, fig. 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from benchmarks.experiments import perturb
from benchmarks.experiments import robustness as rob
from benchmarks.runtime.files import atomic_write, json_default, save_png
from benchmarks.training import options
from benchmarks.training.config import TrainingDiverged
from benchmarks.training.methods import METHODS
from benchmarks.training.options import UsageArgumentParser, parse_hparams, parse_names
from mirror_optax import filter_normalize_direction, loss_landscape, random_directions

__all__ = [
  "OUTPUTS",
  "PROG",
  "LandscapeOptions",
  "build_parser",
  "filter_axes",
  "format_table",
  "normalize_directions",
  "parse_options",
  "plot",
  "run",
]

PROG = "python -m benchmarks.landscape"
OUTPUTS = ("landscape.json", "landscape.png")  # what the command writes to --out (the JSON first)
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LandscapeOptions(rob.RunOptions):
  """A checked ``python -m benchmarks.landscape`` command line (:func:`parse_options`)."""

  model: str
  seed: int
  grid_points: int
  radius: float
  filter_normalize: bool
  direction_seed: int
  grid_batch: int
  surface: bool


def filter_axes(model: nnx.Module, params: Any) -> dict[perturb.Path, Optional[int]]:
  """Filter axis of every leaf of ``params`` (the model's pure ``nnx.Param`` state): 0 for embedding /
  feature tables (rows), -1 for other >= 2-D leaves (Flax ``(in, out)`` kernels: per output unit),
  ``None`` for < 2-D leaves (zero direction)."""
  rows = set(perturb.noise_table_paths(model))
  out: dict[perturb.Path, Optional[int]] = {}
  for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = perturb.key_path(kp)
    if jnp.ndim(leaf) < 2:
      out[path] = None
    else:
      out[path] = 0 if path in rows else -1
  return out


def normalize_directions(
  directions: tuple[Any, Any], params: Any, axes: Mapping[perturb.Path, Optional[int]]
) -> tuple[Any, Any]:
  """Filter-normalises both directions against ``params`` leaf by leaf with the axes ``axes``."""

  def one(direction):
    def leaf(kp, d, p):
      axis = axes[perturb.key_path(kp)]
      if axis is None:
        return jnp.zeros_like(d)
      return filter_normalize_direction(d, p, filter_axis=axis)

    return jax.tree_util.tree_map_with_path(leaf, direction, params)

  return one(directions[0]), one(directions[1])


@functools.lru_cache(maxsize=None)
def _landscape_fn(graphdef: nnx.GraphDef, grid: tuple[float, ...], grid_batch: int):
  """Jitted ``(params, rest, batches, key, d1, d2) -> Z`` (one compilation for every method)."""

  def surface(params, rest, batches, key, d1, d2):
    loss_fn = rob.training_loss_fn(graphdef, rest, batches, key)
    return loss_landscape(
      loss_fn, params, grid=jnp.asarray(grid, jnp.float32), directions=(d1, d2), batch_size=grid_batch
    )

  return jax.jit(surface)


def plot(
  xs: np.ndarray,
  ys: np.ndarray,
  grids: Mapping[str, np.ndarray],
  titles: Mapping[str, str],
  path: Path,
  *,
  surface: bool = True,
) -> None:
  """Contours (same levels for every method) and, with ``surface``, 3-D surfaces, side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(grids)
  finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids.values()])
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  if hi <= lo:
    hi = lo + 1e-6
  levels = np.linspace(lo, hi, 25)
  rows = 2 if surface else 1
  fig = plt.figure(figsize=(4.6 * len(names) + 0.8, 4.2 * rows))
  X, Y = np.meshgrid(xs, ys, indexing="ij")
  mappable = None
  for col, name in enumerate(names):
    z = np.clip(grids[name], lo, hi)
    ax = fig.add_subplot(rows, len(names), col + 1)
    mappable = ax.contourf(X, Y, z, levels=levels, cmap="viridis")
    ax.contour(X, Y, z, levels=levels[::3], colors="k", linewidths=0.3)
    ax.plot([0], [0], "r+", ms=10)
    ax.set_title(titles[name], fontsize=9)
    ax.set_xlabel("n1 coefficient")
    ax.set_ylabel("n2 coefficient")
    ax.set_aspect("equal")
    if surface:
      ax3 = fig.add_subplot(rows, len(names), len(names) + col + 1, projection="3d")
      ax3.plot_surface(X, Y, z, cmap="viridis", vmin=lo, vmax=hi, linewidth=0, antialiased=True)
      ax3.set_zlim(lo, hi)
      ax3.set_title(name, fontsize=9)
      ax3.set_xlabel("n1")
      ax3.set_ylabel("n2")
  fig.subplots_adjust(right=0.9, wspace=0.3, hspace=0.25)
  cax = fig.add_axes([0.92, 0.55 if surface else 0.15, 0.015, 0.35 if surface else 0.7])
  fig.colorbar(mappable, cax=cax, label="training loss", format="%.4g")
  save_png(fig, path, dpi=90)


def build_parser() -> UsageArgumentParser:
  """The command line (errors raise :class:`cli.UsageError`: one line naming the flag, exit status 2)."""
  p = UsageArgumentParser(
    prog="python -m benchmarks.landscape",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--model", default="bm3", help="one of " + ",".join(models.MODELS) + " (default bm3)")
  p.add_argument("--methods", default="plain,mg,sam", help="comma list of " + ",".join(METHODS))
  p.add_argument(
    "--seed", type=options.number(True, 0), default=0, help="the training seed of every method (default 0)"
  )
  p.add_argument("--grid-points", type=options.number(True, 2), default=21, help="points per axis (default 21)")
  p.add_argument(
    "--radius",
    type=options.number(False, 0, inclusive=False),
    default=1.0,
    help="the grid spans [-R, R] in both directions (default 1.0, Li et al.'s range)",
  )
  p.add_argument(
    "--filter-normalize",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="filter-normalise the directions against each model's parameters (default on)",
  )
  p.add_argument("--direction-seed", type=int, default=0, help="key of the random directions")
  p.add_argument(
    "--grid-batch", type=options.number(True, 1), default=8, help="grid points evaluated per vectorised batch"
  )
  p.add_argument("--no-surface", action="store_true", help="contours only")
  p.add_argument(
    "--out",
    default="results",
    help="output directory (default: results); one that holds the landscape.json or landscape.png of "
    "another command line is refused unless --overwrite is given",
  )
  rob.add_common_args(p)
  return p


def parse_options(argv: Sequence[str] | None = None) -> LandscapeOptions:
  """The checked options of the command line ``argv`` (default ``sys.argv[1:]``); :class:`cli.UsageError`
  naming the flag for anything out of range. Reads no data and writes nothing."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    model_names = parse_names(args.model, list(models.MODELS), "model")
    method_names = parse_names(args.methods, list(METHODS), "method")
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  if len(model_names) != 1:
    parser.error(f"argument --model: expected one model, got {args.model!r}")
  (model_name,) = model_names
  rob.check_distinct(parser, "--methods", method_names)
  try:
    hparams = parse_hparams(args.hparam, [model_name])
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  if args.grid_points < 2:
    parser.error(f"--grid-points must be >= 2, got {args.grid_points}")
  if not (args.radius > 0 and np.isfinite(args.radius)):
    parser.error(f"--radius must be finite and > 0, got {args.radius}")
  if args.seed < 0:
    parser.error(f"--seed must be >= 0, got {args.seed}")
  if args.grid_batch < 1:
    parser.error(f"--grid-batch must be >= 1, got {args.grid_batch}")
  configs = rob.training_configs(parser, args, [(model_name, m, args.seed) for m in method_names], hparams)
  return LandscapeOptions(
    **rob.common_fields(args, PROG, argv, configs),
    model=model_name,
    seed=args.seed,
    grid_points=args.grid_points,
    radius=args.radius,
    filter_normalize=args.filter_normalize,
    direction_seed=args.direction_seed,
    grid_batch=args.grid_batch,
    surface=not args.no_surface,
  )


def run(opts: LandscapeOptions) -> dict[str, Any]:
  """The command: loads the data, checks the outputs and checkpoints, trains (or loads) every method,
  measures the shared plane and writes ``landscape.json`` (after every method) and ``landscape.png``;
  returns the document."""
  ds = rob.load_data(opts.data, [opts.model])
  out = opts.out
  rob.check_runs(opts, ds, OUTPUTS)
  batches = rob.fixed_batches(ds, batch_size=opts.configs[0].batch_size, max_pairs=opts.hessian_pairs)
  grid = np.linspace(-opts.radius, opts.radius, opts.grid_points)
  n_batches, batch_size = batches["user"].shape
  print(
    f"{opts.model}, seed {opts.seed}; {opts.grid_points}x{opts.grid_points} grid on "
    f"[-{opts.radius:g}, {opts.radius:g}]^2, loss on {n_batches} batch(es) of {batch_size}"
  )

  fitted = {}
  for config in opts.configs:
    method = config.method
    try:
      fitted[method] = rob.fit_run(ds, config, checkpoint_root=opts.checkpoint_root, progress=opts.progress)
    except (TrainingDiverged, ValueError) as e:
      print(f"  ! {opts.model}/{method}: {e}", file=sys.stderr)
      continue
    r = fitted[method][0].record
    print(
      f"  {opts.model}/{method} seed {opts.seed}: test recall@20 {r['test']['recall@20']:.4f}, "
      f"{'loaded' if fitted[method][1]['from_checkpoint'] else 'trained'} ({r['epochs']} epochs)",
      flush=True,
    )
  if not fitted:
    raise SystemExit("every run failed; nothing to plot")

  first = next(iter(fitted.values()))[0]
  axes = filter_axes(first.model(), first.params)
  raw = random_directions(first.params, jax.random.key(opts.direction_seed))
  loss_key, _ = rob.flatness_keys()  # the loss of robustness.sharpness
  document: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "command": list(opts.command),
    "data": opts.data,
    "model": opts.model,
    "seed": opts.seed,
    "settings": {
      "grid_points": opts.grid_points,
      "radius": opts.radius,
      "filter_normalize": opts.filter_normalize,
      "direction_seed": opts.direction_seed,
      "grid_batch": opts.grid_batch,
      "hessian_iters": opts.hessian_iters,
      "loss_batches": {"n_batches": int(n_batches), "batch_size": int(batch_size)},
      "filter_axes": {perturb.path_name(p): a for p, a in axes.items()},
    },
    "xs": grid.tolist(),
    "ys": grid.tolist(),
    "methods": {},
  }
  primary = jax.process_index() == 0
  grids, titles = {}, {}
  for method, (fit_, provenance) in fitted.items():
    g, params, rest = fit_.graphdef, fit_.params, fit_.rest
    directions = normalize_directions(raw, params, axes) if opts.filter_normalize else raw
    surface = _landscape_fn(g, tuple(grid.tolist()), opts.grid_batch)
    z = np.asarray(surface(params, rest, batches, loss_key, *directions), dtype=np.float64)
    sharp = rob.sharpness(g, params, rest, batches, num_iters=opts.hessian_iters)
    center = sharp["loss"]
    grids[method] = z
    titles[method] = f"{method}: λmax={sharp['top_eigenvalue']:.4g}, ‖∇L‖={sharp['grad_norm']:.3g}"
    r = fit_.record
    document["methods"][method] = {
      "loss_grid": z.tolist(),
      "center_loss": center,
      "mean_rise": float(np.mean(z) - center),
      "max_rise": float(np.max(z) - center),
      "top_eigenvalue": sharp["top_eigenvalue"],
      "grad_norm": sharp["grad_norm"],
      "power_iters": sharp["power_iters"],
      "test": {m: r["test"][m] for m in rob.METRICS},
      "best_epoch": r["best_epoch"],
      "epochs": r["epochs"],
      **provenance,
    }
    if primary:
      atomic_write(out / OUTPUTS[0], json.dumps(document, indent=1, default=json_default))
  if primary:
    plot(grid, grid, grids, titles, out / OUTPUTS[1], surface=opts.surface)
  print(f"wrote {out / OUTPUTS[1]}, {out / OUTPUTS[0]}")
  return document


def format_table(document: Mapping[str, Any]) -> str:
  """Per method: loss at the minimum, its rise over the plane, top Hessian eigenvalue, gradient norm."""
  s = document["settings"]
  lines = [
    f"{document['model']} seed {document['seed']}: training loss on a {s['grid_points']}x{s['grid_points']} "
    f"plane of radius {s['radius']:g} ({'filter-normalised' if s['filter_normalize'] else 'raw'} "
    f"directions, the same for every method)"
  ]
  head = (
    f"{'method':6s} {'loss at θ':>10s} {'mean rise':>10s} {'max rise':>10s} {'λ_max':>11s} "
    f"{'‖∇L‖':>10s} {'test r@20':>10s}"
  )
  lines += [head, "-" * len(head)]
  for method, m in document["methods"].items():
    lines.append(
      f"{method:6s} {m['center_loss']:10.4f} {m['mean_rise']:10.4f} {m['max_rise']:10.4f} "
      f"{m['top_eigenvalue']:11.5g} {m['grad_norm']:10.4g} {m['test']['recall@20']:10.4f}"
    )
  return "\n".join(lines)
