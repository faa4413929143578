"""Tests for benchmarks.metrics: hand-computed MMRec metrics and the chunked full-ranking evaluator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.data import dataset as data
from benchmarks.training import metrics

KS = (1, 3, 5)
# Six items ranked 0, 1, 2, 3, 4, 5 (score 6 - item id).
RANKED = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
LOG3 = math.log2(3.0)  # discount of rank 2 is 1/log2(3) = 0.6309298; rank 3: 1/log2(4) = 0.5


def _expect(result, expected):
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=1e-6), key


def test_metric_keys_and_order():
  result = metrics.topk_metrics(RANKED, [np.array([0])], ks=(5, 1))
  assert (
    list(result)
    == metrics.metric_names((1, 5))
    == ["recall@1", "recall@5", "ndcg@1", "ndcg@5", "precision@1", "precision@5", "map@1", "map@5"]
  )
  assert all(isinstance(v, float) for v in result.values())


def test_fewer_relevant_than_k():
  # T = {0, 2}: hits at ranks 1 and 3.
  # k=1 (|T| > k): H=1, recall 1/2, precision 1, ndcg 1/1, map (1/1)/min(2,1) = 1.
  # k=3 (|T| < k): H=2, recall 1, precision 2/3, DCG = 1 + 1/2 = 1.5, IDCG = 1 + 1/log2(3) = 1.6309298,
  #   ndcg = 0.9197208, map = (1/1 + 2/3) / min(2,3) = 0.8333333.
  # k=5: same hits; precision 2/5.
  result = metrics.topk_metrics(RANKED, [np.array([2, 0])], ks=KS)
  idcg = 1 + 1 / LOG3
  _expect(
    result,
    {
      "recall@1": 0.5,
      "precision@1": 1.0,
      "ndcg@1": 1.0,
      "map@1": 1.0,
      "recall@3": 1.0,
      "precision@3": 2 / 3,
      "ndcg@3": 1.5 / idcg,
      "map@3": (1 + 2 / 3) / 2,
      "recall@5": 1.0,
      "precision@5": 0.4,
      "ndcg@5": 1.5 / idcg,
      "map@5": (1 + 2 / 3) / 2,
    },
  )
  assert result["ndcg@3"] == pytest.approx(0.9197208, abs=1e-6)


def test_as_many_relevant_as_k():
  # T = {1, 3, 4}: hits at ranks 2, 4, 5.
  # k=1: no hit -> all zero.
  # k=3 (|T| = k): H=1, recall 1/3, precision 1/3, DCG = 1/log2(3) = 0.6309298,
  #   IDCG = 1 + 0.6309298 + 0.5 = 2.1309298, ndcg = 0.2960819, map = (1/2) / 3 = 0.1666667.
  # k=5 (|T| < k): H=3, recall 1, precision 3/5, DCG = 0.6309298 + 1/log2(5) (0.4306766)
  #   + 1/log2(6) (0.3868528) = 1.4484592, ndcg = 1.4484592 / 2.1309298 = 0.6797311,
  #   map = (1/2 + 2/4 + 3/5) / 3 = 0.5333333.
  result = metrics.topk_metrics(RANKED, [np.array([1, 3, 4])], ks=KS)
  idcg = 1 + 1 / LOG3 + 0.5
  dcg5 = 1 / LOG3 + 1 / math.log2(5) + 1 / math.log2(6)
  _expect(
    result,
    {
      "recall@1": 0.0,
      "precision@1": 0.0,
      "ndcg@1": 0.0,
      "map@1": 0.0,
      "recall@3": 1 / 3,
      "precision@3": 1 / 3,
      "ndcg@3": (1 / LOG3) / idcg,
      "map@3": 0.5 / 3,
      "recall@5": 1.0,
      "precision@5": 0.6,
      "ndcg@5": dcg5 / idcg,
      "map@5": 1.6 / 3,
    },
  )
  assert result["ndcg@3"] == pytest.approx(0.2960819, abs=1e-6)
  assert result["ndcg@5"] == pytest.approx(0.6797311, abs=1e-6)


def test_more_relevant_than_k_all_hits():
  # T = {0, 1, 2, 3, 4} (|T| = 5 > 1, 3): every ranked item is a hit.
  # recall@k = k/5 (uncapped: recall@1 = 0.2), precision 1, ndcg 1 (IDCG over min(5, k)), map 1.
  result = metrics.topk_metrics(RANKED, [np.arange(5)], ks=KS)
  _expect(result, {f"recall@{k}": k / 5 for k in KS})
  _expect(result, {f"{m}@{k}": 1.0 for m in ("precision", "ndcg", "map") for k in KS})


def test_no_hits():
  # T = {5} is ranked 6th: nothing in the top 5.
  result = metrics.topk_metrics(RANKED, [np.array([5])], ks=KS)
  assert all(v == 0.0 for v in result.values())


def test_average_skips_rows_without_relevant_items():
  # Rows: T={2,0} (recall@1 1/2), T={} (excluded), T={5} (recall@1 0), T={0..4} (recall@1 1/5)
  # -> recall@1 = (0.5 + 0 + 0.2) / 3 = 0.2333333; precision@3 = (2/3 + 0 + 1) / 3 = 0.5555556.
  scores = np.repeat(RANKED, 4, axis=0)
  relevant = [np.array([2, 0]), np.array([], dtype=int), np.array([5]), np.arange(5)]
  result = metrics.topk_metrics(jnp.asarray(scores), relevant, ks=KS)
  assert result["recall@1"] == pytest.approx(0.7 / 3, abs=1e-6)
  assert result["precision@3"] == pytest.approx((2 / 3 + 1) / 3, abs=1e-6)
  with pytest.raises(ValueError, match="no row has a relevant item"):
    metrics.topk_metrics(scores[:1], [np.array([], dtype=int)], ks=KS)


def test_excluded_items_and_ties():
  # Item 0 excluded (-inf); items 1..3 tie -> ranked by lower id first: 1, 2, 3, then 4, 5, 0.
  scores = np.array([[-np.inf, 1.0, 1.0, 1.0, 0.5, 0.0]], dtype=np.float32)
  result = metrics.topk_metrics(scores, [np.array([3])], ks=(1, 3))
  _expect(result, {"recall@1": 0.0, "recall@3": 1.0, "map@3": 1 / 3, "ndcg@3": 0.5})


def test_k_larger_than_n_items():
  # 6 items, k=10: H=2 hits at ranks 1 and 3 -> precision@10 = 2/10.
  result = metrics.topk_metrics(RANKED, [np.array([0, 2])], ks=(10,))
  _expect(result, {"recall@10": 1.0, "precision@10": 0.2, "map@10": (1 + 2 / 3) / 2})


def test_bad_arguments():
  with pytest.raises(ValueError, match="rows"):
    metrics.topk_metrics(RANKED, [np.array([0]), np.array([1])])
  with pytest.raises(ValueError, match="n_items"):
    metrics.topk_metrics(RANKED, [np.array([6])])
  with pytest.raises(ValueError, match="ks"):
    metrics.topk_metrics(RANKED, [np.array([0])], ks=(0,))


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  return data.synthetic_preset("tiny", seed=3)


def _table_score_fn(table, calls=None):
  table = jnp.asarray(table)

  def score_fn(users):
    if calls is not None:
      calls.append(users.shape)
    return table[users]

  return score_fn


def _reference(ds, table, split, ks):
  masked = np.array(table, dtype=np.float32)
  for u, items in enumerate(ds.train_items_by_user):
    masked[u, items] = -np.inf
  return metrics.topk_metrics(masked, ds.items_by_user(split), ks=ks)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 60, 1000])
def test_chunked_evaluate_equals_full_ranking(tiny, chunk_size):
  table = np.random.default_rng(0).standard_normal((tiny.n_users, tiny.n_items)).astype(np.float32)
  ks = (5, 10, 20, 50)
  calls = []
  result = metrics.evaluate(_table_score_fn(table, calls), tiny, "test", ks=ks, chunk_size=chunk_size)
  expected = _reference(tiny, table, "test", ks)
  assert result.keys() == expected.keys()
  np.testing.assert_allclose([result[k] for k in result], [expected[k] for k in result], rtol=1e-6, atol=1e-9)
  assert len(set(calls)) == 1  # every chunk (the last one padded) has the same shape


def test_evaluate_masks_training_items(tiny):
  # Training items get the highest scores and valid items the next highest: after masking, every valid item
  # is ranked first, so recall@50 = ndcg@50 = map@50 = 1 and precision@5 = mean(min(|T_u|, 5) / 5).
  table = np.random.default_rng(1).uniform(size=(tiny.n_users, tiny.n_items)).astype(np.float32)
  for u in range(tiny.n_users):
    table[u, tiny.train_items_by_user[u]] = 100.0
    table[u, tiny.valid_items_by_user[u]] = 50.0
  result = metrics.evaluate(_table_score_fn(table), tiny, "valid", chunk_size=16)
  assert result["recall@50"] == pytest.approx(1.0)
  assert result["ndcg@50"] == pytest.approx(1.0)
  assert result["map@50"] == pytest.approx(1.0)
  rows = np.flatnonzero([len(v) for v in tiny.valid_items_by_user])
  sizes = np.array([len(tiny.valid_items_by_user[u]) for u in rows])
  assert result["precision@5"] == pytest.approx(np.mean(np.minimum(sizes, 5) / 5), abs=1e-6)
  unmasked = metrics.topk_metrics(table[rows], [tiny.valid_items_by_user[u] for u in rows], ks=(1, 5))
  # without the mask a training item (>= 3 per user, score 100) is always ranked first
  assert unmasked["precision@1"] == 0.0 and unmasked["recall@5"] < result["recall@5"]


def test_evaluate_only_users_with_items_in_split(tiny):
  # A user whose valid items are removed is not evaluated: scores that are perfect for everyone except that
  # user give 1.0 once the user is gone.
  keep = tiny.valid.user != 0
  ds = data.Dataset(
    tiny.name,
    tiny.n_users,
    tiny.n_items,
    tiny.train,
    data.Split(tiny.valid.user[keep], tiny.valid.item[keep]),
    tiny.test,
  )
  table = np.zeros((ds.n_users, ds.n_items), dtype=np.float32)
  for u, items in enumerate(ds.valid_items_by_user):
    table[u, items] = 1.0
  table[0] = 0.0
  assert metrics.evaluate(_table_score_fn(table), ds, "valid", ks=(50,))["recall@50"] == pytest.approx(1.0)


def test_evaluate_accepts_jitted_score_fn_and_checks_shape(tiny):
  users = jax.random.normal(jax.random.key(0), (tiny.n_users, 8))
  items = jax.random.normal(jax.random.key(1), (tiny.n_items, 8))
  score_fn = jax.jit(lambda u: users[u] @ items.T)
  result = metrics.evaluate(score_fn, tiny, "test", chunk_size=32)
  assert 0.0 <= result["recall@20"] <= 1.0
  with pytest.raises(ValueError, match="shape"):
    metrics.evaluate(lambda u: jnp.zeros((u.shape[0], 3)), tiny, "test")
  with pytest.raises(ValueError, match="split"):
    metrics.evaluate(score_fn, tiny, "train")
