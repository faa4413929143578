"""The run store: finished runs are skipped, interrupted ones resumed, changed ones never reused."""

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks.data import dataset as data_lib
from benchmarks.training import records as run_store
from benchmarks.training import loop as train_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.training.records import RunStore, StoreError, run_key
from benchmarks.training.loop import TrainConfig

CONFIG = TrainConfig(model="lightgcn", max_epochs=3, patience=3, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def tiny():
  return data_lib.synthetic_preset("tiny", seed=0)


@pytest.fixture()
def store(tmp_path):
  return RunStore(tmp_path / "records", tmp_path / "work")


def test_record_is_stored_found_and_complete(tiny, store):
  fp = dataset_fingerprint(tiny)
  assert store.get(CONFIG, fp) is None
  with store.claim(run_key(CONFIG, fp)) as held:
    assert held
    rec = store.run(tiny, CONFIG, info={"phase": "test"})
  assert store.path(rec["key"]).is_file()
  again = store.get(CONFIG, fp)
  assert again == json.loads(store.path(rec["key"]).read_text())
  assert again["test"] == rec["test"] and again["status"] == "ok" and again["info"] == {"phase": "test"}
  assert again["identity"]["data_fingerprint"] == fp
  assert again["identity"]["results_version"] == train_lib.RESULTS_VERSION
  # where it trained (not part of the identity): this process's backend, device and jax version
  assert again["platform"]["backend"] == jax.default_backend() and again["platform"]["jax"] == jax.__version__
  assert again["platform"]["device"] == jax.devices()[0].device_kind and "platform" not in again["identity"]
  assert len(again["history"]) == again["epochs"] and len(again["history"][0]) == len(again["history_fields"])
  assert not store.checkpoint_dir(CONFIG, fp).exists()  # checkpoints removed once the record is written
  # same numbers as training directly: the store adds nothing to the run
  assert train_lib.train(tiny, CONFIG, progress=False)["test"] == rec["test"]


def test_changed_config_data_or_version_is_a_different_run(tiny, store, monkeypatch):
  fp = dataset_fingerprint(tiny)
  store.run(tiny, CONFIG)
  assert store.get(CONFIG, fp) is not None
  other_cfg = TrainConfig(**{**CONFIG.__dict__, "method_hparams": {"alpha2": 0.3}})
  assert run_key(other_cfg, fp) != run_key(CONFIG, fp) and store.get(other_cfg, fp) is None
  assert store.get(TrainConfig(**{**CONFIG.__dict__, "max_epochs": 4}), fp) is None
  other_data = data_lib.synthetic_preset("tiny", seed=1)
  assert dataset_fingerprint(other_data) != fp
  assert store.get(CONFIG, dataset_fingerprint(other_data)) is None
  monkeypatch.setattr(run_store, "RESULTS_VERSION", train_lib.RESULTS_VERSION + 1)
  assert store.get(CONFIG, fp) is None  # a stale record is not mixed in
  assert len(store.stale({run_key(CONFIG, fp)})) == 1
  # execution-only fields (devices, chunking) do not make another run
  monkeypatch.undo()
  assert run_key(TrainConfig(**{**CONFIG.__dict__, "eval_chunk_size": 7}), fp) == run_key(CONFIG, fp)
  # explicit defaults are the same run as omitted ones
  assert run_key(TrainConfig(**{**CONFIG.__dict__, "method_hparams": {"alpha2": 0.2}}), fp) == run_key(CONFIG, fp)


def test_tampered_record_is_refused(tiny, store):
  fp = dataset_fingerprint(tiny)
  rec = store.run(tiny, CONFIG)
  path = store.path(rec["key"])
  data = json.loads(path.read_text())
  data["identity"]["config"]["learning_rate"] = 0.5
  data["identity"]["data_fingerprint"] = "0" * 64
  path.write_text(json.dumps(data))
  with pytest.raises(StoreError, match=r"data_fingerprint, config \(learning_rate\) differ.*delete it"):
    store.get(CONFIG, fp)
  path.write_text("{not json")
  with pytest.raises(StoreError, match="cannot be read"):
    store.get(CONFIG, fp)


def test_interrupted_run_resumes_from_its_checkpoint(tiny, store, monkeypatch):
  config = TrainConfig(**{**CONFIG.__dict__, "max_epochs": 4, "patience": 4})
  fp = dataset_fingerprint(tiny)
  calls = {"n": 0}
  real = train_lib.evaluate_params

  def dies_at_third_evaluation(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    return real(*args, **kwargs)

  monkeypatch.setattr(train_lib, "evaluate_params", dies_at_third_evaluation)
  with pytest.raises(KeyboardInterrupt):
    store.run(tiny, config, checkpoint_every=1)
  monkeypatch.undo()
  assert store.get(config, fp) is None and any(store.checkpoint_dir(config, fp).iterdir())
  rec = store.run(tiny, config, checkpoint_every=1)
  assert rec["resumed"] is True
  uninterrupted = train_lib.train(tiny, config, progress=False)
  assert rec["test"] == uninterrupted["test"] and rec["epochs"] == uninterrupted["epochs"]


def test_claims_exclude_live_owners_and_take_over_dead_ones(store):
  key = "k" * 24
  with store.claim(key) as first:
    assert first
    with store.claim(key) as second:
      assert not second  # held by a live process (this one)
  assert not (store.work_dir / f"{key}.lock").exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  import socket

  (store.work_dir / f"{key}.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
  with store.claim(key) as held:
    assert held  # the dead process's lock is taken over
  (store.work_dir / f"{key}.lock").write_text(json.dumps({"pid": os.getpid(), "host": "another-host"}))
  with store.claim(key) as held:
    assert not held  # another host's lock cannot be judged: left alone
