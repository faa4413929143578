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
seen so far; :func:`min_detectable_effect` the converse at a cell's own n.

:func:`random_effects` pools the mean changes of several cells (DerSimonian–Laird random-effects
meta-analysis, ``statsmodels.stats.meta_analysis``) into one estimate with a confidence interval, the
between-cell spread tau² and I², and a prediction interval for a new cell.
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
  "MetaAnalysis",
  "PairedSummary",
  "best_of_k_gain",
  "holm",
  "mean_ci",
  "min_detectable_effect",
  "paired_t_power",
  "random_effects",
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
  differences have mean ``effect`` and standard deviation ``sd``.

  With ``df = n - 1``, critical value ``c = t_{1 - alpha/2, df}`` and noncentrality ``nc = effect / sd * sqrt(n)``
  the power is ``P(T > c) + P(T < -c)`` for ``T`` noncentral t(df, nc) (``scipy.stats.nct``). Both tails are
  taken as survival functions (``P(T < -c | nc) = P(T > c | -nc)``): ``scipy.stats.nct.cdf`` returns nan far in
  the lower tail (e.g. df = 1, nc = 8), where the probability is ~0. Where scipy still gives a non-finite value
  the power is integrated numerically (:func:`_t_power_by_quadrature`).
  """
  if n < 2:
    raise ValueError(f"a t test needs n >= 2 pairs, got {n}")
  if not (math.isfinite(effect) and math.isfinite(sd) and sd > 0):
    raise ValueError(f"effect must be finite and sd finite and > 0, got effect={effect}, sd={sd}")
  df = n - 1
  crit = float(sps.t.ppf(1 - alpha / 2, df))
  nc = effect / sd * math.sqrt(n)
  power = float(sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc))
  if not math.isfinite(power):
    power = _t_power_by_quadrature(df, crit, nc)
  return min(1.0, max(0.0, power))


def _t_power_by_quadrature(df: int, crit: float, nc: float) -> float:
  """``P(|T| > crit)`` for ``T = (Z + nc) / S``, ``S = sqrt(chi2_df / df)``, by integrating over ``S``:
  ``E[Phi(nc - crit S) + Phi(-nc - crit S)]``."""
  from scipy import integrate

  def integrand(s: float) -> float:
    density = 2 * s * df * sps.chi2.pdf(df * s * s, df)  # the density of S
    return density * (sps.norm.cdf(nc - crit * s) + sps.norm.cdf(-nc - crit * s))

  value, _ = integrate.quad(integrand, 0, np.inf, limit=200)
  return float(value)


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

  def enough(n: int) -> bool:
    p = paired_t_power(n, effect, sd, alpha=alpha)
    if not math.isfinite(p):  # never read a nan as "not enough" (nor as "enough")
      raise ArithmeticError(f"power at n={n}, effect={effect}, sd={sd} is not finite")
    return p >= power

  lo, hi = 2, 2  # power grows with n: double until enough, then bisect
  while not enough(hi):
    lo, hi = hi, hi * 2
    if hi > max_n:
      return math.inf
  while lo < hi:
    mid = (lo + hi) // 2
    if enough(mid):
      hi = mid
    else:
      lo = mid + 1
  return hi


def min_detectable_effect(n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
  """The smallest mean difference (in the units of ``sd``, here Δ %) that a two-sided paired t test at level
  ``alpha`` with ``n`` pairs detects with probability ``power`` when the differences have standard deviation
  ``sd`` (the inverse of :func:`paired_t_power` in the effect). ``nan`` for ``n < 2`` or a non-finite ``sd``;
  0 for ``sd == 0``."""
  if n < 2 or not math.isfinite(sd) or sd < 0:
    return math.nan
  if sd == 0:
    return 0.0
  from scipy import optimize

  hi = sd
  while paired_t_power(n, hi, sd, alpha=alpha) < power:
    hi *= 2
  return float(optimize.brentq(lambda e: paired_t_power(n, e, sd, alpha=alpha) - power, 0.0, hi, xtol=1e-10))


@dataclasses.dataclass(frozen=True)
class MetaAnalysis:
  """A random-effects meta-analysis (DerSimonian–Laird) of ``k`` effects with known variances.

  Attributes:
    k: number of effects pooled.
    estimate: the pooled (random-effects) mean.
    se: its standard error, ``1 / sqrt(sum 1 / (v_i + tau2))``.
    ci: ``(1 - alpha)`` confidence interval ``estimate -+ z_{1 - alpha/2} se`` (normal, as DerSimonian–Laird).
    tau2: the between-cell variance, ``max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w))``, ``w = 1 / v``.
    i2: ``max(0, (Q - (k - 1)) / Q)``: the share of the spread not explained by within-cell noise (0..1).
    q: Cochran's Q, ``sum w (y - y_fe)^2``.
    pi: ``(1 - alpha)`` prediction interval for the effect in a new cell, ``estimate -+ t_{1 - alpha/2, k - 2}
      sqrt(tau2 + se^2)`` (Higgins, Thompson & Spiegelhalter 2009); ``(nan, nan)`` for ``k < 3``.
    weights: the relative random-effects weights of the effects (sum 1).
  """

  k: int
  estimate: float
  se: float
  ci: tuple[float, float]
  tau2: float
  i2: float
  q: float
  pi: tuple[float, float]
  weights: tuple[float, ...]


def random_effects(effects: Sequence[float], variances: Sequence[float], *, alpha: float = 0.05) -> MetaAnalysis:
  """DerSimonian–Laird random-effects pooling of ``effects`` with within-effect ``variances``
  (``statsmodels.stats.meta_analysis.combine_effects(method_re="dl")``).

  statsmodels 0.15 does not truncate the DL moment estimate of tau² at 0: with less spread than the variances
  predict (Q < k - 1) it returns a negative tau² and random-effects weights ``1 / (v + tau2)`` that inflate the
  precision (three equal variances 1 and effects 1.0, 1.1, 0.9 give tau² = -0.99 and SE 0.058 instead of
  0.577). DerSimonian and Laird define tau² = max(0, .); at tau² = 0 the random-effects estimate is the
  fixed-effect one, which is what is returned then.

  Raises:
    ValueError: fewer than 2 effects, lengths differ, or a variance is not finite and > 0.
  """
  from statsmodels.stats.meta_analysis import combine_effects

  y, v = np.asarray(effects, dtype=np.float64), np.asarray(variances, dtype=np.float64)
  if y.ndim != 1 or y.shape != v.shape or y.size < 2:
    raise ValueError(f"need at least 2 effects and as many variances, got shapes {y.shape} and {v.shape}")
  if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
    raise ValueError(f"effects must be finite and variances finite and > 0, got {y.tolist()} and {v.tolist()}")
  k = int(y.size)
  with warnings.catch_warnings(), np.errstate(invalid="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)  # sqrt of the negative untruncated tau² case: handled below
    res = combine_effects(y, v, method_re="dl", alpha=alpha)
  if res.tau2 > 0:
    tau2, estimate, se = float(res.tau2), float(res.mean_effect_re), float(res.sd_eff_w_re)
    weights = np.asarray(res.weights_rel_re, dtype=np.float64)
  else:  # tau² truncated at 0: random effects = fixed effect
    tau2, estimate, se = 0.0, float(res.mean_effect_fe), float(res.sd_eff_w_fe)
    weights = np.asarray(res.weights_rel_fe, dtype=np.float64)
  q = float(res.q)
  z = float(sps.norm.isf(alpha / 2))
  ci = (estimate - z * se, estimate + z * se)
  # Prediction interval for the effect of a new cell (Higgins, Thompson & Spiegelhalter 2009, eq. 12):
  #   estimate -+ t_{1 - alpha/2, k - 2} * sqrt(tau2 + se^2)
  # tau2: the (truncated) DL between-cell variance, se: the pooled random-effects SE; k - 2 degrees of freedom
  # (one for the mean, one for tau2), so it needs k >= 3.
  if k >= 3:
    half = float(sps.t.ppf(1 - alpha / 2, k - 2)) * math.sqrt(tau2 + se**2)
    pi = (estimate - half, estimate + half)
  else:
    pi = (math.nan, math.nan)
  i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
  return MetaAnalysis(k, estimate, se, ci, tau2, i2, q, pi, tuple(float(w) for w in weights))
