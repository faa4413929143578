"""Every figure of a study from its stored records: :func:`analyse` (grid winners, the paired comparisons on
the evaluation seeds, their costs, the paper's protocol on the tuning seeds and its A/A control).

The result is a plain dict (it is ``study.json``); :mod:`benchmarks.study.report` formats it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from benchmarks.study import stats
from benchmarks.study.probes import robustness_analysis
from benchmarks.study.plan import Plan, PlannedRun, is_ok
from benchmarks.study.report import beside_paper
from benchmarks.study.spec import METRICS, SELECT_METRIC, Cell, Primary, Study
from benchmarks.training.records import trained_on

__all__ = ["POOLED_METHODS", "analyse", "pool_studies", "pooled_estimates"]

#: The methods whose cells are pooled (random effects), each against plain.
POOLED_METHODS = ("mg", "sam")


def _edges(study: Study, method: str, point: Mapping[str, Any]) -> list[str]:
  return _edges_of(study.grids.get(method, {}), point)


def _edges_of(grid: Mapping[str, Sequence[Any]], point: Mapping[str, Any]) -> list[str]:
  out = []
  for name, values in grid.items():
    if len(values) > 2 and point[name] in (min(values), max(values)):
      out.append(f"{name}={point[name]:g} is the grid's {'minimum' if point[name] == min(values) else 'maximum'}")
  return out


def analyse(plan: Plan) -> dict[str, Any]:
  """Every figure of the study from the stored records (runs not finished yet are left out and counted)."""
  study = plan.study
  progress = plan.progress()
  comparisons, tuning, paper_protocol = [], [], []
  for cell in study.cells:
    model_table = plan.model_table(cell)
    if model_table is None:
      continue  # the model grid is not decided yet: nothing else of this cell can be compared
    if cell.tune_from is None and study.model_points(cell) != [{}]:
      win = plan.model_winner(cell)
      tuning.append(
        {
          "cell": cell.name,
          "method": "plain (model)",
          "winner": win,
          "edges": _edges_of(cell.model_grid, win),
          "table": [{"point": p, "valid_mean": v} for p, v in model_table],
        }
      )
    plain = {s: plan.record(plan.planned_run(cell, "eval", "plain", {}, s)) for s in study.eval_seeds(cell, "plain")}
    for label in cell.labels()[1:]:
      method = label.split("@")[0]
      point = plan.variant_point(cell, label)
      if point is None:
        continue
      recs = {s: plan.record(plan.planned_run(cell, "eval", label, point, s)) for s in study.eval_seeds(cell, label)}
      seeds = [s for s in recs if is_ok(recs[s]) and is_ok(plain.get(s))]
      failed = [s for s in recs if recs[s] is not None and not is_ok(recs[s])]
      missing = [s for s in recs if recs[s] is None or plain.get(s) is None]  # planned, not trained yet
      row = {
        "study": study.name,
        "cell": cell.name,
        "data": cell.data_key,
        "model": cell.model,
        "label": label,
        "method": method,
        "point": point,
        "seeds": seeds,
        "n_planned": len(recs),
        "failed_seeds": failed,
        "missing_seeds": missing,
        "complete": not missing,
        "metrics": {},
      }
      for metric in METRICS:
        if len(seeds) == 0:
          continue
        d = stats.relative_change([recs[s]["test"][metric] for s in seeds], [plain[s]["test"][metric] for s in seeds])
        summ = stats.summarize_paired(d)
        sd = float(np.std(d, ddof=1)) if summ.n > 1 else math.nan
        row["metrics"][metric] = {
          "diffs": d.tolist(),
          "n": summ.n,
          "mean": summ.mean,
          "sd": sd,
          "mde80": stats.min_detectable_effect(summ.n, sd) if sd > 0 else math.nan,
          "t_ci": list(summ.t_ci),
          "boot_ci": list(summ.boot_ci),
          "t_p": summ.t_p,
          "wilcoxon_p": summ.wilcoxon_p,
          "wins": summ.wins,
          "losses": summ.losses,
          "ties": summ.ties,
          "method_mean": float(np.mean([recs[s]["test"][metric] for s in seeds])),
          "plain_mean": float(np.mean([plain[s]["test"][metric] for s in seeds])),
          "plain_ci": list(stats.mean_ci([plain[s]["test"][metric] for s in seeds])[1]),
        }
      if seeds:
        row["cost"] = {
          "grad_evals_ratio": float(
            sum(recs[s]["grad_evals"] for s in seeds) / sum(plain[s]["grad_evals"] for s in seeds)
          ),
          "wall_ratio": float(sum(recs[s]["wall_s"] for s in seeds) / sum(plain[s]["wall_s"] for s in seeds)),
          "epochs_method": float(np.mean([recs[s]["epochs"] for s in seeds])),
          "epochs_plain": float(np.mean([plain[s]["epochs"] for s in seeds])),
          "where": sorted({trained_on(r) for s in seeds for r in (recs[s], plain[s])}),
        }
      row["paper"] = [
        dataclasses.asdict(p)
        for p in study.paper
        if p.model == cell.model and p.method == method and label == method and p.data in (None, cell.data_key)
      ]
      comparisons.append(row)

    if cell.tune_from is None:
      for method in cell.methods[1:]:
        table = plan.tuning_table(cell, method)
        if table is None:
          continue
        win = max(table, key=lambda t: t[1])[0]
        tuning.append(
          {
            "cell": cell.name,
            "method": method,
            "winner": win,
            "edges": _edges(study, method, win),
            "table": [{"point": p, "valid_mean": v} for p, v in table],
          }
        )
        paper_protocol.append(_paper_protocol(plan, cell, method))

  for row in comparisons:
    # every metric of every seed equal to plain's: the method changed nothing (e.g. GNP on LightGCN); there is
    # nothing to test, and a test of 0 against 0 would only dilute a family
    row["identical"] = bool(row["metrics"]) and all(all(x == 0 for x in m["diffs"]) for m in row["metrics"].values())
  primary = _primary_analysis(study, comparisons)
  result = {
    "study": study.name,
    "description": study.description,
    "source": study.source,
    "runs_done": sum(c["done"] for c in progress),
    "runs_total": sum(c["total"] for c in progress),
    "progress": progress,
    "tuning_seeds": list(study.tuning_seeds),
    "primary": primary,
    "identical": [
      {"cell": r["cell"], "label": r["label"], "n": next(iter(r["metrics"].values()))["n"]}
      for r in comparisons
      if r["identical"]
    ],
    "comparisons": comparisons,
    "pooled": pooled_estimates(comparisons),
    "tuning": tuning,
    "paper_protocol": [p for p in paper_protocol if p],
    "robustness": robustness_analysis(plan),
  }
  result["beside_paper"] = beside_paper(result)
  return result


def _role(primary: Optional[Primary], row: dict[str, Any], metric: str) -> str:
  """``primary`` (the declared family), ``secondary`` (its method's ``@default`` variant on the primary metric),
  ``identical`` (dropped from every family) or ``exploratory``."""
  if row["identical"]:
    return "identical"
  if primary is not None and metric == primary.metric:
    if row["label"] == primary.method:
      return "primary"
    if row["label"] == f"{primary.method}@default":
      return "secondary"
  return "exploratory"


def _primary_analysis(study: Study, comparisons: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """Sets every metric's ``role`` and ``holm_p`` (Holm over the paired t p-values of its family: primary or
  secondary; nan for exploratory and identical comparisons) and returns the declared family's table."""
  primary = study.primary
  families: dict[str, list[dict[str, Any]]] = {"primary": [], "secondary": []}
  for row in comparisons:
    for metric, m in row["metrics"].items():
      m["role"] = _role(primary, row, metric)
      m["holm_p"] = math.nan
      if m["role"] in families:
        families[m["role"]].append(m)
  for members in families.values():
    for m, p in zip(members, stats.holm([m["t_p"] for m in members]).tolist()):
      m["holm_p"] = p
  if primary is None:
    return None

  def member(row: dict[str, Any]) -> dict[str, Any]:
    m = row["metrics"][primary.metric]
    return {
      "cell": row["cell"],
      "label": row["label"],
      "point": row["point"],
      "n": m["n"],
      "n_planned": row["n_planned"],
      "complete": row["complete"],
      "mean": m["mean"],
      "t_ci": m["t_ci"],
      "t_p": m["t_p"],
      "holm_p": m["holm_p"],
      "wilcoxon_p": m["wilcoxon_p"],
      "mde80": m["mde80"],
      "rejects": bool(math.isfinite(m["holm_p"]) and m["holm_p"] <= primary.alpha),
    }

  rows = {
    role: [member(r) for r in comparisons if r["metrics"].get(primary.metric, {}).get("role") == role]
    for role in families
  }
  evaluated = {r["cell"] for r in comparisons if r["label"] == primary.method and r["metrics"]}
  return {
    **dataclasses.asdict(primary),
    "family": primary.family,
    "family_size": int(np.sum(np.isfinite([m["t_p"] for m in families["primary"]]))),
    "secondary_family_size": int(np.sum(np.isfinite([m["t_p"] for m in families["secondary"]]))),
    "members": rows["primary"],
    "secondary": rows["secondary"],
    "dropped": [
      {"cell": r["cell"], "label": r["label"], "reason": "identical to plain on every seed and metric"}
      for r in comparisons
      if r["identical"] and r["label"].split("@")[0] == primary.method
    ],
    "not_evaluated": [c.name for c in study.cells if primary.method in c.methods and c.name not in evaluated],
  }


def pooled_estimates(
  comparisons: Sequence[dict[str, Any]], methods: Sequence[str] = POOLED_METHODS
) -> list[dict[str, Any]]:
  """Random-effects (DerSimonian–Laird) pooling of each method's tuned winner against plain across the cells of
  ``comparisons`` (rows of :func:`analyse`, of one study or several), per metric.

  A cell's effect is its mean per-seed relative change (%), its variance the squared standard error of that
  mean (sd² / n). Left out, and listed with the reason: comparisons identical to plain, cells with fewer than 2
  paired seeds, and cells whose per-seed changes have no spread (variance 0). Cells with fewer seeds than
  planned are pooled at their actual n and counted as incomplete. Fewer than 2 cells: no estimate.
  """
  out = []
  for method in methods:
    rows = [r for r in comparisons if r["label"] == method and r["metrics"]]
    if not rows:
      continue
    for metric in METRICS:
      cells, excluded = [], []
      for r in rows:
        m = r["metrics"].get(metric)
        where = {"study": r.get("study"), "cell": r["cell"]}
        if m is None:
          continue
        if r["identical"]:
          excluded.append({**where, "reason": "identical to plain"})
        elif m["n"] < 2:
          excluded.append({**where, "reason": f"n = {m['n']}: no standard error"})
        elif not m["sd"] > 0:
          excluded.append({**where, "reason": "no spread across seeds: variance 0"})
        else:
          se = m["sd"] / math.sqrt(m["n"])
          cells.append(
            {
              **where,
              "n": m["n"],
              "n_planned": r["n_planned"],
              "complete": r["complete"],
              "effect": m["mean"],
              "se": se,
            }
          )
      entry: dict[str, Any] = {
        "method": method,
        "metric": metric,
        "k": len(cells),
        "incomplete": sum(not c["complete"] for c in cells),
        "cells": cells,
        "excluded": excluded,
      }
      nan2 = [math.nan, math.nan]
      if len(cells) >= 2:
        ma = stats.random_effects([c["effect"] for c in cells], [c["se"] ** 2 for c in cells])
        for c, w in zip(cells, ma.weights):
          c["weight"] = w
        entry.update(estimate=ma.estimate, se=ma.se, ci=list(ma.ci), tau2=ma.tau2, i2=ma.i2, q=ma.q, pi=list(ma.pi))
      else:
        entry.update(estimate=math.nan, se=math.nan, ci=nan2, tau2=math.nan, i2=math.nan, q=math.nan, pi=nan2)
      out.append(entry)
  return out


def pool_studies(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The random-effects estimate across the cells of several studies (results of :func:`analyse`): the rows it
  pools (each method's winner of :data:`POOLED_METHODS`), the per-study progress, and :func:`pooled_estimates`
  over all of them. A cell that appears in two studies would be pooled twice: that is refused.

  Raises:
    ValueError: fewer than one result, a study given twice, or one data/model cell in two studies.
  """
  names = [r["study"] for r in results]
  if not names or len(set(names)) != len(names):
    raise ValueError(f"pool_studies needs distinct studies, got {names}")
  rows = [row for r in results for row in r["comparisons"] if row["label"] in POOLED_METHODS and row["metrics"]]
  seen: dict[tuple[str, str], str] = {}
  for row in rows:
    key = (row["cell"], row["label"])
    if key in seen and seen[key] != row["study"]:
      raise ValueError(
        f"cell {row['cell']} ({row['label']}) is in studies {seen[key]} and {row['study']}: pooled once only"
      )
    seen[key] = row["study"]
  return {
    "study": "pooled",
    "studies": names,
    "sources": [r["source"] for r in results],
    "runs_done": sum(r["runs_done"] for r in results),
    "runs_total": sum(r["runs_total"] for r in results),
    "primary_metric": sorted({r["primary"]["metric"] for r in results if r.get("primary")}),
    "comparisons": rows,
    "pooled": pooled_estimates(rows),
  }


def _paper_protocol(plan: Plan, cell: Cell, method: str) -> Optional[dict[str, Any]]:
  """Winner chosen on test on each tuning seed vs plain on that seed, and the A/A control of it."""
  study = plan.study
  points = study.grid_points(method)
  out = {
    "cell": cell.name,
    "method": method,
    "k": len(points),
    "select_metric": SELECT_METRIC,
    "seeds": list(study.tuning_seeds),
    "gain": {},
  }
  recs, base = [], []
  for seed in study.tuning_seeds:
    row = [plan.record(plan.planned_run(cell, "tune", method, p, seed)) for p in points]
    b = plan.record(plan.planned_run(cell, "tune", "plain", {}, seed))
    if not all(is_ok(r) for r in row) or not is_ok(b):
      return None
    recs.append(row)
    base.append(b)
  select = np.array([[r["test"][SELECT_METRIC] for r in row] for row in recs])
  out["winners"] = [points[int(i)] for i in np.argmax(select, axis=1)]
  for metric in METRICS:
    cand = np.array([[r["test"][metric] for r in row] for row in recs])
    g = stats.best_of_k_gain(cand, np.array([b["test"][metric] for b in base]), select)
    out["gain"][metric] = {"per_seed": g.tolist(), "mean": float(np.mean(g))}

  k = len(points)
  orders = [
    [plan.planned_run(cell, "aa", "plain", {}, seed, o) for o in range(1, study.aa_variants + 1)]
    for seed in study.tuning_seeds
  ]
  out["aa_gain"] = _aa_gain(plan, orders, base, k)
  # the matched A/A: plain at neighbouring learning rates (same initialisation and data order, like a grid point)
  out["aa_lr_gain"] = _aa_gain(plan, [plan.aa_lr_runs(cell, seed) for seed in study.tuning_seeds], base, k)
  return out


def _aa_gain(plan: Plan, runs: list[list[PlannedRun]], base: list[dict[str, Any]], k: int) -> dict[str, Any]:
  """An A/A control of the paper protocol: best of ``k`` no-op candidates (``runs[seed]``) on test vs plain
  (``base[seed]``), per metric: the mean over seeds of the mean over every k-subset of the candidates (each an
  equally likely "grid"), and the median and 90th percentile over every (seed, k-subset). Empty while there are
  fewer than ``k`` candidates or any of them has not finished."""
  if not runs or len(runs[0]) < k:
    return {}
  rows = [[plan.record(r) for r in row] for row in runs]
  if not all(is_ok(r) for row in rows for r in row):
    return {}
  sel = np.array([[r["test"][SELECT_METRIC] for r in row] for row in rows])
  subsets = list(itertools.combinations(range(len(rows[0])), k))
  out = {}
  for metric in METRICS:
    cand = np.array([[r["test"][metric] for r in row] for row in rows])
    b = np.array([x["test"][metric] for x in base])
    gains = np.array([stats.best_of_k_gain(cand[:, list(s)], b, sel[:, list(s)]) for s in subsets])
    g = np.mean(gains, axis=0)
    out[metric] = {
      "per_seed": g.tolist(),
      "mean": float(np.mean(g)),
      "subsets": len(subsets),
      "median": float(np.median(gains)),
      "p90": float(np.percentile(gains, 90)),
    }
  return out
