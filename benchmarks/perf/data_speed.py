"""Timing of the data layer: loading, synthetic generation, negative sampling and full-ranking evaluation.

Run ``python -m benchmarks.data_speed`` from the repository root. It prints

* load time of the real data sets in ``../shared/data`` beside the checkout (:data:`DATA_ROOT`; if present);
* the median seconds per epoch of :class:`~benchmarks.data.sampling.NegativeSampler` at Baby size;
* synthetic generation time of the Baby and Electronics presets, and write/load time of an Electronics-size
  ``.inter`` file;
* seconds per full evaluation pass at Baby shape with a random 64-d dot-product ``score_fn``;
* users/s and the peak resident-memory increase of :func:`~benchmarks.training.metrics.evaluate` at Electronics shape
  (192,403 x 63,001), on the first ``--electronics-users`` user ids (all with ``--electronics-users 0``).

Peak memory is the kernel's high-water mark ``VmHWM`` (reset through ``/proc/self/clear_refs`` before the
measured section) minus the resident size at its start; it includes XLA's buffers, which tracemalloc misses.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.data import dataset as data
from benchmarks.data import sampling
from benchmarks.perf import arguments
from benchmarks.runtime import backend, memory
from benchmarks.training import metrics

__all__ = ["DATA_ROOT", "PROG", "Options", "build_parser", "execute", "parse_args"]

#: The project's shared data directory, beside the checkout.
DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"


def _timed(fn, repeats: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out


def _random_score_fn(ds: data.Dataset, dim: int = 64, seed: int = 0):
  ku, ki = jax.random.split(jax.random.key(seed))
  users = jax.random.normal(ku, (ds.n_users, dim), jnp.float32)
  items = jax.random.normal(ki, (ds.n_items, dim), jnp.float32)
  return jax.jit(lambda uids: users[uids] @ items.T)


def _restrict_valid(ds: data.Dataset, n_users: int) -> data.Dataset:
  keep = ds.valid.user < n_users
  return data.Dataset(
    name=f"{ds.name}[:{n_users}]",
    n_users=ds.n_users,
    n_items=ds.n_items,
    train=ds.train,
    valid=data.Split(ds.valid.user[keep], ds.valid.item[keep]),
    test=ds.test,
    features=ds.features,
  )


PROG = "python -m benchmarks.data_speed"


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``python -m benchmarks.data_speed`` times, checked (:func:`parse_args`)."""

  repeats: int = 20
  eval_repeats: int = 3
  electronics_users: int = 30_000  # 0: all
  skip_electronics: bool = False


def build_parser() -> argparse.ArgumentParser:
  p = arguments.ArgumentParser(PROG, __doc__)
  p.add_argument("--repeats", type=arguments.integer(1), default=20, help="sampling epochs timed (median)")
  p.add_argument("--eval-repeats", type=arguments.integer(1), default=3, help="Baby evaluation passes timed (median)")
  p.add_argument(
    "--electronics-users",
    type=arguments.integer(0),
    default=30_000,
    help="evaluate the first N user ids at Electronics shape (0: all)",
  )
  p.add_argument("--skip-electronics", action="store_true", help="skip every Electronics-shape step")
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
  """The command line as :class:`Options`; a bad flag raises :class:`cli.UsageError` naming it."""
  args = build_parser().parse_args(argv)
  return Options(
    repeats=args.repeats,
    eval_repeats=args.eval_repeats,
    electronics_users=args.electronics_users,
    skip_electronics=args.skip_electronics,
  )


def execute(options: Options) -> None:
  """Times every step, printing each figure as it is taken (the Electronics steps take minutes)."""
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device)")

  print(f"\n== loading real data ({DATA_ROOT}) ==")
  baby = None
  for name in ("scientific", "baby"):
    path = DATA_ROOT / name
    if not path.is_dir():
      print(f"{name:11s} absent ({path})")
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      seconds, ds = _timed(lambda: data.load_mmrec(path), 3)
    print(f"{name:11s} load {seconds:.3f} s  {ds}")
    if name == "baby":
      baby = ds

  print("\n== synthetic generation ==")
  seconds, synthetic_baby = _timed(lambda: data.synthetic_preset("baby"), 1)
  print(f"baby preset (with features) {seconds:.2f} s  {synthetic_baby}")
  if baby is None:
    baby = synthetic_baby
  del synthetic_baby

  print("\n== negative sampling at Baby size ==")
  sampler = sampling.NegativeSampler(baby)
  rng = np.random.default_rng(0)
  sampler.epoch(rng)
  seconds, _ = _timed(lambda: sampler.epoch(rng), options.repeats)
  print(
    f"{baby.name}: {len(sampler):,} pairs, {baby.n_items:,} items: median {seconds:.4f} s/epoch "
    f"over {options.repeats} epochs"
  )

  print("\n== full-ranking evaluation at Baby shape (random 64-d tables, test split) ==")
  score_fn = _random_score_fn(baby)
  t = time.perf_counter()
  metrics.evaluate(score_fn, baby, "test")
  first = time.perf_counter() - t
  seconds, _ = _timed(lambda: metrics.evaluate(score_fn, baby, "test"), options.eval_repeats)
  n_eval = int(np.count_nonzero(np.diff(baby.csr("test")[0])))
  chunk = backend.eval_chunk_size(baby.n_items)
  print(
    f"{baby.name}: {n_eval:,} users x {baby.n_items:,} items, chunk {chunk}: first call (plan + compile) "
    f"{first:.2f} s, then median {seconds:.3f} s/pass ({n_eval / seconds:,.0f} users/s)"
  )

  if options.skip_electronics:
    return
  print("\n== Electronics shape ==")
  seconds, elec = _timed(lambda: data.synthetic_preset("electronics", image_dim=0, text_dim=0), 1)
  print(f"interactions only: generated in {seconds:.2f} s  {elec}")
  with tempfile.TemporaryDirectory() as tmp:
    seconds, _ = _timed(lambda: data.write_mmrec(elec, tmp), 1)
    load_seconds, _ = _timed(lambda: data.load_mmrec(tmp), 1)
  print(
    f"MMRec .inter of {len(elec.train) + len(elec.valid) + len(elec.test):,} rows: write {seconds:.2f} s, "
    f"load {load_seconds:.2f} s"
  )
  n_sub = options.electronics_users or elec.n_users
  sub = _restrict_valid(elec, n_sub) if n_sub < elec.n_users else elec
  score_fn = _random_score_fn(elec)
  jax.block_until_ready(score_fn(jnp.arange(8, dtype=jnp.int32)))
  exact = memory.reset_peak()
  rss0 = memory.status_kib("VmRSS")
  t = time.perf_counter()
  metrics.evaluate(score_fn, sub, "valid")
  first = time.perf_counter() - t
  t = time.perf_counter()
  metrics.evaluate(score_fn, sub, "valid")
  second = time.perf_counter() - t
  peak = memory.status_kib("VmHWM") - rss0
  n_eval = int(np.count_nonzero(np.diff(sub.csr("valid")[0])))
  n_all = int(np.count_nonzero(np.diff(elec.csr("valid")[0])))
  chunk = backend.eval_chunk_size(elec.n_items)
  print(
    f"evaluate (valid, {n_eval:,} of {n_all:,} users, chunk {chunk}): first call {first:.1f} s, "
    f"second {second:.1f} s = {n_eval / second:,.0f} users/s (full pass ~{n_all / (n_eval / second):.0f} s)"
  )
  print(
    f"peak RSS increase during evaluation: {peak / 2**20:.2f} GiB"
    + ("" if exact else " (VmHWM could not be reset: upper bound from process start)")
  )
  del elec, sub

  seconds, elec = _timed(lambda: data.synthetic_preset("electronics"), 1)
  print(f"full preset with features: generated in {seconds:.2f} s  {elec}")
