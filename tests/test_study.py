"""benchmarks.study: spec validation, the protocol's choices on planted records, and a tiny study end to end."""

import copy
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.runtime import cli
from benchmarks.runtime import workers as workers_lib
from benchmarks.study import __main__ as study_cli
from benchmarks.study import runner, stats
from benchmarks.study.analysis import analyse, pool_studies
from benchmarks.study.plan import Plan
from benchmarks.study.report import format_markdown, format_pooled_report, format_report, write_pooled_outputs
from benchmarks.study.spec import METRICS, REPO_ROOT, SpecError, load_spec, parse_spec
from benchmarks.training.records import RunStore, identity

BASE = {
  "name": "t",
  "tuning_seeds": 2,
  "eval_seed_start": 100,
  "aa_variants": 2,
  "train": {"max_epochs": 2, "patience": 2, "batch_size": 256},
  "grids": {"mg": {"alpha1": [1.0], "alpha2": [0.1, 0.5]}},
  "cells": [{"data": "synthetic:tiny", "models": ["lightgcn"], "methods": ["plain", "mg"], "eval_seeds": 3}],
  "primary": {"metric": "recall@5", "test": "paired_t", "family": "mg-vs-plain", "alpha": 0.05},
}


def _with(path, value):
  raw = copy.deepcopy(BASE)
  target = raw
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  return raw


@pytest.mark.parametrize(
  "path, value, message",
  [
    (("tuning_seeds",), [0, 0], "tuning_seeds: repeats a seed"),
    (("eval_seed_start",), 1, "overlap the tuning seeds"),
    (("grids", "mg", "alpha2"), [0.1, 2.0], r"method mg \{'alpha1': 1.0, 'alpha2': 2.0\}.*alpha1 > alpha2"),
    (("grids", "mg", "beta"), [0], "beta"),
    (("grids", "mg", "alpha2"), [0.1, "x"], r"\[grids\].mg.alpha2: alpha2 values must be finite numbers"),
    (("grids", "mg", "lr"), [0.1], r"\[grids\].mg.lr: not a method hyper-parameter"),
    (("grids", "plain"), {"rho": [0.1]}, r"\[grids\].plain: not a tunable method"),
    (("train", "max_epochs"), 0, r"\[train\]: TrainConfig.max_epochs must be >= 1"),
    (("train", "epochs"), 3, r"\[train\]: unknown key"),
    (("cells", 0, "methods"), ["mg", "plain"], "starting with 'plain'"),
    (("cells", 0, "methods"), ["plain", "sam"], r"method 'sam' has no \[grids\].sam"),
    (("cells", 0, "models"), ["nope"], r"cells\[0\].models"),
    (("cells", 0, "eval_seeds"), {"plain": 2, "mg": 3}, "plain needs at least as many seeds"),
    (("cells", 0, "eval_seeds"), {"plain": 3, "mg": 3, "mg@default": 2}, r"cells\[0\].eval_seeds: expected"),
    (("cells", 0, "eval_seeds"), {"plain": 3, "mg@default": 2}, r"cells\[0\].eval_seeds: expected"),
    (("cells", 0, "tune_from"), "synthetic:default", "no tuned cell synthetic:default/lightgcn"),
    (("cells", 0, "colour"), "red", r"cells\[0\]: unknown key"),
    (("primary", "metric"), "recall@7", r"\[primary\].metric: expected one of"),
    (("primary", "test"), "wilcoxon", r"\[primary\].test: expected one of \['paired_t'\]"),
    (("primary", "family"), "sam-vs-plain", r"\[primary\].family: expected '<method>-vs-plain'.*mg-vs-plain"),
    (("primary", "family"), "mg", r"\[primary\].family"),
    (("primary", "alpha"), 1.5, r"\[primary\].alpha: expected a number in \(0, 1\)"),
    (("primary", "alpha"), True, r"\[primary\].alpha"),
    (("primary", "tails"), 2, r"\[primary\]: unknown key"),
    (("primary",), "recall@5", r"\[primary\]: expected a table"),
  ],
)
def test_spec_errors_name_the_key(path, value, message):
  with pytest.raises(SpecError, match=message):
    parse_spec(_with(path, value), source="spec.toml")


_MARK = {"model": "lightgcn", "method": "mg", "metric": "recall@5", "gain": 7.3}


@pytest.mark.parametrize(
  "extra, message",
  [
    ({"plain": 0.0314}, "give both plain and value"),
    (
      {"plain": 0.0314, "value": 0.0350},
      r"paper\[0\].gain: 7.3 % disagrees with value / plain = 0.035 / 0.0314 \(\+11.46 %\)",
    ),
    ({"plain": 0, "value": 0.0337}, r"paper\[0\].plain: expected the published metric value in \(0, 1\]"),
    ({"plain": 0.0314, "value": "0.0337"}, r"paper\[0\].value: expected the published metric value"),
  ],
)
def test_paper_mark_errors_name_the_key(extra, message):
  with pytest.raises(SpecError, match=message):
    parse_spec({**BASE, "paper": [{**_MARK, **extra}]}, source="spec.toml")


def test_the_primary_analysis_is_required_and_parsed():
  raw = copy.deepcopy(BASE)
  del raw["primary"]
  with pytest.raises(SpecError, match=r"spec.toml: \[primary\]: missing"):
    parse_spec(raw, source="spec.toml")
  no_alpha = {k: v for k, v in BASE["primary"].items() if k != "alpha"}
  with pytest.raises(SpecError, match=r"\[primary\].alpha: missing"):
    parse_spec({**BASE, "primary": no_alpha}, source="spec.toml")
  p = parse_spec(BASE).primary
  assert (p.metric, p.test, p.method, p.family, p.alpha) == ("recall@5", "paired_t", "mg", "mg-vs-plain", 0.05)
  for name in ("tiny", "scientific", "amazon_lightgcn", "table9"):  # every shipped spec declares MG on recall@5
    p = load_spec(REPO_ROOT / "benchmarks" / "studies" / f"{name}.toml").primary
    assert (p.metric, p.test, p.family, p.alpha) == ("recall@5", "paired_t", "mg-vs-plain", 0.05)


def test_a_defaults_variant_can_have_its_own_number_of_seeds():
  cell = {**BASE["cells"][0], "defaults_too": ["mg"]}
  study = parse_spec({**BASE, "cells": [{**cell, "eval_seeds": {"plain": 4, "mg": 4, "mg@default": 2}}]})
  c = study.cells[0]
  assert study.eval_seeds(c, "plain") == study.eval_seeds(c, "mg") == [100, 101, 102, 103]
  assert study.eval_seeds(c, "mg@default") == [100, 101]
  # without its own entry the variant takes its method's number
  study = parse_spec({**BASE, "cells": [{**cell, "eval_seeds": {"plain": 4, "mg": 3}}]})
  assert study.eval_seeds(study.cells[0], "mg@default") == [100, 101, 102]
  with pytest.raises(SpecError, match=r"optionally \['mg@default'\]"):
    parse_spec({**BASE, "cells": [{**cell, "eval_seeds": {"plain": 4, "mg": 4, "sam@default": 2}}]})
  with pytest.raises(SpecError, match="plain needs at least as many seeds"):
    parse_spec({**BASE, "cells": [{**cell, "eval_seeds": {"plain": 2, "mg": 2, "mg@default": 3}}]})


def test_shipped_specs_parse():
  for name in ("tiny", "scientific", "amazon_lightgcn", "table9"):
    study = load_spec(REPO_ROOT / "benchmarks" / "studies" / f"{name}.toml")
    assert study.cells and study.tuning_seeds
  with pytest.raises(SpecError, match="not found"):
    load_spec("no/such/spec.toml")


def _fake(plan, run, valid, test, grad_evals=100, platform=None):
  plan.store.put(
    {
      **({"platform": platform} if platform else {}),
      "key": run.key,
      "identity": identity(run.config, plan.fingerprint(run.cell)),
      "status": "ok",
      "valid": {run.config.valid_metric: valid},
      "test": {m: test for m in METRICS},
      "grad_evals": grad_evals,
      "wall_s": 1.0,
      "epochs": 10,
      "info": run.info(),
    }
  )


def test_a_diverged_run_counts_as_done_and_the_report_still_builds(tmp_path):
  """A diverged record (as RunStore.run stores it: no wall time, no metrics) is finished, loses the grid,
  and leaves the time estimate to the runs that trained."""
  study = parse_spec(BASE)
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
  runs, _ = plan.runs()
  tune = [r for r in runs if r.phase == "tune"]
  diverged = next(r for r in tune if r.point.get("alpha2") == 0.5)
  for r in tune:
    if r is diverged:
      ident = identity(r.config, plan.fingerprint(r.cell))
      plan.store.put({"key": r.key, "identity": ident, "status": "diverged", "valid": {}, "test": {}, "info": r.info()})
    else:
      _fake(plan, r, 0.5, 0.5)
  (p,) = plan.progress()
  assert p["done"] == len(tune) and p["mean_run_s"] == 1.0 and p["left_s"] == p["total"] - len(tune)
  assert plan.winner(study.cells[0], "mg") == {"alpha1": 1.0, "alpha2": 0.1}  # the diverged point counts -inf
  result = analyse(plan)
  assert result["runs_done"] == len(tune)
  assert "h left at 0.0 min/run" in format_markdown(result)


def test_protocol_on_planted_records(tmp_path):
  """Winner on validation, paired test changes, the paper protocol on test, and its A/A control."""
  study = parse_spec({**BASE, "paper": [{**_MARK, "plain": 0.0314, "value": 0.0337, "note": "table 9"}]})
  datasets = runner.load_datasets(study)
  plan = Plan(study, datasets, RunStore(tmp_path / "runs", tmp_path / "work"))
  runs, waiting = plan.runs()
  assert waiting == 3  # MG's evaluation seeds wait for its winner
  total = len(runs) + 3
  assert plan.progress() == [
    {"cell": "synthetic:tiny/lightgcn", "done": 0, "total": total, "mean_run_s": None, "left_s": None}
  ]
  for r in runs:
    if r.phase == "tune":
      valid, test = {"plain": (0.5, 0.5), 0.1: (0.6, 0.4), 0.5: (0.55, 0.6)}[r.point.get("alpha2", "plain")]
      _fake(plan, r, valid, test)
  assert plan.winner(study.cells[0], "mg") == {"alpha1": 1.0, "alpha2": 0.1}  # best validation, not best test
  (p,) = plan.progress()  # every planted run took 1 s: the rest would take 1 s each
  assert p["mean_run_s"] == 1.0 and p["left_s"] == p["total"] - p["done"] > 0
  runs, waiting = plan.runs()
  assert waiting == 0
  gains = [0.1, 0.2, 0.3]
  for r in runs:
    if r.phase == "eval":
      assert r.label == "plain" or r.point == {"alpha1": 1.0, "alpha2": 0.1}
      _fake(
        plan,
        r,
        0.5,
        0.5 if r.label == "plain" else 0.5 * (1 + gains[r.seed - 100]),
        grad_evals=100 if r.label == "plain" else 133,
        platform={"backend": "gpu", "device": "NVIDIA H200"} if r.label != "plain" and r.seed == 102 else None,
      )
    elif r.phase == "aa":
      _fake(plan, r, 0.5, {1: 0.55, 2: 0.45}[r.order_seed])
  result = analyse(plan)
  assert result["runs_done"] == result["runs_total"] == len(runs)
  assert result["progress"] == [
    {"cell": "synthetic:tiny/lightgcn", "done": len(runs), "total": len(runs), "mean_run_s": 1.0, "left_s": 0.0}
  ]
  assert f"synthetic:tiny/lightgcn {len(runs)}/{len(runs)} (complete)" in format_markdown(result)
  (row,) = result["comparisons"]
  m = row["metrics"]["recall@5"]
  d = np.array([10.0, 20.0, 30.0])
  np.testing.assert_allclose(m["diffs"], d)
  half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
  np.testing.assert_allclose(m["t_ci"], [20 - half, 20 + half])
  # recall@5 is the declared primary metric: a family of one cell, so Holm leaves its paired t p as it is
  assert m["role"] == "primary" and m["t_p"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
  assert m["holm_p"] == pytest.approx(m["t_p"]) and m["wilcoxon_p"] == pytest.approx(0.25)  # exact, n = 3
  assert all(
    row["metrics"][x]["role"] == "exploratory" and math.isnan(row["metrics"][x]["holm_p"]) for x in METRICS[1:]
  )
  (member,) = result["primary"]["members"]
  assert member["cell"] == "synthetic:tiny/lightgcn" and member["complete"] and not member["rejects"]
  assert m["mde80"] == pytest.approx(stats.min_detectable_effect(3, 10.0))
  assert m["wins"] == 3 and row["cost"]["grad_evals_ratio"] == pytest.approx(1.33)
  # where the compared runs trained (a record without a platform predates them: a CPU run)
  assert row["cost"]["where"] == ["NVIDIA H200", "cpu"]
  (pp,) = result["paper_protocol"]
  assert pp["winners"] == [{"alpha1": 1.0, "alpha2": 0.5}] * 2  # chosen on test
  assert pp["gain"]["recall@5"]["mean"] == pytest.approx(20.0)
  assert pp["aa_gain"]["recall@5"]["mean"] == pytest.approx(10.0)  # best of 2 no-op variants: 0.55 vs 0.5
  text = format_report(result)
  assert "winner alpha1=1 alpha2=0.1" in text and "+20.0 (A/A +10.0)" in text
  assert "NVIDIA H200, cpu" in text
  # the published figures beside ours: our plain is 0.5 on every seed, MG 0.55, 0.6, 0.65 (mean 0.6)
  (b,) = result["beside_paper"]
  assert (b["paper_plain"], b["paper_value"], b["paper_gain"]) == (0.0314, 0.0337, 7.3)
  assert b["plain_mean"] == pytest.approx(0.5) and b["plain_ci"] == [0.5, 0.5]
  assert b["method_mean"] == pytest.approx(0.6) and b["mean"] == pytest.approx(20.0) and b["n"] == 3
  # the paper's +7.3 lies inside our CI [-4.8, +44.8]; per-seed sd 10 -> standardised 0.73 -> 17 seeds
  assert b["paper_gain_in_ci"] is True
  assert b["seeds_for_power"] == stats.seeds_for_power(7.3, 10.0) == 17
  row_md = next(line for line in format_markdown(result).splitlines() if "0.0314 → 0.0337" in line)
  assert "| +7.3 | 3 | 0.5000 [0.5000, 0.5000] → 0.6000 | +20.0 [" in row_md and row_md.endswith(
    "| yes | 17 | table 9 |"
  )
  assert "Published figures beside ours" in text


TINY_SPEC = """
name = "tiny-test"
tuning_seeds = 1
aa_variants = 2
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


def test_tiny_study_end_to_end(tmp_path, monkeypatch):
  spec = tmp_path / "tiny.toml"
  spec.write_text(TINY_SPEC)
  args = [str(spec), "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--no-progress"]
  out = io.StringIO()
  monkeypatch.setattr("sys.stdout", out)
  result = study_cli.main(args).result
  log = out.getvalue()
  assert result["runs_done"] == result["runs_total"] == 1 * 3 + 2 * 2 + 2
  assert sum(line.startswith("[") for line in log.splitlines()) == 9  # one line per finished run
  for name in ("study.json", "study.csv", "forest.png"):
    assert (tmp_path / "store" / name).stat().st_size > 0
  assert len(list((tmp_path / "store" / "runs").glob("*.json"))) == 9
  saved = json.loads((tmp_path / "store" / "study.json").read_text())

  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(RunStore, "run", no_training)
  again = study_cli.main(args).result  # everything is in the store: nothing trains, same figures
  assert json.loads(json.dumps(again)) == saved
  assert study_cli.main(args + ["--report-only"]).result == again
  assert "study tiny-test: 9/9 runs in the store, 0 to go" in out.getvalue()


def test_model_grid_is_tuned_with_plain_first_and_its_winner_used_everywhere(tmp_path):
  raw = copy.deepcopy(BASE)
  raw["cells"][0]["model_grids"] = {"lightgcn": {"reg_weight": [1e-4, 1e-2]}}
  study = parse_spec(raw)
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
  runs, waiting = plan.runs()
  assert {r.config.model_hparams["reg_weight"] for r in runs} == {1e-4, 1e-2}
  assert all(r.label == "plain" and r.phase == "tune" for r in runs) and len(runs) == 2 * 2
  assert waiting == 2 * 2 + 3 + 3 + 2 * 2  # MG grid on 2 seeds, 3 + 3 evaluation runs, 2 x 2 A/A
  for r in runs:  # reg_weight 1e-2 is better on validation, worse on test
    _fake(plan, r, *({1e-4: (0.5, 0.7), 1e-2: (0.6, 0.4)}[r.config.model_hparams["reg_weight"]]))
  assert plan.model_winner(study.cells[0]) == {"reg_weight": 1e-2}
  runs, waiting = plan.runs()
  assert waiting == 3  # now only MG's evaluation waits, for MG's winner
  assert all(r.config.model_hparams == {"reg_weight": 1e-2} for r in runs if r.label != "plain" or r.phase != "tune")
  result = analyse(plan)
  (model_row,) = [t for t in result["tuning"] if t["method"] == "plain (model)"]
  assert model_row["winner"] == {"reg_weight": 1e-2}
  with pytest.raises(SpecError, match="model_grids.lightgcn.reg_weight"):
    parse_spec(_with(("cells", 0, "model_grids"), {"lightgcn": {"reg_weight": []}}))
  with pytest.raises(SpecError, match="lightgcn"):
    parse_spec(_with(("cells", 0, "model_grids"), {"lightgcn": {"no_such_arg": [1, 2]}}))


def test_workers_share_one_study_and_train_every_run_once(tmp_path):
  spec = tmp_path / "tiny.toml"  # 6 runs: plain and MG tuned on one seed, then both on 2 evaluation seeds
  spec.write_text(
    TINY_SPEC.replace("aa_variants = 2", "aa_variants = 0").replace("alpha2 = [0.1, 0.5]", "alpha2 = [0.1]")
  )
  n = min(2, len(workers_lib.available_cores()))
  store, work = tmp_path / "store", tmp_path / "work"
  cmd = [sys.executable, "-m", "benchmarks.study", str(spec), "--workers", str(n), "--store", str(store)]
  proc = subprocess.run(cmd + ["--work-dir", str(work)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  finished = [line.split(": ")[0].split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[")]
  assert len(finished) == len(set(finished)) == 6  # every run trained once, by one worker or the other
  assert len(list((store / "runs").glob("*.json"))) == 6
  assert "Test metrics: paired relative change" in proc.stdout and (store / "study.json").exists()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--workers", "0"], "--workers must be between 1 and the"),
    (["--workers", "100000"], "--workers must be between 1 and the"),
    (["--workers", "2", "--max-runs", "1"], "cannot be combined with --max-runs"),
    (["--workers", "2", "--report-only"], "cannot be combined with --report-only"),
  ],
)
def test_workers_errors(flags, message, capsys, monkeypatch):
  monkeypatch.setattr(workers_lib, "available_cores", lambda: [0, 1])
  with pytest.raises(SystemExit):
    study_cli.main([str(REPO_ROOT / "benchmarks" / "studies" / "tiny.toml"), *flags])
  assert message in capsys.readouterr().err


def test_worker_env_adds_the_single_thread_flags_once():
  env = workers_lib.worker_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "A": "1"})
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *workers_lib.SINGLE_THREAD_XLA_FLAGS]
  assert env["A"] == "1" and workers_lib.worker_env(env) == env  # idempotent
  assert workers_lib.worker_env({})["XLA_FLAGS"].split() == list(workers_lib.SINGLE_THREAD_XLA_FLAGS)
  # workers sharing one GPU must not each reserve 75 % of it; an explicit setting is kept
  assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert workers_lib.worker_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_an_interrupted_study_says_so_in_one_line(tmp_path):
  """SIGINT (Ctrl-C, or `timeout -s INT` around a bounded session) ends the study with status 130 and one
  line, not a traceback (resuming from the store and checkpoints: tests/test_run_store.py)."""
  import signal

  spec = str(REPO_ROOT / "benchmarks" / "studies" / "tiny.toml")
  argv = [
    sys.executable,
    "-m",
    "benchmarks.study",
    spec,
    "--store",
    str(tmp_path / "s"),
    "--work-dir",
    str(tmp_path / "w"),
  ]
  proc = subprocess.Popen(
    [*argv, "--no-progress", "--max-runs", "3"],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal's Ctrl-C would find it
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  try:
    for line in proc.stdout:  # training starts right after this line
      if "runs in the store" in line:
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == cli.INTERRUPTED_EXIT, err
  assert "interrupted; finished runs are in the store" in err and "Traceback" not in err


def test_cells_plan_only_the_named_cells_after_the_tuning_they_depend_on(tmp_path):
  raw = copy.deepcopy(BASE)
  raw["cells"].append(
    {"data": "synthetic:tiny", "models": ["vbpr"], "methods": ["plain", "mg"], "eval_seeds": 2},
  )
  study = parse_spec(raw)
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
  lightgcn, vbpr = study.cells
  every, _ = plan.runs()
  runs, waiting = plan.runs([vbpr.name])
  assert runs == [r for r in every if r.cell is vbpr] and runs  # its own tuning; nothing of lightgcn
  assert waiting == 2  # MG's two evaluation runs wait for MG's winner
  for r in runs:
    _fake(plan, r, 0.5, 0.5)
  runs, waiting = plan.runs([vbpr.name])
  assert waiting == 0 and {r.phase for r in runs} == {"tune", "eval", "aa"}
  assert all(r.cell is vbpr for r in runs)
  both, _ = plan.runs([vbpr.name, lightgcn.name])  # in the order given
  assert both[: len(runs)] == runs and {r.cell.name for r in both[len(runs) :]} == {lightgcn.name}


def test_cells_of_a_tune_from_cell_bring_the_source_tuning_first(tmp_path):
  raw = copy.deepcopy(BASE)
  raw["cells"].append(
    {
      "data": "synthetic:default",
      "models": ["lightgcn"],
      "methods": ["plain", "mg"],
      "eval_seeds": 2,
      "tune_from": "synthetic:tiny",
    }
  )
  study = parse_spec(raw)
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
  source, target = study.cells
  runs, waiting = plan.runs([target.name])
  source_tuning = plan.tuning_runs(source)
  assert runs[: len(source_tuning)] == source_tuning  # the winners it needs, first
  assert all(r.cell is target and r.phase == "eval" for r in runs[len(source_tuning) :])
  assert {r.label for r in runs[len(source_tuning) :]} == {"plain"} and waiting == 2  # MG waits for the source
  for r in source_tuning:
    _fake(plan, r, 0.5 if r.point.get("alpha2") == 0.5 else 0.4, 0.5)
  runs, waiting = plan.runs([target.name])
  assert waiting == 0
  mg = [r for r in runs if r.cell is target and r.label == "mg"]
  assert len(mg) == 2 and all(r.point == {"alpha1": 1.0, "alpha2": 0.5} for r in mg)
  assert not [r for r in runs if r.cell is source and r.phase != "tune"]  # not the source's evaluation


def test_cells_errors_come_before_any_data_is_loaded(capsys, monkeypatch):
  def no_data(study):
    raise AssertionError("data loaded before the --cells check")

  monkeypatch.setattr(runner, "load_datasets", no_data)
  spec = str(REPO_ROOT / "benchmarks" / "studies" / "table9.toml")
  for flags, message in (
    (["--cells", "baby/vbpr"], "--cells: no cell baby/vbpr in study table9; its cells: baby/layergcn, baby/selfcf, "),
    (["--cells", "baby/selfcf,baby/selfcf"], "--cells: baby/selfcf given twice"),
    (["--cells", ","], "--cells: no cell given"),
    (["--cells", "baby/selfcf", "--report-only"], "--cells chooses what to train; it cannot be combined"),
  ):
    with pytest.raises(SystemExit):
      study_cli.main([spec, *flags])
    assert message in capsys.readouterr().err


def test_cells_train_only_that_cell_end_to_end(tmp_path, monkeypatch):
  spec = tmp_path / "tiny.toml"
  spec.write_text(
    TINY_SPEC.replace("aa_variants = 2", "aa_variants = 0")
    .replace("alpha2 = [0.1, 0.5]", "alpha2 = [0.1]")
    .replace('models = ["lightgcn"]', 'models = ["lightgcn", "vbpr"]')
  )
  args = [str(spec), "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--no-progress"]
  out = io.StringIO()
  monkeypatch.setattr("sys.stdout", out)
  result = study_cli.main(args + ["--cells", "synthetic:tiny/vbpr"]).result
  cells = [json.loads(p.read_text())["info"]["cell"] for p in (tmp_path / "store" / "runs").glob("*.json")]
  assert cells == ["synthetic:tiny/vbpr"] * 6  # plain and MG tuned on one seed, both on 2 evaluation seeds
  assert "study tiny-test (cells synthetic:tiny/vbpr): 0/6 runs in the store, 6 to go" in out.getvalue()
  assert result["runs_done"] == 6 and result["runs_total"] == 12  # the report covers both cells


def _plant_all(plan, gain):
  """Every run of ``plan`` as a planted record: validation 0.5 everywhere (the first grid point wins), test 0.5
  for plain and ``0.5 * (1 + gain(cell name, label, seed index) / 100)`` for an evaluated method."""
  while True:
    runs, waiting = plan.runs()
    todo = [r for r in runs if plan.record(r) is None]
    if not todo and not waiting:
      return
    for r in todo:
      g = gain(r.cell.name, r.label, r.seed - 100) if r.phase == "eval" and r.label != "plain" else 0.0
      _fake(plan, r, 0.5, 0.5 * (1 + g / 100))


def _family_study(name="fam", models=("lightgcn", "vbpr")):
  raw = copy.deepcopy(BASE)
  raw["name"] = name
  raw["aa_variants"] = 0
  raw["grids"]["gnp"] = {"gnp_penalty": [1e-3]}
  raw["cells"] = [
    {
      "data": "synthetic:tiny",
      "models": list(models),
      "methods": ["plain", "mg", "gnp"],
      "eval_seeds": 4,
      "defaults_too": ["mg"],
    }
  ]
  return parse_spec(raw)


FAMILY_GAINS = {
  ("synthetic:tiny/lightgcn", "mg"): [10.0, 12.0, 9.0, 11.0],
  ("synthetic:tiny/vbpr", "mg"): [2.0, -1.0, 3.0, 0.5],
  ("synthetic:tiny/lightgcn", "mg@default"): [1.0, 2.0, 0.0, 1.5],
  ("synthetic:tiny/vbpr", "mg@default"): [4.0, 5.0, 6.0, 4.5],
  ("synthetic:tiny/lightgcn", "gnp"): [0.0, 0.0, 0.0, 0.0],  # identical to plain (as GNP on LightGCN)
  ("synthetic:tiny/vbpr", "gnp"): [30.0, 31.0, 29.0, 30.5],  # a tiny p: exploratory, in no family
}


def _planted_family(tmp_path, name="fam", models=("lightgcn", "vbpr")):
  study = _family_study(name, models)
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / name / "runs", tmp_path / name / "work"))
  _plant_all(plan, lambda cell, label, i: FAMILY_GAINS[(cell, label)][i])
  return plan


def test_the_primary_family_is_the_declared_one_and_identical_runs_are_dropped(tmp_path):
  result = analyse(_planted_family(tmp_path))
  rows = {(r["cell"], r["label"]): r for r in result["comparisons"]}
  t_p = {k: sps.ttest_1samp(v, 0.0).pvalue for k, v in FAMILY_GAINS.items() if any(v)}
  # primary: MG's winner on recall@5 in each of the two cells, Holm over exactly those two paired t p-values
  prim = result["primary"]
  assert [(m["cell"], m["label"]) for m in prim["members"]] == [
    ("synthetic:tiny/lightgcn", "mg"),
    ("synthetic:tiny/vbpr", "mg"),
  ]
  assert prim["family_size"] == 2 and prim["family"] == "mg-vs-plain" and prim["metric"] == "recall@5"
  keys = [("synthetic:tiny/lightgcn", "mg"), ("synthetic:tiny/vbpr", "mg")]
  expected = stats.holm([t_p[k] for k in keys])
  for k, e in zip(keys, expected):
    m = rows[k]["metrics"]["recall@5"]
    assert m["role"] == "primary" and m["t_p"] == pytest.approx(t_p[k]) and m["holm_p"] == pytest.approx(e)
  assert [m["rejects"] for m in prim["members"]] == [bool(e <= 0.05) for e in expected]
  # the @default variants: a secondary family of their own
  keys = [("synthetic:tiny/lightgcn", "mg@default"), ("synthetic:tiny/vbpr", "mg@default")]
  for k, e in zip(keys, stats.holm([t_p[k] for k in keys])):
    assert rows[k]["metrics"]["recall@5"]["role"] == "secondary"
    assert rows[k]["metrics"]["recall@5"]["holm_p"] == pytest.approx(e)
  assert prim["secondary_family_size"] == 2
  # GNP: identical on LightGCN (dropped everywhere, listed), exploratory on VBPR (no adjusted p, its tiny p in no family)
  assert rows[("synthetic:tiny/lightgcn", "gnp")]["identical"]
  assert result["identical"] == [{"cell": "synthetic:tiny/lightgcn", "label": "gnp", "n": 4}]
  assert all(m["role"] == "identical" for m in rows[("synthetic:tiny/lightgcn", "gnp")]["metrics"].values())
  vbpr_gnp = rows[("synthetic:tiny/vbpr", "gnp")]["metrics"]["recall@5"]
  assert vbpr_gnp["role"] == "exploratory" and math.isnan(vbpr_gnp["holm_p"]) and vbpr_gnp["t_p"] < 1e-4
  assert all(
    m["role"] == "exploratory" and math.isnan(m["holm_p"])
    for r in result["comparisons"]
    for metric, m in r["metrics"].items()
    if metric != "recall@5" and not r["identical"]
  )
  text = format_report(result)
  assert "Holm over its 2 member(s)" in text
  assert "identical to plain on every seed and metric" in text and "synthetic:tiny/lightgcn gnp (n=4)" in text


def test_an_identical_primary_comparison_is_dropped_from_the_family_and_the_pool(tmp_path):
  study = _family_study()
  plan = Plan(study, runner.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
  gains = {**FAMILY_GAINS, ("synthetic:tiny/vbpr", "mg"): [0.0] * 4}  # MG changes nothing on VBPR
  _plant_all(plan, lambda cell, label, i: gains[(cell, label)][i])
  result = analyse(plan)
  prim = result["primary"]
  assert [m["cell"] for m in prim["members"]] == ["synthetic:tiny/lightgcn"] and prim["family_size"] == 1
  assert prim["dropped"] == [
    {"cell": "synthetic:tiny/vbpr", "label": "mg", "reason": "identical to plain on every seed and metric"}
  ]
  lone = prim["members"][0]
  assert lone["holm_p"] == pytest.approx(lone["t_p"])  # a family of one
  pooled = next(e for e in result["pooled"] if e["method"] == "mg" and e["metric"] == "recall@5")
  assert pooled["k"] == 1 and math.isnan(pooled["estimate"])  # one cell left: nothing to pool
  assert pooled["excluded"] == [{"study": "fam", "cell": "synthetic:tiny/vbpr", "reason": "identical to plain"}]
  assert "Dropped from every family: synthetic:tiny/vbpr mg" in format_report(result)


def test_incomplete_cells_are_reported_with_their_actual_n(tmp_path):
  plan = _planted_family(tmp_path)
  study = plan.study
  cell = study.cells[0]
  last = plan.planned_run(cell, "eval", "mg", plan.winner(cell, "mg"), 103)
  plan.store.path(last.key).unlink()  # seed 103 of MG on LightGCN not trained yet
  plan = Plan(study, plan.datasets, plan.store)
  result = analyse(plan)
  row = next(r for r in result["comparisons"] if r["cell"] == cell.name and r["label"] == "mg")
  assert not row["complete"] and row["missing_seeds"] == [103] and row["metrics"]["recall@5"]["n"] == 3
  member = next(m for m in result["primary"]["members"] if m["cell"] == cell.name)
  assert (member["n"], member["n_planned"], member["complete"]) == (3, 4, False)
  text = format_report(result)
  assert "incomplete (3 of 4 seeds)" in text and "primary, incomplete" in text
  pooled = next(e for e in result["pooled"] if e["method"] == "mg" and e["metric"] == "recall@5")
  assert pooled["incomplete"] == 1 and f"{cell.name} 3*" in text


def test_pooled_estimate_is_the_random_effects_mean_of_the_cells(tmp_path):
  result = analyse(_planted_family(tmp_path))
  pooled = {(e["method"], e["metric"]): e for e in result["pooled"]}
  assert {m for m, _ in pooled} == {"mg"}  # no SAM in this study; GNP is not pooled
  e = pooled[("mg", "recall@5")]
  effects = [np.mean(FAMILY_GAINS[(c, "mg")]) for c in ("synthetic:tiny/lightgcn", "synthetic:tiny/vbpr")]
  variances = [np.var(FAMILY_GAINS[(c, "mg")], ddof=1) / 4 for c in ("synthetic:tiny/lightgcn", "synthetic:tiny/vbpr")]
  ma = stats.random_effects(effects, variances)
  assert e["k"] == 2 and e["estimate"] == pytest.approx(ma.estimate) and e["ci"] == pytest.approx(list(ma.ci))
  assert e["tau2"] == pytest.approx(ma.tau2) and e["i2"] == pytest.approx(ma.i2)
  assert all(math.isnan(x) for x in e["pi"])  # k = 2: a prediction interval needs k >= 3
  np.testing.assert_allclose([c["se"] for c in e["cells"]], np.sqrt(variances))


def test_pooling_across_studies(tmp_path):
  a = analyse(_planted_family(tmp_path, "fam-a", ("lightgcn",)))
  b = analyse(_planted_family(tmp_path, "fam-b", ("vbpr",)))
  pooled = pool_studies([a, b])
  assert pooled["studies"] == ["fam-a", "fam-b"]
  assert {(r["study"], r["cell"]) for r in pooled["comparisons"]} == {
    ("fam-a", "synthetic:tiny/lightgcn"),
    ("fam-b", "synthetic:tiny/vbpr"),
  }
  e = next(x for x in pooled["pooled"] if x["method"] == "mg" and x["metric"] == "recall@5")
  within = next(x for x in analyse(_planted_family(tmp_path, "fam")).get("pooled") if x["metric"] == "recall@5")
  assert e["k"] == 2 and e["estimate"] == pytest.approx(within["estimate"])  # the same two cells
  written = write_pooled_outputs(pooled, tmp_path / "pooled")
  assert [p.name for p in written] == ["study.json", "study.md", "forest.png"]
  assert "Pooled across studies fam-a, fam-b" in format_pooled_report(pooled)
  with pytest.raises(ValueError, match="pooled once only"):
    pool_studies([a, {**analyse(_planted_family(tmp_path, "fam-c", ("lightgcn",))), "study": "fam-c"}])
  with pytest.raises(ValueError, match="distinct studies"):
    pool_studies([a, a])


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--pooled"], "--pooled reports from the stored records only: add --report-only"),
    (["--pooled", "--report-only", "--store", "x"], "--pooled reports every study from its own store"),
    (["--pooled-store", "x", "--report-only"], "--pooled-store is where --pooled writes: give --pooled too"),
    (["--report-only", "SECOND"], "one SPEC (or several with --pooled --report-only), got 2"),
    (["--pooled", "--report-only", "SAME"], "--pooled: study tiny given twice"),
  ],
)
def test_pooled_command_errors(flags, message, capsys):
  spec = str(REPO_ROOT / "benchmarks" / "studies" / "tiny.toml")
  flags = [spec if f in ("SECOND", "SAME") else f for f in flags]
  with pytest.raises(SystemExit) as e:
    study_cli.main([spec, *flags])
  assert e.value.code == 2 and message in capsys.readouterr().err
