"""Paired statistics for method comparisons: relative change per seed, its confidence intervals and tests.

Two training runs with the same seed share their initialisation and data order, so a method is
compared with plain training by the per-seed relative change

    d_s = 100 * (m_s - p_s) / p_s        (%; m_s, p_s: the test metric of the method and of plain, seed s)

and summarised (:func:`summarize_paired`) by the mean of ``d`` with a 95 % confidence interval from
the paired t distribution (``scipy.stats.ttest_1samp``) and a bootstrap interval (``scipy.stats.bootstrap``,
BCa; only from :data:`MIN_BOOTSTRAP_N` pairs on), the Wilcoxon signed-rank p-value
(``scipy.stats.wilcoxon``, two-sided) and wins / losses. p-values of all comparisons of a study are
adjusted together with Holm's step-down method (:func:`holm`), which controls the family-wise error
rate without assuming independence.

:func:`best_of_k_gain` is the A/A control of "pick the best of k variants on test, report it against one
baseline run": the gain that selection reports when every variant is a no-op.

:func:`seeds_for_power` answers the planning question beside a published gain: how many paired seeds a
two-sided paired t test needs to detect an effect of that size, given the spread of the per-seed changes
seen so far.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

__all__ = [
  "MIN_BOOTSTRAP_N",
  "PairedSummary",
  "best_of_k_gain",
  "holm",
  "mean_ci",
  "paired_t_power",
  "relative_change",
  "seeds_for_power",
  "summarize_paired",
]


MIN_BOOTSTRAP_N = 5
"""Fewest pairs a bootstrap interval is computed from. Resampling n values gives at most
``C(2n - 1, n)`` distinct resamples (3 for n = 2, 10 for 3, 35 for 4), so below 5 the 2.5 % and 97.5 %
quantiles of the bootstrap means are the few most extreme resamples and the "interval" is little more
than the observed range -- e.g. n = 2 gave [+1.4, +3.5] beside the t interval's [-10.6, +15.5]. It
would look far more certain than the data are, so it is not reported (nan) for smaller n."""


def relative_change(method: Sequence[float], plain: Sequence[float]) -> np.ndarray:
  """Per-seed relative change ``100 * (method - plain) / plain`` in %.

  Raises:
    ValueError: the sequences differ in length, or a plain value is not positive (a relative change
      from 0 is undefined).
  """
  m, p = np.asarray(method, dtype=np.float64), np.asarray(plain, dtype=np.float64)
  if m.shape != p.shape or m.ndim != 1:
    raise ValueError(f"method and plain must be 1-D of equal length, got shapes {m.shape} and {p.shape}")
  if np.any(p <= 0):
    raise ValueError(f"plain values must be positive for a relative change, got {p[p <= 0].tolist()}")
  return 100.0 * (m - p) / p


@dataclasses.dataclass(frozen=True)
class PairedSummary:
  """Summary of paired differences ``d`` (one per seed).

  Attributes:
    n: number of pairs.
    mean: mean of ``d``.
    t_ci: 95 % (``confidence``) interval of the mean from the t distribution with ``n - 1`` degrees of
      freedom; ``(nan, nan)`` for ``n < 2``.
    boot_ci: BCa bootstrap interval of the mean (percentile where BCa is undefined, e.g. all ``d`` equal
      but one); ``(nan, nan)`` for ``n <`` :data:`MIN_BOOTSTRAP_N`, except that ``n >= 2`` equal ``d`` (no
      spread) give the point itself, as ``t_ci`` does.
    t_p: two-sided p-value of the paired t test (mean 0).
    wilcoxon_p: two-sided p-value of the Wilcoxon signed-rank test (exact for small ``n`` without ties);
      1.0 when every ``d`` is 0, nan for ``n < 2``.
    wins, losses, ties: pairs with ``d > 0``, ``d < 0``, ``d == 0``.
  """

  n: int
  mean: float
  t_ci: tuple[float, float]
  boot_ci: tuple[float, float]
  t_p: float
  wilcoxon_p: float
  wins: int
  losses: int
  ties: int

  def excludes_zero(self) -> bool:
    """Whether the t interval lies entirely on one side of 0."""
    lo, hi = self.t_ci
    return bool(lo > 0 or hi < 0)


def summarize_paired(
  diffs: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> PairedSummary:
  """Mean, t and bootstrap confidence intervals, t and Wilcoxon p-values, wins of paired differences.

  The bootstrap uses a generator seeded with ``seed``, so the same numbers give the same interval.
  """
  d = np.asarray(diffs, dtype=np.float64)
  if d.ndim != 1:
    raise ValueError(f"diffs must be 1-D, got shape {d.shape}")
  if not np.all(np.isfinite(d)):
    raise ValueError(f"diffs must be finite, got {d.tolist()}")
  n = int(d.size)
  wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
  nan2 = (math.nan, math.nan)
  if n == 0:
    return PairedSummary(0, math.nan, nan2, nan2, math.nan, math.nan, 0, 0, 0)
  mean = float(np.mean(d))
  if n < 2:
    return PairedSummary(n, mean, nan2, nan2, math.nan, math.nan, wins, losses, n - wins - losses)
  if np.all(d == d[0]):  # no spread: the interval is the point, a test has nothing to say
    point = (mean, mean)
    p = 1.0 if mean == 0 else 0.0
    return PairedSummary(n, mean, point, point, p, 1.0 if mean == 0 else math.nan, wins, losses, n - wins - losses)
  t = sps.ttest_1samp(d, 0.0)
  t_ci = tuple(float(x) for x in t.confidence_interval(confidence))
  boot_ci = _bootstrap_ci(d, confidence, n_resamples, seed) if n >= MIN_BOOTSTRAP_N else nan2
  if np.all(d == 0):
    w_p = 1.0
  else:
    w_p = float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
  return PairedSummary(n, mean, t_ci, boot_ci, float(t.pvalue), w_p, wins, losses, n - wins - losses)


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
  """Mean of ``values`` and its ``confidence`` interval from the t distribution (``scipy.stats``).

  The interval is ``(nan, nan)`` for fewer than 2 values and the point itself when they are all equal.
  """
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
    raise ValueError(f"values must be a non-empty 1-D sequence of finite numbers, got {v.tolist()}")
  mean = float(np.mean(v))
  if v.size < 2:
    return mean, (math.nan, math.nan)
  if np.all(v == v[0]):
    return mean, (mean, mean)
  lo, hi = sps.ttest_1samp(v, 0.0).confidence_interval(confidence)
  return mean, (float(lo), float(hi))


def _bootstrap_ci(d: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
  for method in ("BCa", "percentile"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # BCa's "degenerate distribution" warning: fall back below
      res = sps.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=method,
        rng=np.random.default_rng(seed),
      )
    lo, hi = (float(x) for x in (res.confidence_interval.low, res.confidence_interval.high))
    if math.isfinite(lo) and math.isfinite(hi):
      return lo, hi
  return math.nan, math.nan


def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values (same order as ``pvalues``; nan entries stay nan and do not count).

  With ``m`` p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
  """
  p = np.asarray(pvalues, dtype=np.float64)
  out = np.full(p.shape, np.nan)
  ok = np.flatnonzero(np.isfinite(p))
  m = ok.size
  if m == 0:
    return out
  order = ok[np.argsort(p[ok], kind="stable")]
  scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
  out[order] = np.maximum.accumulate(scaled)
  return out


def best_of_k_gain(candidates: np.ndarray, baseline: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
  """Relative gain (%) of the best of ``k`` candidates over a baseline run, per replicate.

  Args:
    candidates: ``(r, k)`` -- metric of ``k`` variants in each of ``r`` replicates (e.g. seeds).
    baseline: ``(r,)`` -- the baseline run of each replicate.
    select: ``(r, k)`` values the best is chosen by (default: ``candidates`` itself), e.g. test
      recall@20 when reporting ndcg@5 of the same winner.

  Returns:
    ``(r,)`` gains ``100 * (candidates[i, argmax select[i]] - baseline[i]) / baseline[i]``.
  """
  c = np.asarray(candidates, dtype=np.float64)
  s = c if select is None else np.asarray(select, dtype=np.float64)
  b = np.asarray(baseline, dtype=np.float64)
  if c.ndim != 2 or s.shape != c.shape or b.shape != (c.shape[0],):
    raise ValueError(f"need candidates (r, k), select (r, k), baseline (r,); got {c.shape}, {s.shape}, {b.shape}")
  best = c[np.arange(c.shape[0]), np.argmax(s, axis=1)]
  return relative_change(best, b)


def paired_t_power(n: int, effect: float, sd: float, *, alpha: float = 0.05) -> float:
  """Power of the two-sided paired (one-sample) t test at level ``alpha`` with ``n`` pairs when the
  differences have mean ``effect`` and standard deviation ``sd`` (noncentral t, ``scipy.stats.nct``)."""
  if n < 2:
    raise ValueError(f"a t test needs n >= 2 pairs, got {n}")
  df = n - 1
  crit = float(sps.t.ppf(1 - alpha / 2, df))
  nc = effect / sd * math.sqrt(n)
  return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def seeds_for_power(
  effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000
) -> float:
  """The smallest number of paired seeds whose two-sided paired t test at level ``alpha`` detects a mean
  difference ``effect`` with probability ``power`` when the differences have standard deviation ``sd``.

  E.g. a standardised effect ``effect / sd`` of 0.5 needs 34 pairs at the usual 5 % / 80 %. Returns
  ``inf`` for a zero effect or more than ``max_n`` pairs, and 2 when ``sd`` is 0 and ``effect`` is not.

  Raises:
    ValueError: ``sd`` is negative or not finite, ``effect`` is not finite, or ``alpha`` / ``power`` are
      not in (0, 1).
  """
  if not (math.isfinite(effect) and math.isfinite(sd) and sd >= 0):
    raise ValueError(f"effect must be finite and sd finite and >= 0, got effect={effect}, sd={sd}")
  for name, v in (("alpha", alpha), ("power", power)):
    if not 0 < v < 1:
      raise ValueError(f"{name} must be in (0, 1), got {v}")
  if effect == 0:
    return math.inf
  if sd == 0:
    return 2
  lo, hi = 2, 2  # power grows with n: double until enough, then bisect
  while paired_t_power(hi, effect, sd, alpha=alpha) < power:
    lo, hi = hi, hi * 2
    if hi > max_n:
      return math.inf
  while lo < hi:
    mid = (lo + hi) // 2
    if paired_t_power(mid, effect, sd, alpha=alpha) >= power:
      hi = mid
    else:
      lo = mid + 1
  return hi
