"""benchmarks.study.probes: robustness at study grade -- spec errors, keys, a study end to end whose paired
figures are recomputed here from the stored probe records."""

import copy
import io
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.study import __main__ as study_cli
from benchmarks.study import probes
from benchmarks.study.report import format_report
from benchmarks.study.spec import Robustness, parse_spec

BASE = {
  "name": "t",
  "tuning_seeds": 1,
  "eval_seed_start": 100,
  "train": {"max_epochs": 2, "patience": 2, "batch_size": 256},
  "grids": {"mg": {"alpha1": [1.0], "alpha2": [0.1]}},
  "cells": [{"data": "synthetic:tiny", "models": ["vbpr"], "methods": ["plain", "mg"], "eval_seeds": 3}],
  "primary": {"metric": "recall@5", "test": "paired_t", "family": "mg-vs-plain", "alpha": 0.05},
  "robustness": {"methods": ["plain", "mg"], "seeds": 2},
}


def _with(key, value):
  raw = copy.deepcopy(BASE)
  raw["robustness"][key] = value
  return raw


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("cells", ["synthetic:tiny/bm3"], r"\[robustness\].cells: expected distinct cells of \['synthetic:tiny/vbpr'\]"),
    ("methods", ["mg", "plain"], r"\[robustness\].methods: expected distinct methods starting with 'plain'"),
    ("methods", ["plain", "sam"], r"\[robustness\].methods: cell synthetic:tiny/vbpr does not evaluate \['sam'\]"),
    ("seeds", 4, r"\[robustness\].seeds: 4 > the evaluation seeds of cell synthetic:tiny/vbpr"),
    ("seeds", 1, r"\[robustness\].seeds: expected the number \(>= 2\)"),
    ("sigmas", [0.0, 0.1], r"\[robustness\].sigmas: expected a non-empty list of distinct numbers in \(0, inf\)"),
    ("fractions", [0.1, 1.0], r"\[robustness\].fractions"),
    ("draws", 0, r"\[robustness\].draws: expected an integer >= 1"),
    ("metrics", ["recall@7"], r"\[robustness\].metrics"),
    ("colour", "red", r"\[robustness\]: unknown key"),
  ],
)
def test_robustness_spec_errors_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    parse_spec(_with(key, value), source="t.toml")


def test_robustness_spec_defaults_and_absence():
  rob = parse_spec(BASE).robustness
  assert rob == Robustness(cells=("synthetic:tiny/vbpr",), methods=("plain", "mg"), seeds=2)
  assert rob.sigmas == (1e-3, 1e-2, 1e-1) and rob.draws == 10 and rob.metrics == ("recall@5", "ndcg@5")
  raw = copy.deepcopy(BASE)
  del raw["robustness"]
  assert parse_spec(raw).robustness is None


def test_probe_key_depends_on_the_run_and_the_settings_only():
  a = Robustness(cells=("x/y",), methods=("plain", "mg"), seeds=2)
  b = Robustness(cells=("x/z",), methods=("plain", "sam"), seeds=5)  # other runs chosen, same measurement
  c = Robustness(cells=("x/y",), methods=("plain", "mg"), seeds=2, draws=3)
  assert probes.probe_key("k1", a.settings()) == probes.probe_key("k1", b.settings())
  assert probes.probe_key("k1", a.settings()) != probes.probe_key("k2", a.settings())
  assert probes.probe_key("k1", a.settings()) != probes.probe_key("k1", c.settings())
  assert len(probes.probe_key("k1", a.settings())) == 24


SPEC = """
name = "probe-test"
tuning_seeds = 1
[primary]
metric = "recall@5"
test = "paired_t"
family = "mg-vs-plain"
alpha = 0.05
[train]
max_epochs = 3
patience = 3
batch_size = 256
[grids]
mg = { alpha1 = [1.0], alpha2 = [0.5] }
[[cells]]
data = "synthetic:tiny"
models = ["vbpr"]
methods = ["plain", "mg"]
eval_seeds = 3
[robustness]
methods = ["plain", "mg"]
seeds = 3
sigmas = [1e-3, 1e-1]
draws = 2
fractions = [0.2]
hessian_iters = 3
hessian_pairs = 256
"""


def _t_interval(d):
  d = np.asarray(d, dtype=np.float64)
  half = sps.t.ppf(0.975, d.size - 1) * np.std(d, ddof=1) / math.sqrt(d.size)
  return d.mean() - half, d.mean() + half


def test_probes_end_to_end_reproduce_the_runs_and_pair_the_drops(tmp_path, monkeypatch):
  spec = tmp_path / "probe.toml"
  spec.write_text(SPEC)
  args = [str(spec), "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--no-progress"]
  out = io.StringIO()
  monkeypatch.setattr("sys.stdout", out)
  result = study_cli.main(args).result
  assert sum(line.startswith("[robustness") for line in out.getvalue().splitlines()) == 6
  rob = result["robustness"]
  assert (rob["done"], rob["total"], rob["reproduced"]) == (6, 6, 6)  # retrained bit for bit

  # the probe records, read back independently of the analysis
  recs = [json.loads(p.read_text()) for p in (tmp_path / "store" / "probes").glob("*.json")]
  runs = {
    json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*.json")
  }
  assert len(recs) == 6 and not [p for p in (tmp_path / "work" / "probes").iterdir() if p.is_dir()]  # no checkpoints
  by = {(r["method"], r["seed"]): r for r in recs}
  for r in recs:
    assert r["reproduced"] and r["mismatched"] == {} and r["run_key"] in runs
    assert r["clean"] == {m: runs[r["run_key"]]["test"][m] for m in ("recall@5", "ndcg@5")}
    assert [x["sigma"] for x in r["noise"]["results"]] == [1e-3, 1e-1]
    kinds = sorted(x["kind"] for x in r["adjustment"]["results"])
    assert kinds == ["image_noise", "text_swap"]  # VBPR reads both feature tables
    for x in r["noise"]["results"]:
      for m in ("recall@5", "ndcg@5"):
        assert len(x[m]["values"]) == 2
        assert x[m]["drop"] == pytest.approx((r["clean"][m] - np.mean(x[m]["values"])) / r["clean"][m])

  rows = {(x["kind"], x["level"], x["metric"]): x for x in rob["rows"]}
  assert set(rows) == {
    (k, lv, m)
    for k, lv in [("noise", 1e-3), ("noise", 1e-1), ("text_swap", 0.2), ("image_noise", 0.2)]
    for m in ("recall@5", "ndcg@5")
  }
  seeds = [100, 101, 102]
  for (kind, level, metric), row in rows.items():

    def drop(rec):
      res = rec["noise"]["results"] if kind == "noise" else rec["adjustment"]["results"]
      x = next(
        x
        for x in res
        if (x["sigma"] if kind == "noise" else (x["kind"], x["fraction"]))
        == (level if kind == "noise" else (kind, level))
      )
      return 100 * x[metric]["drop"]

    d = [drop(by[("mg", s)]) - drop(by[("plain", s)]) for s in seeds]
    assert row["delta"]["n"] == 3 and row["delta"]["mean"] == pytest.approx(np.mean(d))
    assert row["plain_drop"] == pytest.approx(np.mean([drop(by[("plain", s)]) for s in seeds]))
    if np.std(d) > 0:
      assert row["delta"]["ci"] == pytest.approx(list(_t_interval(d)))
  (flat,) = rob["flatness"]
  eig = {k: v["flatness"]["top_eigenvalue"] for k, v in by.items()}
  ep, em = np.array([eig[("plain", s)] for s in seeds]), np.array([eig[("mg", s)] for s in seeds])
  change = 100 * (em - ep) / ep if flat["relative"] else em - ep
  assert flat["relative"] == bool(np.all(ep > 0)) and flat["change"]["mean"] == pytest.approx(change.mean())
  assert flat["plain_median"] == pytest.approx(np.median(ep))

  text = (tmp_path / "store" / "study.md").read_text()
  assert "## Robustness and flatness" in text and "text swap 20%" in text and "noise σ 0.1" in text

  # a second run measures nothing again and reports the same figures
  def no_measuring(*a, **k):
    raise AssertionError("a stored probe was measured again")

  monkeypatch.setattr(probes, "measure", no_measuring)
  again = study_cli.main(args + ["--report-only"]).result
  assert json.loads(json.dumps(again["robustness"])) == json.loads(json.dumps(rob))
  assert study_cli.main(args).result["robustness"]["done"] == 6


AA_SPEC = """
name = "aa-test"
tuning_seeds = 2
aa_variants = 2
aa_lr_factors = [0.9, 1.1, 1.2]
[primary]
metric = "recall@5"
test = "paired_t"
family = "mg-vs-plain"
alpha = 0.05
[train]
max_epochs = 2
patience = 2
batch_size = 256
[grids]
mg = { alpha1 = [1.0], alpha2 = [0.1, 0.5] }
[[cells]]
data = "synthetic:tiny"
models = ["lightgcn"]
methods = ["plain", "mg"]
eval_seeds = 2
"""


def test_matched_aa_is_plain_at_neighbouring_learning_rates_with_plains_order(tmp_path, monkeypatch):
  import itertools

  spec = tmp_path / "aa.toml"
  spec.write_text(AA_SPEC)
  args = [str(spec), "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--no-progress"]
  monkeypatch.setattr("sys.stdout", io.StringIO())
  result = study_cli.main(args).result
  recs = [json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*.json")]
  matched = [r for r in recs if r["info"]["phase"] == "aa-lr"]
  assert sorted((r["seed"], r["identity"]["config"]["learning_rate"]) for r in matched) == [
    (s, pytest.approx(1e-3 * f)) for s in (0, 1) for f in (0.9, 1.1, 1.2)
  ]
  assert all(r["identity"]["config"]["order_seed"] is None and r["method"] == "plain" for r in matched)
  (pp,) = result["paper_protocol"]
  plain = {r["seed"]: r for r in recs if r["info"]["phase"] == "tune" and r["method"] == "plain"}
  for metric in ("recall@5", "recall@20"):
    gains = []  # best of k = 2 on test recall@20 among each 2-subset of the 3 matched runs, vs plain
    for subset in itertools.combinations((0.9, 1.1, 1.2), 2):
      for seed in (0, 1):
        cand = [
          next(
            r
            for r in matched
            if r["seed"] == seed and r["identity"]["config"]["learning_rate"] == pytest.approx(1e-3 * f)
          )
          for f in subset
        ]
        best = max(cand, key=lambda r: r["test"]["recall@20"])  # max keeps the first of equal values, as argmax
        gains.append(100 * (best["test"][metric] - plain[seed]["test"][metric]) / plain[seed]["test"][metric])
    got = pp["aa_lr_gain"][metric]
    assert got["subsets"] == 3 and got["mean"] == pytest.approx(np.mean(gains))
    assert got["median"] == pytest.approx(np.median(gains)) and got["p90"] == pytest.approx(np.percentile(gains, 90))
  assert "matched A/A" in format_report(result) and "matched A/A" in (tmp_path / "store" / "study.md").read_text()


@pytest.mark.parametrize(
  "value, message",
  [
    ([1.0, 1.1], "aa_lr_factors: 1 is plain itself"),
    ([0.0], "aa_lr_factors: expected a non-empty list"),
    ([1.1, 1.1], "aa_lr_factors"),
  ],
)
def test_aa_lr_factor_errors(value, message):
  raw = copy.deepcopy(BASE)
  raw["aa_lr_factors"] = value
  with pytest.raises(ValueError, match=message):
    parse_spec(raw, source="t.toml")
