"""The study's outputs from :func:`benchmarks.study.analysis.analyse`'s result: the printed report, ``study.md``,
``study.csv``, ``study.json`` and the forest plot, and the published figures set beside ours; and the same for
the estimate pooled across studies (:func:`benchmarks.study.analysis.pool_studies`: :func:`format_pooled_report`,
:func:`write_pooled_outputs`).

What the report reads how: the primary analysis declared in the spec (``[primary]``: one metric, the paired t
test, Holm over the declared family) decides; the Wilcoxon signed-rank p beside it is a sensitivity analysis;
every other metric and method is exploratory and unadjusted; comparisons identical to plain are dropped from
every family and listed. A cell with fewer finished seeds than planned is shown with its actual n and marked
incomplete."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.runtime.files import atomic_write, save_png
from benchmarks.study import stats
from benchmarks.study.spec import METRICS, SELECT_METRIC

__all__ = [
  "beside_paper",
  "forest_plot",
  "format_markdown",
  "format_pooled_markdown",
  "format_pooled_report",
  "format_report",
  "paper_source",
  "write_outputs",
  "write_pooled_outputs",
]

#: The paper's data sets, as its tables name them (to read a published figure's source from its note).
_PAPER_DATA = ("Baby", "Sports", "Clothing", "Electronics", "Pinterest")


def paper_source(p: Mapping[str, Any]) -> str:
  """Where a published figure (a ``[[paper]]`` entry) comes from, e.g. ``"paper, Baby, table 9"``: the data set
  (its ``data`` key, else the paper's data set its note names) and the table its note names. A published gain on
  one data set may be set beside our cell on another (the paper has no Scientific rows): this says which."""
  data = p.get("data")
  name = data.capitalize() if data else next((d for d in _PAPER_DATA if d.lower() in p["note"].lower()), None)
  table = re.search(r"table\s*(\d+)", p["note"], re.IGNORECASE)
  parts = [x for x in (name, f"table {table.group(1)}" if table else None) if x]
  return ", ".join(["paper", *parts]) if parts else p["note"]


def beside_paper(result: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per published figure of the spec (``[[paper]]``) that has a comparison in ``result``: the
  paper's plain value and gain beside our plain mean (95 % t CI over the evaluation seeds) and our paired
  Δ % [95 % CI]. Published plain / method values are ``None`` where the spec gives only the gain.

  Two columns read the published gain against our seeds: ``paper_gain_in_ci`` (whether our 95 % t interval
  contains it; ``None`` below 2 seeds) and ``seeds_for_power`` -- how many paired evaluation seeds a
  two-sided paired t test at 5 % needs to detect a change of the paper's size with 80 % power, given the
  standard deviation of our per-seed changes (:func:`benchmarks.study.stats.seeds_for_power`; ``None`` below 2
  seeds or beyond 100,000)."""
  rows = []
  for row in result["comparisons"]:
    for p in row.get("paper", []):
      m = row["metrics"].get(p["metric"])
      if m is None:
        continue
      lo, hi = m["t_ci"]
      known = m["n"] > 1  # from 2 seeds on, the interval and the sd exist
      need = stats.seeds_for_power(p["gain"], m["sd"]) if known else math.inf
      rows.append(
        {
          "cell": row["cell"],
          "label": row["label"],
          "metric": p["metric"],
          "n": m["n"],
          "n_planned": row["n_planned"],
          "complete": row["complete"],
          "source": paper_source(p),
          "paper_plain": p.get("plain"),
          "paper_value": p.get("value"),
          "paper_gain": p["gain"],
          "note": p["note"],
          "plain_mean": m["plain_mean"],
          "plain_ci": m["plain_ci"],
          "method_mean": m["method_mean"],
          "mean": m["mean"],
          "t_ci": m["t_ci"],
          "paper_gain_in_ci": bool(lo <= p["gain"] <= hi) if known else None,
          "seeds_for_power": int(need) if math.isfinite(need) else None,
        }
      )
  return rows


def _value(x: Optional[float]) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _value_ci(lo_hi: Sequence[float]) -> str:
  lo, hi = lo_hi
  return "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" [{lo:.4f}, {hi:.4f}]"


def _ci(lo_hi: Sequence[float]) -> str:
  lo, hi = lo_hi
  return "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:+.1f}, {hi:+.1f}]"


def _yes_no(x: Optional[bool]) -> str:
  return "-" if x is None else ("yes" if x else "no")


def _count(n: Optional[int]) -> str:
  return "-" if n is None else str(n)


def _p(p: float) -> str:
  return "-" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _progress(result: dict[str, Any]) -> str:
  parts = []
  for c in result["progress"]:
    part = f"{c['cell']} {c['done']}/{c['total']}"
    if c["done"] == c["total"]:
      part += " (complete)"
    elif c["left_s"] is not None:  # at the pace of the cell's finished runs, on one worker
      part += f" (~{c['left_s'] / 3600:.1f} h left at {c['mean_run_s'] / 60:.1f} min/run)"
    parts.append(part)
  return "; ".join(parts)


def _n(n: int, planned: int) -> str:
  """``n`` finished paired seeds, with the planned number where fewer have finished."""
  return str(n) if n >= planned else f"{n}/{planned}"


def _status(row: Mapping[str, Any]) -> str:
  return "" if row["complete"] else f"incomplete ({row['n']} of {row['n_planned']} seeds)"


def _mde(x: float) -> str:
  return "-" if not math.isfinite(x) else f"±{x:.1f}"


def _pct(x: float) -> str:
  return "-" if not math.isfinite(x) else f"{x:+.2f}"


def _primary_lines(primary: Mapping[str, Any]) -> list[str]:
  lines = [
    "",
    f"Primary analysis (declared in the spec's [primary]): paired t test ({primary['test']}) of the per-seed "
    f"relative change of test {primary['metric']}, family {primary['family']} ({primary['method']}'s winner vs "
    f"plain, one test per cell), Holm over its {primary['family_size']} member(s) at family-wise alpha "
    f"{primary['alpha']:g}. Wilcoxon signed-rank p: sensitivity analysis. MDE80: the smallest change a two-sided "
    "5 % paired t test detects with 80 % power at the cell's n and sd.",
  ]
  head = (
    f"{'cell':24s} {'method':11s} {'n':>5s} {'Δ% mean':>8s} {'95% CI (t)':>15s} {'t p':>8s} {'Holm p':>8s} "
    f"{'Wilcoxon p':>10s} {'MDE80':>7s}  verdict"
  )
  for title, rows in (("primary", primary["members"]), ("secondary", primary["secondary"])):
    if title == "secondary":
      if not rows:
        break
      lines += [
        "",
        f"Secondary ({primary['method']} at its default hyper-parameters vs plain, {primary['metric']}; Holm over "
        f"its own {primary['secondary_family_size']})",
      ]
    lines += [head, "-" * len(head)]
    for r in rows:
      verdict = "reject H0" if r["rejects"] else "not significant"
      if not r["complete"]:
        verdict += f"; {_status(r)}"
      lines.append(
        f"{r['cell']:24s} {r['label']:11s} {_n(r['n'], r['n_planned']):>5s} {_pct(r['mean']):>8s} "
        f"{_ci(r['t_ci']):>15s} {_p(r['t_p']):>8s} {_p(r['holm_p']):>8s} {_p(r['wilcoxon_p']):>10s} "
        f"{_mde(r['mde80']):>7s}  {verdict}"
      )
    if title == "primary":
      rejected = sum(r["rejects"] for r in rows)
      incomplete = sum(not r["complete"] for r in rows)
      lines.append(
        f"{rejected} of {len(rows)} primary test(s) reject at family-wise {primary['alpha']:g}"
        + (f"; {incomplete} cell(s) incomplete: provisional until their seeds are trained" if incomplete else "")
      )
  for d in primary["dropped"]:
    lines.append(f"Dropped from every family: {d['cell']} {d['label']} ({d['reason']})")
  if primary["not_evaluated"]:
    lines.append(f"Not evaluated yet (no paired seed): {', '.join(primary['not_evaluated'])}")
  return lines


def _pooled_lines(pooled: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
  if not pooled:
    return []
  head = (
    f"{'method':6s} {'metric':9s} {'k':>2s} {'Δ% pooled':>9s} {'95% CI':>15s} {'tau²':>6s} {'I²':>4s} "
    f"{'95% PI':>16s}  cells (n; * incomplete)"
  )
  lines = [
    "",
    f"Pooled estimate over {scope}: random-effects meta-analysis (DerSimonian–Laird, statsmodels) of each cell's "
    "mean Δ % (variance: its squared SE, sd²/n); 95 % CI normal; 95 % PI for a new cell = estimate ± "
    "t(k-2)·sqrt(tau² + SE²); tau² in %²",
    head,
    "-" * len(head),
  ]
  for e in pooled:
    cells = ", ".join(f"{c['cell']} {c['n']}{'*' if not c['complete'] else ''}" for c in e["cells"])
    if e["k"] >= 2:
      lines.append(
        f"{e['method']:6s} {e['metric']:9s} {e['k']:2d} {e['estimate']:+9.2f} {_ci(e['ci']):>15s} "
        f"{e['tau2']:6.2f} {e['i2'] * 100:3.0f}% {_ci(e['pi']):>16s}  {cells}"
      )
    else:
      lines.append(f"{e['method']:6s} {e['metric']:9s} {e['k']:2d} {'-':>9s}  fewer than 2 cells: nothing to pool")
  excluded = sorted({(x["cell"], x["reason"]) for e in pooled for x in e["excluded"]})
  for cell, reason in excluded:
    lines.append(f"  left out: {cell} ({reason})")
  return lines


def format_report(result: dict[str, Any]) -> str:
  lines = [f"Study {result['study']}: {result['runs_done']}/{result['runs_total']} runs finished"]
  lines.append(f"  per cell (time left on one worker at the pace of the cell's finished runs): {_progress(result)}")
  lines += [
    "",
    f"Grid winners (mean validation metric over the tuning seeds {result['tuning_seeds']}; test metrics play no part)",
  ]
  for t in result["tuning"]:
    table = ", ".join(f"{_point(x['point'])}: {x['valid_mean']:.4f}" for x in t["table"])
    edge = f"  [edge: {'; '.join(t['edges'])}]" if t["edges"] else ""
    lines.append(f"  {t['cell']:24s} {t['method']:5s} winner {_point(t['winner'])}{edge}")
    lines.append(f"  {'':24s} {'':5s}   {table}")

  if result.get("primary"):
    lines += _primary_lines(result["primary"])

  head = (
    f"{'cell':24s} {'method':11s} {'metric':9s} {'n':>5s} {'Δ% mean':>8s} {'95% CI (t)':>15s} "
    f"{'95% CI (boot)':>15s} {'t p':>8s} {'Holm p':>8s} {'Wilcoxon p':>10s} {'MDE80':>7s} {'wins':>6s}  role"
  )
  lines += [
    "",
    "Test metrics: paired relative change vs plain on the evaluation seeds (n: paired seeds, finished/planned "
    "where incomplete). Holm p only for the primary and secondary families; every other row is exploratory: "
    "unadjusted, to be read as a description, not a test",
    head,
    "-" * len(head),
  ]
  for row in result["comparisons"]:
    for metric, m in row["metrics"].items():
      role = m["role"] + ("" if row["complete"] else ", incomplete")
      tp, wp = (m["t_p"], m["wilcoxon_p"]) if m["role"] != "identical" else (math.nan, math.nan)
      lines.append(
        f"{row['cell']:24s} {row['label']:11s} {metric:9s} {_n(m['n'], row['n_planned']):>5s} {m['mean']:+8.2f} "
        f"{_ci(m['t_ci']):>15s} {_ci(m['boot_ci']):>15s} {_p(tp):>8s} {_p(m['holm_p']):>8s} {_p(wp):>10s} "
        f"{_mde(m['mde80']):>7s} {m['wins']:>3d}/{m['n']:<2d}  {role}"
      )
    if row["failed_seeds"]:
      lines.append(f"{'':24s} {row['label']:11s} diverged on seeds {row['failed_seeds']} (left out)")
  if result.get("identical"):
    lines.append(
      "identical to plain on every seed and metric (no test; dropped from every family and from the pooled "
      "estimate): " + ", ".join(f"{x['cell']} {x['label']} (n={x['n']})" for x in result["identical"])
    )

  lines += _pooled_lines(result.get("pooled", []), f"this study's cells ({result['study']})")

  head = (
    f"{'cell':24s} {'method':11s} {'hyper-parameters':24s} {'grad evals':>10s} {'wall':>6s} {'epochs':>13s}  trained on"
  )
  lines += [
    "",
    "Cost relative to plain (same seeds; wall time as measured where the runs trained, beside other runs:"
    " two workers on a 2-core CPU, or several on one GPU)",
    head,
    "-" * len(head),
  ]
  for row in result["comparisons"]:
    c = row.get("cost")
    if c:
      lines.append(
        f"{row['cell']:24s} {row['label']:11s} {_point(row['point']) or 'defaults':24s} "
        f"{c['grad_evals_ratio']:9.2f}x {c['wall_ratio']:5.2f}x "
        f"{c['epochs_method']:6.0f}/{c['epochs_plain']:<6.0f}  {', '.join(c.get('where', []))}"
      )

  if result["paper_protocol"]:
    head = f"{'cell':24s} {'method':6s} {'k':>2s} " + " ".join(f"{m:>17s}" for m in METRICS)
    lines += [
      "",
      "The paper's protocol on the tuning seeds: best of k grid points on TEST "
      f"({SELECT_METRIC}) vs plain, one seed at a time (mean over seeds; A/A: the same selection "
      "among k plain runs that differ only in data order)",
      head,
      "-" * len(head),
    ]
    for pp in result["paper_protocol"]:
      cells = [
        f"{pp['gain'][m]['mean']:+6.1f}" + (f" (A/A {pp['aa_gain'][m]['mean']:+5.1f})" if pp["aa_gain"] else "")
        for m in METRICS
      ]
      lines.append(f"{pp['cell']:24s} {pp['method']:6s} {pp['k']:2d} " + " ".join(f"{c:>17s}" for c in cells))
    lines += _aa_lines(result["paper_protocol"])
  published = result["beside_paper"]
  if published:
    head = (
      f"{'cell':24s} {'method':6s} {'metric':9s} {'paper plain':>11s} {'paper gain':>10s} {'n':>5s} "
      f"{'our plain [95% CI]':>27s} {'our method':>10s} {'our Δ% [95% CI]':>22s} {'in CI':>5s} {'seeds':>6s}"
    )
    lines += [
      "",
      "Published figures beside ours (the paper's split and seeds are not ours; in CI: the paper's gain lies in our "
      "95 % CI; seeds: paired seeds a 5 % t test needs for 80 % power at the paper's gain, from our sd)",
      head,
      "-" * len(head),
    ]
    for b in published:
      ours = f"{b['mean']:+.1f} {_ci(b['t_ci'])}"
      lines.append(
        f"{b['cell']:24s} {b['label']:6s} {b['metric']:9s} {_value(b['paper_plain']):>11s} "
        f"{b['paper_gain']:+9.1f}% {_n(b['n'], b['n_planned']):>5s} "
        f"{_value(b['plain_mean']) + _value_ci(b['plain_ci']):>27s} "
        f"{_value(b['method_mean']):>10s} {ours:>22s} {_yes_no(b['paper_gain_in_ci']):>5s} "
        f"{_count(b['seeds_for_power']):>6s}  {b['note']}"
      )
  lines += robustness_lines(result.get("robustness"))
  return "\n".join(lines)


_KIND = {"noise": "noise σ", "text_swap": "text swap", "image_noise": "image noise"}


def _level(kind: str, level: float) -> str:
  return f"{_KIND[kind]} {level:g}" if kind == "noise" else f"{_KIND[kind]} {100 * level:g}%"


def robustness_lines(rob: Optional[Mapping[str, Any]]) -> list[str]:
  """The study-grade robustness table (:func:`benchmarks.study.probes.robustness_analysis`) as text lines."""
  if not rob:
    return []
  s = rob["settings"]
  head = (
    f"{'cell':24s} {'method':6s} {'perturbation':17s} {'metric':9s} {'n':>3s} {'plain drop%':>11s} "
    f"{'method drop%':>12s} {'Δ pp':>7s} {'95% CI (t)':>15s} {'t p':>8s}"
  )
  lines = [
    "",
    f"Robustness (paper tables 4-5), measured on the first {rob['seeds']} evaluation seeds of "
    f"{', '.join(rob['cells'])} ({rob['done']}/{rob['total']} runs measured; {rob['reproduced']} of them retrained "
    "to the stored test metrics bit for bit). drop: % of the clean test metric lost, mean over "
    f"{s['draws']} draws (noise on the embedding tables; text swap / image noise of a fraction of the items); "
    "Δ pp = the method's drop minus plain's on the same seeds and draws (negative: the method loses less; a "
    "negative drop is a gain). "
    "Exploratory: unadjusted",
    head,
    "-" * len(head),
  ]
  for r in rob["rows"]:
    d = r["delta"]
    lines.append(
      f"{r['cell']:24s} {r['method']:6s} {_level(r['kind'], r['level']):17s} {r['metric']:9s} {d['n']:3d} "
      f"{r['plain_drop']:+11.2f} {r['method_drop']:+12.2f} {d['mean']:+7.2f} {_ci(d['ci']):>15s} {_p(d['t_p']):>8s}"
    )
  if rob["flatness"]:
    head = f"{'cell':24s} {'method':6s} {'n':>3s} {'plain λmax':>11s} {'method λmax':>11s} {'Δ% mean':>8s} {'95% CI (t)':>15s} {'t p':>8s}"
    lines += [
      "",
      f"Flatness: top Hessian eigenvalue of the training loss ({s['hessian_pairs']} fixed training pairs, "
      f"{s['hessian_iters']} power iterations); medians over seeds, Δ% = paired relative change vs plain",
      head,
      "-" * len(head),
    ]
    for f in rob["flatness"]:
      c = f["change"]
      mean, ci = (f"{c['mean']:+8.1f}", _ci(c["ci"])) if f["relative"] else (f"{c['mean']:+8.2g}", "(difference)")
      lines.append(
        f"{f['cell']:24s} {f['method']:6s} {c['n']:3d} {f['plain_median']:11.4g} {f['method_median']:11.4g} "
        f"{mean} {ci:>15s} {_p(c['t_p']):>8s}"
      )
  return lines


def _aa_lines(protocol: Sequence[Mapping[str, Any]]) -> list[str]:
  """The A/A distributions beside the paper protocol's gain: median / 90th percentile over (seed, k-subset)."""
  rows = [pp for pp in protocol if pp["aa_gain"] or pp.get("aa_lr_gain")]
  if not rows:
    return []

  def spread(d: Mapping[str, Any], m: str) -> str:
    return f"{d[m]['median']:+.1f}/{d[m]['p90']:+.1f}" if d and "median" in d[m] else "-"

  head = f"{'cell':24s} {'method':6s} {'k':>2s} " + " ".join(
    f"{m + ' gain':>14s} {'matched A/A':>12s} {'order A/A':>12s}" for m in ("recall@5", "recall@20")
  )
  lines = [
    "",
    "A/A controls of the paper protocol: the same best-of-k-on-test selection among no-op candidates, median/90th "
    "percentile of the gain over every (tuning seed, k-subset). matched: plain at neighbouring learning rates, "
    "with plain's initialisation and data order (candidates that differ as grid points do); order: plain with "
    "other data orders (negatives and batch order: a larger perturbation)",
    head,
    "-" * len(head),
  ]
  for pp in rows:
    cols = [
      f"{pp['gain'][m]['mean']:+14.1f} {spread(pp.get('aa_lr_gain'), m):>12s} {spread(pp['aa_gain'], m):>12s}"
      for m in ("recall@5", "recall@20")
    ]
    lines.append(f"{pp['cell']:24s} {pp['method']:6s} {pp['k']:2d} " + " ".join(cols))
  return lines


def format_pooled_report(pooled: dict[str, Any]) -> str:
  """The estimate pooled across studies (:func:`benchmarks.study.analysis.pool_studies`) as text."""
  lines = [
    f"Pooled across studies {', '.join(pooled['studies'])}: {pooled['runs_done']}/{pooled['runs_total']} runs "
    "finished; each method's winner vs plain, one effect per cell"
  ]
  lines += _pooled_lines(pooled["pooled"], "the cells of all these studies")
  return "\n".join(lines)


def _point(point: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={v:g}" for k, v in point.items())


def _csv(result: dict[str, Any]) -> str:
  import csv
  import io

  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(
    [
      "cell",
      "data",
      "model",
      "label",
      "hyper_parameters",
      "metric",
      "role",
      "n",
      "n_planned",
      "complete",
      "mean_delta_pct",
      "t_ci_low",
      "t_ci_high",
      "boot_ci_low",
      "boot_ci_high",
      "t_p",
      "holm_p",
      "wilcoxon_p",
      "mde80_pct",
      "wins",
      "losses",
      "ties",
      "method_mean",
      "plain_mean",
      "grad_evals_ratio",
      "wall_ratio",
      "trained_on",
    ]
  )
  for row in result["comparisons"]:
    for metric, m in row["metrics"].items():
      c = row.get("cost", {})
      w.writerow(
        [
          row["cell"],
          row["data"],
          row["model"],
          row["label"],
          _point(row["point"]),
          metric,
          m["role"],
          m["n"],
          row["n_planned"],
          row["complete"],
          m["mean"],
          *m["t_ci"],
          *m["boot_ci"],
          m["t_p"],
          m["holm_p"],
          m["wilcoxon_p"],
          m["mde80"],
          m["wins"],
          m["losses"],
          m["ties"],
          m["method_mean"],
          m["plain_mean"],
          c.get("grad_evals_ratio"),
          c.get("wall_ratio"),
          "; ".join(c.get("where", [])),
        ]
      )
  return buf.getvalue()


_COLORS = {"mg": "C0", "sam": "C1", "gnp": "C2"}


def forest_plot(result: dict[str, Any], path: Path) -> bool:
  """Δ % with its 95 % t interval per cell and method, one panel per metric on one shared x-scale; below them
  the pooled random-effects estimate per method (a diamond spanning its 95 % CI; the prediction interval as a
  thin line); the paper's published gains as open red diamonds labelled with their data set and table.
  ``False`` if nothing to plot."""

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in result["comparisons"] if r["metrics"]]
  if not rows:
    return False
  multi = "studies" in result  # pooled across studies: name the study of each row
  pooled = {(e["method"], e["metric"]): e for e in result.get("pooled", []) if e["k"] >= 2}
  pooled_methods = list(dict.fromkeys(m for m, _ in pooled))
  n_rows = len(rows) + (len(pooled_methods) + 1 if pooled_methods else 0)
  fig, axes = plt.subplots(
    1, len(METRICS), figsize=(4.4 * len(METRICS), 1.9 + 0.42 * n_rows), sharey=True, sharex=True, squeeze=False
  )
  y_rows = np.arange(n_rows)[::-1][: len(rows)]
  y_pooled = {m: n_rows - 1 - len(rows) - 1 - i for i, m in enumerate(pooled_methods)}

  def row_label(r: Mapping[str, Any]) -> str:
    n = next(iter(r["metrics"].values()))["n"]
    where = f"{r['study']}, " if multi else ""
    what = " identical to plain" if r.get("identical") else ""
    planned = "" if r["complete"] else f" of {r['n_planned']}, incomplete"
    return f"{r['cell']} {r['label']} ({where}n={n}{planned}){what}"

  labels = [row_label(r) for r in rows]
  for m in pooled_methods:
    k = max(pooled[(m, metric)]["k"] for metric in METRICS if (m, metric) in pooled)
    labels.append(f"pooled {m} vs plain (random effects, k={k})")
  lo_all, hi_all = [0.0], [0.0]
  for ax, metric in zip(axes[0], METRICS):
    ax.axvline(0, color="k", lw=0.8)
    for yi, r in zip(y_rows, rows):
      m = r["metrics"].get(metric)
      if not m:
        continue
      lo, hi = m["t_ci"]
      color = _COLORS.get(r["method"], "C3")
      if math.isfinite(lo):
        ax.plot([lo, hi], [yi, yi], color=color, lw=2)
        lo_all.append(lo)
        hi_all.append(hi)
      ax.plot([m["mean"]], [yi], "o", color=color, mfc="white" if not r["complete"] else color)
      for p in r.get("paper", []):
        if p["metric"] == metric:
          ax.plot([p["gain"]], [yi], "D", color="red", ms=6, mfc="none", label="a published gain")
          ax.annotate(
            paper_source(p), (p["gain"], yi), xytext=(5, 4), textcoords="offset points", fontsize=6, color="red"
          )
          hi_all.append(p["gain"])
          lo_all.append(p["gain"])
    for method, yi in y_pooled.items():
      e = pooled.get((method, metric))
      if e is None:
        continue
      color = _COLORS.get(method, "C3")
      lo, hi = e["ci"]
      ax.fill([lo, e["estimate"], hi, e["estimate"]], [yi, yi + 0.3, yi, yi - 0.3], color=color, alpha=0.8)
      if math.isfinite(e["pi"][0]):
        ax.plot(
          e["pi"],
          [yi, yi],
          color=color,
          lw=0.8,
          ls="--",
          label="95 % prediction interval (pooled; cut at the panel edge)",
        )
      lo_all.append(lo)
      hi_all.append(hi)
    ax.set_title(f"Δ test {metric} vs plain (%)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
  if pooled_methods:
    for ax in axes[0]:
      ax.axhline(n_rows - 1 - len(rows), color="0.6", lw=0.6)
  lo, hi = min(lo_all), max(hi_all)
  pad = 0.06 * (hi - lo) if hi > lo else 1.0
  axes[0][0].set_xlim(lo - pad, hi + pad * 4)  # one x-scale for every panel (sharex); room for the labels
  ticks = np.concatenate([y_rows, list(y_pooled.values())])
  axes[0][0].set_yticks(ticks, labels, fontsize=8)
  handles, names = [], []
  for ax in axes[0]:
    for h, n in zip(*ax.get_legend_handles_labels()):
      if n not in names:
        handles.append(h)
        names.append(n)
  if handles:  # one figure-level legend, in the title row, so it never covers a row's interval
    fig.legend(handles, names, loc="upper right", fontsize=8, frameon=False)
  title = (
    f"pooled across {', '.join(result['studies'])}" if multi else result["study"]
  ) + ": mean paired change with 95 % CI (t), evaluation seeds; open circle: incomplete cell; diamonds: pooled 95 % CI"
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  save_png(fig, path, dpi=100)
  return True


def _primary_markdown(primary: Mapping[str, Any]) -> list[str]:
  head = [
    "cell",
    "method",
    "n",
    f"Δ{primary['metric']} % [95 % CI]",
    "t p",
    "Holm p",
    "Wilcoxon p",
    "MDE80 %",
    "verdict",
  ]
  lines = [
    "",
    f"**Primary analysis** (declared in the spec): paired t test of the per-seed relative change of "
    f"{primary['metric']}, {primary['method']}'s winner vs plain in each cell, Holm over "
    f"{primary['family_size']} at family-wise α = {primary['alpha']:g}; Wilcoxon p as sensitivity analysis; "
    "MDE80: the change this cell's n and sd detect with 80 % power.",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for title, rows in (("", primary["members"]), (" (secondary)", primary["secondary"])):
    for r in rows:
      verdict = ("reject H0" if r["rejects"] else "not significant") + ("" if r["complete"] else f"; {_status(r)}")
      lines.append(
        "| "
        + " | ".join(
          [
            r["cell"],
            r["label"] + title,
            _n(r["n"], r["n_planned"]),
            f"{r['mean']:+.2f} {_ci(r['t_ci'])}",
            _p(r["t_p"]),
            _p(r["holm_p"]),
            _p(r["wilcoxon_p"]),
            _mde(r["mde80"]),
            verdict,
          ]
        )
        + " |"
      )
  notes = [f"Dropped from every family: {d['cell']} {d['label']} ({d['reason']})." for d in primary["dropped"]]
  if primary["not_evaluated"]:
    notes.append(f"Not evaluated yet: {', '.join(primary['not_evaluated'])}.")
  return lines + ([""] + notes if notes else [])


def _pooled_markdown(pooled: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
  if not pooled:
    return []
  head = ["method", "metric", "k", "Δ % pooled [95 % CI]", "tau² (%²)", "I²", "95 % PI", "cells (n; * incomplete)"]
  lines = [
    "",
    f"**Pooled over {scope}** (random effects, DerSimonian–Laird: each cell's mean Δ % with variance SE²; "
    "PI = estimate ± t(k−2)·√(tau² + SE²)):",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for e in pooled:
    cells = ", ".join(f"{c['cell']} {c['n']}{'*' if not c['complete'] else ''}" for c in e["cells"])
    if e["k"] < 2:
      lines.append(f"| {e['method']} | {e['metric']} | {e['k']} | - | - | - | - | {cells} |")
      continue
    lines.append(
      f"| {e['method']} | {e['metric']} | {e['k']} | {e['estimate']:+.2f} {_ci(e['ci'])} | {e['tau2']:.2f} | "
      f"{e['i2'] * 100:.0f} % | {_ci(e['pi'])} | {cells} |"
    )
  return lines


def format_markdown(result: dict[str, Any]) -> str:
  """The comparison as a Markdown table (Δ % [95 % t CI] per metric), with the primary analysis, the pooled
  estimate, the paper protocol and A/A, and the published figures beside ours."""
  pp = {(p["cell"], p["method"]): p for p in result["paper_protocol"]}
  primary = result.get("primary")
  pm = primary["metric"] if primary else METRICS[0]
  head = (
    ["cell", "method (winner)", "n"]
    + [f"Δ{m} % [95 % CI]" for m in METRICS]
    + [f"MDE80 {pm} %", "grad evals", "paper protocol Δrecall@5 (A/A)"]
  )
  lines = [
    f"Study `{result['study']}`: {result['runs_done']}/{result['runs_total']} runs finished"
    + f" ({_progress(result)}).",
  ]
  if primary:
    lines += _primary_markdown(primary)
  lines += [
    "",
    "All comparisons (exploratory beyond the primary family: unadjusted; n: finished/planned paired seeds where "
    "incomplete):",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for row in result["comparisons"]:
    ms = row["metrics"]
    if not ms:
      continue
    cells = [f"{ms[m]['mean']:+.1f} {_ci(ms[m]['t_ci'])}" if m in ms else "-" for m in METRICS]
    p = pp.get((row["cell"], row["label"]))
    paper = "-"
    if p:
      paper = f"{p['gain']['recall@5']['mean']:+.1f}"
      if p["aa_gain"]:
        paper += f" ({p['aa_gain']['recall@5']['mean']:+.1f})"
    label = f"{row['label']} ({_point(row['point'])})" if row["point"] else row["label"]
    if row.get("identical"):
      label += ", identical to plain"
    n = next(iter(ms.values()))["n"]
    mde = _mde(ms[pm]["mde80"]) if pm in ms else "-"
    lines.append(
      "| "
      + " | ".join(
        [row["cell"], label, _n(n, row["n_planned"]), *cells, mde, f"{row['cost']['grad_evals_ratio']:.2f}×", paper]
      )
      + " |"
    )
  lines += _pooled_markdown(result.get("pooled", []), "this study's cells")
  published = result["beside_paper"]
  if published:
    head = [
      "cell",
      "method",
      "metric",
      "paper: plain → method",
      "paper gain %",
      "n",
      "ours: plain [95 % CI] → method",
      "our Δ % [95 % CI]",
      "paper's gain in our CI",
      "seeds for 80 % power",
      "source",
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in published:
      paper = f"{_value(b['paper_plain'])} → {_value(b['paper_value'])}" if b["paper_plain"] is not None else "-"
      ours = f"{_value(b['plain_mean'])}{_value_ci(b['plain_ci'])} → {_value(b['method_mean'])}"
      lines.append(
        "| "
        + " | ".join(
          [
            b["cell"],
            b["label"],
            b["metric"],
            paper,
            f"{b['paper_gain']:+.1f}",
            _n(b["n"], b["n_planned"]),
            ours,
            f"{b['mean']:+.1f} {_ci(b['t_ci'])}",
            _yes_no(b["paper_gain_in_ci"]),
            _count(b["seeds_for_power"]),
            b["note"],
          ]
        )
        + " |"
      )
  aa = _aa_lines(result["paper_protocol"])
  if aa:
    lines += ["", "## A/A controls", "", "```", *aa[1:], "```"]
  rob = robustness_lines(result.get("robustness"))
  if rob:
    lines += ["", "## Robustness and flatness", "", "```", *rob[1:], "```"]
  return "\n".join(lines) + "\n"


def format_pooled_markdown(pooled: dict[str, Any]) -> str:
  lines = [
    f"Pooled across studies {', '.join(f'`{s}`' for s in pooled['studies'])}: {pooled['runs_done']}/"
    f"{pooled['runs_total']} runs finished; each method's winner vs plain, one effect per cell."
  ]
  lines += _pooled_markdown(pooled["pooled"], "the cells of all these studies")
  excluded = sorted({(x["cell"], x["reason"]) for e in pooled["pooled"] for x in e["excluded"]})
  if excluded:
    lines += ["", "Left out: " + "; ".join(f"{c} ({r})" for c, r in excluded) + "."]
  return "\n".join(lines) + "\n"


def _write(out_dir: Path, result: dict[str, Any], texts: Mapping[str, str]) -> list[Path]:
  written = []
  for name, text in texts.items():
    atomic_write(out_dir / name, text)
    written.append(out_dir / name)
  if forest_plot(result, out_dir / "forest.png"):
    written.append(out_dir / "forest.png")
  else:
    (out_dir / "forest.png").unlink(missing_ok=True)  # never leave a picture of other records
  return written


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
  return _write(
    out_dir,
    result,
    {
      "study.json": json.dumps(result, indent=1, sort_keys=True) + "\n",
      "study.csv": _csv(result),
      "study.md": format_markdown(result),
    },
  )


def write_pooled_outputs(pooled: dict[str, Any], out_dir: Path) -> list[Path]:
  """``study.json``, ``study.md`` and ``forest.png`` of the estimate pooled across studies, in ``out_dir``."""
  out_dir.mkdir(parents=True, exist_ok=True)
  return _write(
    out_dir,
    pooled,
    {"study.json": json.dumps(pooled, indent=1, sort_keys=True) + "\n", "study.md": format_pooled_markdown(pooled)},
  )
