"""Backend-dependent defaults (benchmarks.runtime.backend), tested by faking the backend; the device check on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks.runtime import backend
from benchmarks.training import kernels
from benchmarks.data import dataset as data_lib
from benchmarks.training import metrics
from benchmarks.training import loop as train
from benchmarks.training.loop import TrainConfig, build
from models import graph

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["cpu", "gpu", "tpu"])
def fake_backend(request, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: request.param)
  return request.param


def test_defaults_per_backend(fake_backend):
  accel = fake_backend != "cpu"
  assert backend.platform() == fake_backend and backend.is_accelerator() == accel
  assert kernels.propagation_kernel() == ("segment_sum" if accel else "chunked")
  assert backend.eval_chunk_size(7050) == (32768 if accel else 888)  # Baby: 1 GiB / 24 MiB of scores
  assert backend.eval_chunk_size(63_001) == (4256 if accel else 96)  # Electronics
  assert backend.eval_chunk_size(10**9) == 8
  assert kernels.propagation_chunk_size(238_850, 64) == (238_850 if accel else 16_384)
  d = kernels.describe(n_items=7050, n_edges=238_850)
  assert d["platform"] == fake_backend and d["propagation"] == kernels.propagation_kernel()
  assert d["eval_chunk_users"] == backend.eval_chunk_size(7050)


def test_explicit_platform_argument_ignores_the_running_backend():
  assert kernels.propagation_kernel("gpu") == "segment_sum"
  assert backend.eval_chunk_size(7050, "cpu") == 888 and backend.eval_chunk_size(7050, "gpu") == 32768


def test_evaluate_takes_its_chunk_from_the_backend_module(monkeypatch):
  ds = data_lib.synthetic_preset("tiny")
  asked = []
  real = backend.eval_chunk_size
  monkeypatch.setattr(backend, "eval_chunk_size", lambda n, *a: asked.append(n) or real(n, *a))
  scores = jnp.asarray(np.random.default_rng(0).random((ds.n_users, ds.n_items)), jnp.float32)
  auto = metrics.evaluate(lambda u: scores[u], ds, "valid")
  assert asked == [ds.n_items]  # one rule for the chunk, in benchmarks.runtime.backend
  assert auto == pytest.approx(metrics.evaluate(lambda u: scores[u], ds, "valid", chunk_size=8))


def test_graph_chunking_is_the_backend_modules(fake_backend):
  assert graph.CHUNK_BYTES == kernels.CPU_PROPAGATION_CHUNK_BYTES
  n_nodes, n_edges, dim = 50, 40_000, 64
  rng = np.random.default_rng(0)
  rows = jnp.asarray(np.sort(rng.integers(0, n_nodes, n_edges)), jnp.int32)
  cols = jnp.asarray(rng.integers(0, n_nodes, n_edges), jnp.int32)
  vals = jnp.asarray(rng.random(n_edges), jnp.float32)
  x = jnp.ones((n_nodes, dim), jnp.float32)
  # a fresh function: make_jaxpr caches traces by function, and the fake backend is not part of the key
  jaxpr = str(jax.make_jaxpr(lambda *a: graph.propagate_chunked(*a))(x, rows, cols, vals))
  chunks = -(-n_edges // kernels.propagation_chunk_size(n_edges, dim))
  assert ("scan" in jaxpr) == (chunks > 1)  # CPU: 3 chunks of 16,384 edges; accelerators: one segment_sum
  if chunks > 1:
    assert f"length={chunks}" in jaxpr


def test_build_takes_the_backend_propagation_kernel(fake_backend):
  ds = data_lib.synthetic_preset("tiny", seed=0)
  built = build(ds, TrainConfig(model="lightgcn"))
  assert nnx_merge(built).graph.kernel == kernels.propagation_kernel()
  explicit = build(ds, TrainConfig(model="lightgcn", model_hparams={"propagation": "sparse"}))
  assert nnx_merge(explicit).graph.kernel == "sparse"  # a run's own choice wins
  assert kernels.model_defaults(models.get_model("vbpr")) == {}  # no graph, no kernel
  assert kernels.model_defaults(models.get_model("bm3")) == {"propagation": kernels.propagation_kernel()}


def nnx_merge(built):
  from flax import nnx

  return nnx.merge(built.graphdef, built.params, built.rest)


def test_training_evaluation_chunk_comes_from_the_backend_module(monkeypatch):
  seen = []
  monkeypatch.setattr(backend, "eval_chunk_size", lambda n_items, platform_name=None: 16)
  monkeypatch.setattr(train, "evaluate", lambda score_fn, ds, split, ks, chunk_size: seen.append(chunk_size) or {})
  ds = data_lib.synthetic_preset("tiny", seed=0)
  built = build(ds, TrainConfig(model="lightgcn"))
  _, embed = train.make_train_fns(built.graphdef, built.method.tx)
  train.evaluate_params(embed, built.params, built.rest, ds, "valid", None)
  train.evaluate_params(embed, built.params, built.rest, ds, "valid", 24)
  assert seen == [16, 24]


def test_device_check_quick_runs_on_cpu(tmp_path):
  out = tmp_path / "check.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.device_check", "--quick", "--json", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(out.read_text())
  assert summary == json.loads(proc.stdout[proc.stdout.index("{") :])
  assert summary["ok"], json.dumps(summary["stages"], indent=1)[-3000:]
  assert summary["backend"]["platform"] == "cpu" and summary["mode"] == "quick"
  stages = summary["stages"]
  table = stages["ratios"]["table"]["lightgcn1"]
  assert table["plain_step_ms"] > 0 and table["mg_beta3_ratio"] > 0 and table["sam_ratio"] > 0
  assert stages["electronics"]["epoch_s"] > 0 and stages["electronics"]["eval_s"] > 0
  assert stages["electronics"]["memory"]["source"] == "peak RSS of this process"  # CPU: no device figure
  assert stages["tests"]["returncode"] == 0 and "passed" in stages["tests"]["summary"], stages["tests"]
  assert "gpu" not in json.dumps(summary).lower()  # nothing about a GPU is reported from a CPU run
