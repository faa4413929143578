"""The training loop: one step for every method, early stopping, grid choice (resume after kill: test_rerun.py)."""

import math

import jax
import numpy as np
import pytest

from benchmarks.data import dataset as data_lib
from benchmarks.training.methods import METHODS, make_method
from benchmarks.training.loop import EarlyStopping, TrainConfig, build, grid_search, train


@pytest.fixture(scope="module")
def tiny():
  return data_lib.synthetic_preset("tiny", seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_train_runs_every_method_through_one_step(tiny, method):
  config = TrainConfig(model="lightgcn", method=method, max_epochs=2, batch_size=64, seed=0, method_hparams={"beta": 3})
  before = jax.tree.map(np.asarray, build(tiny, config).params)
  record = train(tiny, config, progress=False)
  n_batches = math.ceil(len(tiny.train) / 64)
  assert record["updates"] == 2 * n_batches
  expected_evals = {"plain": 1.0, "mg": None, "sam": 2.0, "gnp": 2.0}[method]
  if method == "mg":
    assert record["grad_evals"] == record["updates"] + math.ceil(record["updates"] / 3)
  else:
    assert record["grad_evals_per_update"] == expected_evals
  assert len(record["history"]) == 2
  assert all(math.isfinite(h["loss"]) for h in record["history"])
  for k in ("recall@20", "ndcg@5", "map@50", "precision@10"):
    assert 0.0 <= record["test"][k] <= 1.0
  assert before  # parameters existed; training moved them (loss history is finite and non-constant)
  assert record["history"][0]["loss"] != record["history"][1]["loss"]


def test_methods_differ_from_plain_only_by_their_transformation(tiny):
  """Same seed -> plain and MG with beta so large that only step 0 mirrors differ only there."""
  base = TrainConfig(model="lightgcn", max_epochs=1, batch_size=64, seed=3)
  plain = train(tiny, base, progress=False)
  again = train(tiny, base, progress=False)
  assert plain["test"] == again["test"]  # same seed, same run
  mg = train(tiny, TrainConfig(**{**base.__dict__, "method": "mg"}), progress=False)
  assert mg["history"][0]["loss"] != plain["history"][0]["loss"] or mg["test"] != plain["test"]


def test_early_stopping_follows_mmrec_rule():
  stopper = EarlyStopping(patience=2)
  outcomes = [stopper.update(v, e) for e, v in enumerate([0.1, 0.2, 0.2, 0.15, 0.19])]
  assert outcomes == [(True, False), (True, False), (False, False), (False, False), (False, True)]
  assert stopper.best == 0.2 and stopper.best_epoch == 1


def test_training_stops_early_and_reports_best_epoch(tiny):
  record = train(
    tiny, TrainConfig(model="lightgcn", max_epochs=200, patience=1, batch_size=64, learning_rate=0.05), progress=False
  )
  assert record["epochs"] < 200
  best = max(h["valid"]["recall@20"] for h in record["history"])
  assert record["valid"]["recall@20"] == best
  assert record["history"][record["best_epoch"]]["valid"]["recall@20"] == best
  # stopped exactly patience + 1 evaluations after the best one (or ran out of epochs)
  assert record["epochs"] - 1 - record["best_epoch"] == 2


def test_grid_picks_the_winner_on_validation_not_test(tiny):
  def fake_run(ds, config, **kwargs):
    reg = config.model_hparams["reg_weight"]
    # reg 0.1 wins on validation but loses on test
    valid = {"recall@20": {0.1: 0.5, 0.01: 0.4}[reg]}
    test = {"recall@20": {0.1: 0.1, 0.01: 0.9}[reg]}
    return {"valid": valid, "test": test, "seed": config.seed}

  point, records = grid_search(tiny, TrainConfig(), {"reg_weight": [0.01, 0.1]}, seeds=[0, 1], run=fake_run)
  assert point == {"reg_weight": 0.1}
  assert [r["seed"] for r in records] == [0, 1]
  assert all(r["grid_point"] == {"reg_weight": 0.1} for r in records)


def test_grid_routes_method_and_config_hyperparameters(tiny):
  seen = []

  def fake_run(ds, config, **kwargs):
    seen.append((config.learning_rate, config.method_hparams["alpha2"], config.model_hparams["n_layers"]))
    return {"valid": {"recall@20": 0.0}, "test": {}}

  grid_search(tiny, TrainConfig(), {"learning_rate": [0.1], "alpha2": [0.3], "n_layers": [2]}, [0], run=fake_run)
  assert seen == [(0.1, 0.3, 2)]


def test_bad_config_errors():
  with pytest.raises(ValueError, match="unknown valid_metric 'hits@3'"):
    TrainConfig(valid_metric="hits@3")
  with pytest.raises(ValueError, match=r"unknown method hyper-parameter\(s\) \['gamma'\]"):
    TrainConfig(method_hparams={"gamma": 1})
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match="unknown method 'adamw'; valid names: plain, mg, sam, gnp"):
    make_method("adamw")
  with pytest.raises(ValueError, match="unknown optimizer 'lion'; valid names: adam, sgd, rmsprop, adagrad"):
    make_method("mg", optimizer="lion")


# The command-level resume after a real kill -9 (python -m benchmarks.compare run again): tests/test_rerun.py.
