"""Study statistics: scipy's tests on fixed numbers, Holm's adjustment, and effects planted in real training."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.data import dataset as data_lib
from benchmarks.study import stats
from benchmarks.training.loop import TrainConfig, train


def test_t_interval_matches_the_textbook_formula():
  d = np.array([1.2, -0.4, 2.5, 0.8, 1.9, -0.1, 0.6])
  s = stats.summarize_paired(d)
  n, mean, sd = d.size, d.mean(), d.std(ddof=1)
  half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
  np.testing.assert_allclose(s.t_ci, (mean - half, mean + half), rtol=1e-12)
  assert s.mean == pytest.approx(mean)
  assert (s.n, s.wins, s.losses, s.ties) == (7, 5, 2, 0)
  t = mean / (sd / math.sqrt(n))
  assert s.t_p == pytest.approx(2 * sps.t.sf(abs(t), n - 1))


def test_mean_interval_matches_the_textbook_formula():
  v = np.array([0.031, 0.029, 0.034, 0.030])
  mean, (lo, hi) = stats.mean_ci(v)
  half = sps.t.ppf(0.975, 3) * v.std(ddof=1) / 2
  assert mean == pytest.approx(v.mean())
  np.testing.assert_allclose((lo, hi), (v.mean() - half, v.mean() + half), rtol=1e-12)
  assert stats.mean_ci([0.2, 0.2]) == (0.2, (0.2, 0.2))
  assert all(math.isnan(x) for x in stats.mean_ci([0.2])[1])
  with pytest.raises(ValueError, match="finite"):
    stats.mean_ci([0.2, math.nan])


def test_wilcoxon_p_is_the_exact_signed_rank_value():
  # |d| ranks 1..6, only the smallest negative: W- = 1; exact two-sided p = 2 * P(W <= 1) = 2 * 2 / 2^6
  s = stats.summarize_paired([1.0, 2.0, 3.0, 4.0, 5.0, -0.5])
  assert s.wilcoxon_p == pytest.approx(2 * 2 / 64)


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
  rng = np.random.default_rng(4)
  d = rng.normal(1.0, 2.0, size=15)
  a, b = stats.summarize_paired(d), stats.summarize_paired(d)
  assert a.boot_ci == b.boot_ci
  lo, hi = a.boot_ci
  assert lo < d.mean() < hi
  # BCa and t intervals roughly agree on normal data
  assert abs((hi - lo) - (a.t_ci[1] - a.t_ci[0])) < 0.5 * (a.t_ci[1] - a.t_ci[0])


def test_no_bootstrap_interval_from_fewer_than_five_pairs():
  # below MIN_BOOTSTRAP_N the bootstrap is little more than the observed range: it is left out, the t
  # interval (honestly wide) stays
  for d in ([1.2, 3.7], [1.2, 3.7, -0.4], [1.2, 3.7, -0.4, 2.0]):
    s = stats.summarize_paired(d)
    assert all(math.isnan(x) for x in s.boot_ci)
    assert s.t_ci[0] < min(d) and s.t_ci[1] > max(d)
  five = stats.summarize_paired([1.2, 3.7, -0.4, 2.0, 0.9])
  assert five.boot_ci[0] < five.mean < five.boot_ci[1]


def test_degenerate_inputs():
  one = stats.summarize_paired([2.0])
  assert one.n == 1 and one.mean == 2.0 and math.isnan(one.t_ci[0]) and math.isnan(one.wilcoxon_p)
  zeros = stats.summarize_paired([0.0, 0.0, 0.0])
  assert zeros.t_ci == (0.0, 0.0) and zeros.wilcoxon_p == 1.0 and zeros.ties == 3
  with pytest.raises(ValueError, match="finite"):
    stats.summarize_paired([1.0, math.nan])


def test_holm_known_values():
  # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  out = stats.holm([0.2, math.nan, 0.9])
  np.testing.assert_allclose(out[[0, 2]], [0.4, 0.9])
  assert math.isnan(out[1])
  assert stats.holm([0.6, 0.7]).tolist() == [1.0, 1.0]


def test_seeds_for_power_matches_published_sample_sizes():
  # G*Power / Cohen's tables, one-sample (paired) t, two-sided 5 %, power 80 %: d = 0.2, 0.5, 0.8, 1.0
  for d, n in ((0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)):
    assert stats.seeds_for_power(d * 3.0, 3.0) == n  # only effect / sd matters
    assert stats.seeds_for_power(-d, 1.0) == n  # a two-sided test: the sign does not
  # the returned n is the smallest with enough power
  n = stats.seeds_for_power(2.2, 3.6)
  assert stats.paired_t_power(n, 2.2, 3.6) >= 0.8 > stats.paired_t_power(n - 1, 2.2, 3.6)
  assert stats.seeds_for_power(0.0, 1.0) == math.inf and stats.seeds_for_power(1.0, 0.0) == 2
  assert stats.seeds_for_power(1e-3, 1.0, max_n=1000) == math.inf


def test_paired_t_power_agrees_with_simulation():
  rng = np.random.default_rng(0)
  n, effect, sd = 12, 2.0, 3.0
  d = rng.normal(effect, sd, size=(20000, n))
  simulated = np.mean(sps.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
  assert stats.paired_t_power(n, effect, sd) == pytest.approx(simulated, abs=0.01)


def test_seeds_for_power_errors():
  with pytest.raises(ValueError, match="sd"):
    stats.seeds_for_power(1.0, -1.0)
  with pytest.raises(ValueError, match="power must be in"):
    stats.seeds_for_power(1.0, 1.0, power=1.0)
  with pytest.raises(ValueError, match="alpha must be in"):
    stats.seeds_for_power(1.0, 1.0, alpha=0.0)
  with pytest.raises(ValueError, match="n >= 2"):
    stats.paired_t_power(1, 1.0, 1.0)


def test_relative_change_and_best_of_k():
  np.testing.assert_allclose(stats.relative_change([1.1, 0.9], [1.0, 1.0]), [10.0, -10.0])
  with pytest.raises(ValueError, match="positive"):
    stats.relative_change([1.0], [0.0])
  cand = np.array([[1.0, 1.2, 0.9], [2.0, 1.0, 1.5]])
  np.testing.assert_allclose(stats.best_of_k_gain(cand, np.array([1.0, 2.0])), [20.0, 0.0])
  # chosen by another metric: row 0 picks column 2, row 1 column 1
  select = np.array([[0, 0, 1], [0, 1, 0]])
  np.testing.assert_allclose(stats.best_of_k_gain(cand, np.array([1.0, 2.0]), select), [-10.0, -50.0])


@pytest.fixture(scope="module")
def planted():
  """LightGCN on tiny synthetic data, 5 seeds: a working learning rate (1e-2), a crippled one (1e-7), and the
  working one in another data order (an A/A pair)."""
  ds = data_lib.synthetic_preset("tiny", seed=0)
  out = {"plain": [], "crippled": [], "aa": []}
  for seed in range(5):
    base = dict(model="lightgcn", max_epochs=4, patience=4, batch_size=64, seed=seed, learning_rate=1e-2)
    out["plain"].append(train(ds, TrainConfig(**base), progress=False)["test"]["recall@20"])
    out["crippled"].append(
      train(ds, TrainConfig(**{**base, "learning_rate": 1e-7}), progress=False)["test"]["recall@20"]
    )
    out["aa"].append(train(ds, TrainConfig(**base, order_seed=1), progress=False)["test"]["recall@20"])
  return out


def test_planted_effect_is_detected(planted):
  s = stats.summarize_paired(stats.relative_change(planted["crippled"], planted["plain"]))
  assert s.excludes_zero() and s.t_ci[1] < 0, s


def test_aa_comparison_covers_zero(planted):
  s = stats.summarize_paired(stats.relative_change(planted["aa"], planted["plain"]))
  assert s.t_ci[0] < 0 < s.t_ci[1], s
  assert planted["aa"] != planted["plain"]  # another data order really is another run
