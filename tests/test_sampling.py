"""Tests for benchmarks.data.sampling.NegativeSampler."""

import numpy as np
import pytest

from benchmarks.data import dataset as data
from benchmarks.data.sampling import NegativeSampler


@pytest.fixture(scope="module")
def ds():
  return data.synthetic_preset("tiny", seed=1)


def _keys(user, item, n_items):
  return np.asarray(user, dtype=np.int64) * n_items + item


def test_epoch_shapes_and_dtypes(ds):
  batch = NegativeSampler(ds).epoch(np.random.default_rng(0))
  assert set(batch) == {"user", "pos", "neg"}
  for value in batch.values():
    assert value.dtype == np.int32 and value.shape == (len(ds.train),)


def test_negatives_are_never_training_items(ds):
  sampler = NegativeSampler(ds)
  train = set(_keys(ds.train.user, ds.train.item, ds.n_items).tolist())
  rng = np.random.default_rng(0)
  for _ in range(20):
    batch = sampler.epoch(rng)
    assert not train & set(_keys(batch["user"], batch["neg"], ds.n_items).tolist())
    assert batch["neg"].min() >= 0 and batch["neg"].max() < ds.n_items


def test_every_training_pair_once_per_epoch(ds):
  batch = NegativeSampler(ds).epoch(np.random.default_rng(0))
  expected = np.sort(_keys(ds.train.user, ds.train.item, ds.n_items))
  np.testing.assert_array_equal(np.sort(_keys(batch["user"], batch["pos"], ds.n_items)), expected)
  assert not np.array_equal(batch["user"], ds.train.user)  # shuffled


def test_seeding(ds):
  sampler = NegativeSampler(ds)
  a = sampler.epoch(np.random.default_rng(7))
  b = sampler.epoch(np.random.default_rng(7))
  c = sampler.epoch(np.random.default_rng(8))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["user"], c["user"]) and not np.array_equal(a["neg"], c["neg"])
  rng = np.random.default_rng(7)
  first, second = sampler.epoch(rng), sampler.epoch(rng)  # fresh order and negatives every epoch
  assert not np.array_equal(first["neg"], second["neg"])


def test_negatives_are_uniform_over_the_complement():
  # One user with training items {1, 3} out of 6: negatives uniform over {0, 2, 4, 5} (1/4 each).
  ds = data.Dataset("u", 1, 6, data.Split([0, 0], [3, 1]), data.Split([0], [0]), data.Split([0], [2]))
  counts = np.bincount(NegativeSampler(ds).negatives(np.zeros(40_000, int), np.random.default_rng(0)), minlength=6)
  assert counts[1] == counts[3] == 0
  np.testing.assert_allclose(counts[[0, 2, 4, 5]] / 40_000, 0.25, atol=0.01)


def test_user_with_every_item_is_rejected():
  ds = data.Dataset("full", 2, 3, data.Split([0, 0, 0, 1], [0, 1, 2, 0]), data.Split([1], [1]), data.Split([1], [2]))
  with pytest.raises(ValueError, match="all 3 items"):
    NegativeSampler(ds)
