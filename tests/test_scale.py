"""The memory model (benchmarks.scale): exact parameter/graph/feature sizes, sharding arithmetic, the CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from benchmarks import scale as scale_command
from benchmarks.data import dataset as data_lib
from benchmarks.perf import scale
from benchmarks.training.loop import TrainConfig, build

TINY = data_lib.PRESETS["tiny"]


def _tiny_shape(model: str, ds) -> scale.Shape:
  return scale.Shape(
    users=ds.n_users,
    items=ds.n_items,
    interactions=len(ds.train) + len(ds.valid) + len(ds.test),
    train_pairs=len(ds.train),
    model=model,
    image_dim=TINY["image_dim"],
    text_dim=TINY["text_dim"],
  )


def _bytes(tree) -> int:
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("model", ["lightgcn", "vbpr", "bm3"])
def test_parameter_graph_and_feature_bytes_are_the_built_models(model):
  ds = data_lib.synthetic_preset("tiny", seed=0)
  built = build(ds, TrainConfig(model=model))
  est = scale.estimate(_tiny_shape(model, ds))["per_device"]
  assert est["parameters"] == _bytes(built.params)
  opt = built.method.tx.init(built.params)
  assert est["optimizer_state"] == _bytes(opt) - 4  # Adam's mu and nu; its int32 step count is the 4
  assert est["graph"] + est["features"] == _bytes(built.rest)  # unique training pairs: tiny has no duplicates
  tables, _ = scale.parameter_count(_tiny_shape(model, ds))
  embeds = sum(
    int(np.asarray(v).nbytes)
    for k, v in ((k, v) for k, v in jax.tree_util.tree_flatten_with_path(built.params)[0])
    if str(getattr(k[-1], "key", k[-1])) == "embedding"
  )
  assert 4 * tables == embeds


def test_sharding_divides_what_it_shards():
  base = scale.Shape(users=10**6, items=10**5, interactions=10**7, model="lightgcn", image_dim=0, text_dim=0)
  one = scale.estimate(base)
  rep8 = scale.estimate(dataclasses.replace(base, devices=8))
  sh8 = scale.estimate(dataclasses.replace(base, devices=8, shard_tables=True))
  assert rep8["per_device"]["parameters"] == one["per_device"]["parameters"]  # replicated: every device has all
  assert sh8["per_device"]["parameters"] == one["per_device"]["parameters"] / 8
  assert sh8["per_device"]["optimizer_state"] == 2 * sh8["per_device"]["parameters"]
  assert sh8["per_device"]["graph"] == one["per_device"]["graph"] == 12 * 2 * base.n_train
  assert sh8["per_device"]["batches"] == one["per_device"]["batches"] / 8
  assert sh8["peak_per_device"] < rep8["peak_per_device"] < one["peak_per_device"] * 1.01
  assert sh8["peak_per_device"] > sh8["replicated_per_device"]
  # a CPU process holds its devices' memory too; on a GPU the process peak is the host arrays only
  assert one["peak_per_process"] > one["peak_per_device"]
  gpu = scale.estimate(dataclasses.replace(base, backend="gpu"))
  assert gpu["peak_per_process"] < gpu["peak_per_device"] and gpu["eval_chunk_users"] == 2**28 // 10**5 // 8 * 8
  assert gpu["per_device"]["activations"] > one["per_device"]["activations"]  # one segment_sum: all messages


def test_devices_needed_and_largest_fitting():
  big = scale.Shape(
    users=10**8,
    items=10**7,
    interactions=10**9,
    model="lightgcn",
    image_dim=0,
    text_dim=0,
    shard_tables=True,
    backend="gpu",
  )
  assert scale.devices_needed(big, 80 * scale.GIB) is None  # the replicated part alone exceeds 80 GiB
  chunked = dataclasses.replace(big, propagation_chunk_mib=1024)
  assert scale.devices_needed(chunked, 80 * scale.GIB) is None  # the gathered activations still do
  ideal = dataclasses.replace(chunked, fully_sharded=True)
  k = scale.devices_needed(ideal, 80 * scale.GIB)
  assert k is not None and k > 1
  assert scale.estimate(dataclasses.replace(ideal, devices=k))["peak_per_device"] <= 80 * scale.GIB
  assert scale.estimate(dataclasses.replace(ideal, devices=k - 1))["peak_per_device"] > 80 * scale.GIB
  with pytest.raises(ValueError, match="what-if of --shard-tables"):
    scale.estimate(dataclasses.replace(ideal, shard_tables=False))
  host = scale.Shape(users=192_403, items=63_001, interactions=1_689_188, image_dim=0, text_dim=0)
  factor, shape = scale.largest_fitting(host, 24 * scale.GIB, per_process=True)
  assert factor > 1
  assert scale.estimate(shape)["peak_per_process"] <= 24 * scale.GIB
  bigger = dataclasses.replace(
    shape, users=int(shape.users * 1.01), items=int(shape.items * 1.01), interactions=int(shape.interactions * 1.01)
  )
  assert scale.estimate(bigger)["peak_per_process"] > 24 * scale.GIB


def test_cli(tmp_path, capsys):
  out = tmp_path / "s.json"
  r = scale_command.main(
    [
      "--users",
      "1e6",
      "--items",
      "1e5",
      "--interactions",
      "1e7",
      "--model",
      "lightgcn",
      "--devices",
      "4",
      "--shard-tables",
      "--backend",
      "gpu",
      "--memory-gib",
      "80",
      "--json",
      str(out),
    ]
  )
  text = capsys.readouterr().out
  for part in (
    "parameters",
    "optimizer state",
    "graph",
    "features",
    "evaluation",
    "PEAK per device",
    "80 GiB per device: fits",
    "devices needed: 1",
  ):
    assert part in text, text
  assert json.loads(out.read_text())["estimate"]["shape"]["devices"] == 4 and r["fits"]
  scale_command.main(["--preset", "baby", "--model", "vbpr"])
  assert "19,445 users x 7,050 items" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    scale_command.main(["--users", "10"])
  with pytest.raises(SystemExit):
    scale_command.main(
      [
        "--users",
        "10",
        "--items",
        "5",
        "--interactions",
        "30",
        "--model",
        "vbpr",
        "--image-dim",
        "0",
        "--text-dim",
        "0",
      ]
    )


def test_measurement_smoke_at_the_tiny_shape():
  """The measuring path works; the runtime constant was calibrated at this shape, so this is no validation
  (the Baby/Electronics comparison is in the README)."""
  rec = scale.measure("tiny", "lightgcn", timeout_s=300)
  assert rec["train_pairs"] == 465 and rec["peak_rss_mib"] > 100 and rec["recall@20"]["test"] > 0
  model = scale.estimate(scale.shape_of(rec))["peak_per_process"] / scale.MIB
  assert abs(model / rec["peak_rss_mib"] - 1) <= 0.25, (model, rec["peak_rss_mib"])
