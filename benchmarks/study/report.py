"""The study's outputs from :func:`benchmarks.study.analyse`'s result: the printed report, ``study.md``,
``study.csv``, ``study.json`` and the forest plot, and the published figures set beside ours."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.runtime.files import atomic_write, save_png
from benchmarks.study import stats
from benchmarks.study.spec import METRICS, SELECT_METRIC

__all__ = ["beside_paper", "forest_plot", "format_markdown", "format_report", "write_outputs"]


def beside_paper(result: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per published figure of the spec (``[[paper]]``) that has a comparison in ``result``: the
  paper's plain value and gain beside our plain mean (95 % t CI over the evaluation seeds) and our paired
  Δ % [95 % CI]. Published plain / method values are ``None`` where the spec gives only the gain.

  Two columns read the published gain against our seeds: ``paper_gain_in_ci`` (whether our 95 % t interval
  contains it; ``None`` below 2 seeds) and ``seeds_for_power`` -- how many paired evaluation seeds a
  two-sided paired t test at 5 % needs to detect a change of the paper's size with 80 % power, given the
  standard deviation of our per-seed changes (:func:`benchmarks.stats.seeds_for_power`; ``None`` below 2
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

  head = (
    f"{'cell':24s} {'method':11s} {'metric':9s} {'n':>3s} {'Δ% mean':>8s} {'95% CI (t)':>15s} "
    f"{'95% CI (boot)':>15s} {'Wilcoxon p':>10s} {'Holm p':>8s} {'wins':>6s}"
  )
  lines += [
    "",
    "Test metrics: paired relative change vs plain on the evaluation seeds "
    f"(Holm over {result['holm_family_size']} comparisons)",
    head,
    "-" * len(head),
  ]
  for row in result["comparisons"]:
    for metric, m in row["metrics"].items():
      lines.append(
        f"{row['cell']:24s} {row['label']:11s} {metric:9s} {m['n']:3d} {m['mean']:+8.2f} {_ci(m['t_ci']):>15s} "
        f"{_ci(m['boot_ci']):>15s} {_p(m['wilcoxon_p']):>10s} {_p(m['holm_p']):>8s} {m['wins']:>3d}/{m['n']:<2d}"
      )
    if row["failed_seeds"]:
      lines.append(f"{'':24s} {row['label']:11s} diverged on seeds {row['failed_seeds']} (left out)")

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
  published = result["beside_paper"]
  if published:
    head = (
      f"{'cell':24s} {'method':6s} {'metric':9s} {'paper plain':>11s} {'paper gain':>10s} {'n':>3s} "
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
        f"{b['paper_gain']:+9.1f}% {b['n']:3d} {_value(b['plain_mean']) + _value_ci(b['plain_ci']):>27s} "
        f"{_value(b['method_mean']):>10s} {ours:>22s} {_yes_no(b['paper_gain_in_ci']):>5s} "
        f"{_count(b['seeds_for_power']):>6s}  {b['note']}"
      )
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
      "n",
      "mean_delta_pct",
      "t_ci_low",
      "t_ci_high",
      "boot_ci_low",
      "boot_ci_high",
      "wilcoxon_p",
      "holm_p",
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
          m["n"],
          m["mean"],
          *m["t_ci"],
          *m["boot_ci"],
          m["wilcoxon_p"],
          m["holm_p"],
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


def forest_plot(result: dict[str, Any], path: Path) -> bool:
  """Δ % with its 95 % t interval per cell and method, one panel per metric; ``False`` if nothing to plot."""

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in result["comparisons"] if r["metrics"]]
  if not rows:
    return False
  fig, axes = plt.subplots(
    1, len(METRICS), figsize=(4.2 * len(METRICS), 1.6 + 0.42 * len(rows)), sharey=True, squeeze=False
  )
  y = np.arange(len(rows))[::-1]
  legend = None
  labels = [f"{r['cell']} {r['label']} (n={next(iter(r['metrics'].values()))['n']})" for r in rows]
  for ax, metric in zip(axes[0], METRICS):
    ax.axvline(0, color="k", lw=0.8)
    for yi, r in zip(y, rows):
      m = r["metrics"].get(metric)
      if not m:
        continue
      lo, hi = m["t_ci"]
      color = "C0" if r["method"] == "mg" else {"sam": "C1", "gnp": "C2"}.get(r["method"], "C3")
      if math.isfinite(lo):
        ax.plot([lo, hi], [yi, yi], color=color, lw=2)
      ax.plot([m["mean"]], [yi], "o", color=color)
      for p in r["paper"]:
        if p["metric"] == metric:
          ax.plot([p["gain"]], [yi], "D", color="red", ms=6, mfc="none", label="the paper's reported gain")
    ax.set_title(f"Δ test {metric} vs plain (%)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if handles:  # one figure-level legend, in the title row, so it never covers a row's interval
      legend = (handles[:1], names[:1])
  axes[0][0].set_yticks(y, labels, fontsize=8)
  if legend:
    fig.legend(*legend, loc="upper right", fontsize=8, frameon=False)
  fig.suptitle(f"{result['study']}: mean paired change with 95 % CI (t), evaluation seeds", fontsize=10)
  fig.tight_layout()
  save_png(fig, path, dpi=100)
  return True


def format_markdown(result: dict[str, Any]) -> str:
  """The comparison as a Markdown table (Δ % [95 % t CI] per metric), with the paper protocol and A/A."""
  pp = {(p["cell"], p["method"]): p for p in result["paper_protocol"]}
  head = (
    ["cell", "method (winner)", "n"]
    + [f"Δ{m} % [95 % CI]" for m in METRICS]
    + ["min Holm p", "grad evals", "paper protocol Δrecall@5 (A/A)"]
  )
  lines = [
    f"Study `{result['study']}`: {result['runs_done']}/{result['runs_total']} runs finished"
    + f" ({_progress(result)}).",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for row in result["comparisons"]:
    ms = row["metrics"]
    if not ms:
      continue
    cells = [f"{ms[m]['mean']:+.1f} {_ci(ms[m]['t_ci'])}" if m in ms else "-" for m in METRICS]
    holm_min = min((m["holm_p"] for m in ms.values() if math.isfinite(m["holm_p"])), default=math.nan)
    p = pp.get((row["cell"], row["label"]))
    paper = "-"
    if p:
      paper = f"{p['gain']['recall@5']['mean']:+.1f}"
      if p["aa_gain"]:
        paper += f" ({p['aa_gain']['recall@5']['mean']:+.1f})"
    label = f"{row['label']} ({_point(row['point'])})" if row["point"] else row["label"]
    n = next(iter(ms.values()))["n"]
    lines.append(
      "| "
      + " | ".join([row["cell"], label, str(n), *cells, _p(holm_min), f"{row['cost']['grad_evals_ratio']:.2f}×", paper])
      + " |"
    )
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
            str(b["n"]),
            ours,
            f"{b['mean']:+.1f} {_ci(b['t_ci'])}",
            _yes_no(b["paper_gain_in_ci"]),
            _count(b["seeds_for_power"]),
            b["note"],
          ]
        )
        + " |"
      )
  return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
  atomic_write(out_dir / "study.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
  atomic_write(out_dir / "study.csv", _csv(result))
  atomic_write(out_dir / "study.md", format_markdown(result))
  written = [out_dir / "study.json", out_dir / "study.csv", out_dir / "study.md"]
  if forest_plot(result, out_dir / "forest.png"):
    written.append(out_dir / "forest.png")
  else:
    (out_dir / "forest.png").unlink(missing_ok=True)  # never leave a picture of other records
  return written
