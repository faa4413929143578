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

from benchmarks.study import stats
from benchmarks.study import runner as study_lib
from benchmarks.runtime import workers as workers_lib
from benchmarks.training.records import RunStore, identity
from benchmarks.study.spec import SpecError, load_spec, parse_spec

BASE = {
  "name": "t",
  "tuning_seeds": 2,
  "eval_seed_start": 100,
  "aa_variants": 2,
  "train": {"max_epochs": 2, "patience": 2, "batch_size": 256},
  "grids": {"mg": {"alpha1": [1.0], "alpha2": [0.1, 0.5]}},
  "cells": [{"data": "synthetic:tiny", "models": ["lightgcn"], "methods": ["plain", "mg"], "eval_seeds": 3}],
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
    study = load_spec(study_lib.REPO_ROOT / "benchmarks" / "studies" / f"{name}.toml")
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
      "test": {m: test for m in study_lib.METRICS},
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
  plan = study_lib.Plan(study, study_lib.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
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
  result = study_lib.analyse(plan)
  assert result["runs_done"] == len(tune)
  assert "h left at 0.0 min/run" in study_lib.format_markdown(result)


def test_protocol_on_planted_records(tmp_path):
  """Winner on validation, paired test changes, the paper protocol on test, and its A/A control."""
  study = parse_spec({**BASE, "paper": [{**_MARK, "plain": 0.0314, "value": 0.0337, "note": "table 9"}]})
  datasets = study_lib.load_datasets(study)
  plan = study_lib.Plan(study, datasets, RunStore(tmp_path / "runs", tmp_path / "work"))
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
  result = study_lib.analyse(plan)
  assert result["runs_done"] == result["runs_total"] == len(runs)
  assert result["progress"] == [
    {"cell": "synthetic:tiny/lightgcn", "done": len(runs), "total": len(runs), "mean_run_s": 1.0, "left_s": 0.0}
  ]
  assert f"synthetic:tiny/lightgcn {len(runs)}/{len(runs)} (complete)" in study_lib.format_markdown(result)
  (row,) = result["comparisons"]
  m = row["metrics"]["recall@5"]
  d = np.array([10.0, 20.0, 30.0])
  np.testing.assert_allclose(m["diffs"], d)
  half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
  np.testing.assert_allclose(m["t_ci"], [20 - half, 20 + half])
  assert m["wilcoxon_p"] == pytest.approx(0.25) and m["holm_p"] == pytest.approx(1.0)  # 4 tests of p = 0.25
  assert m["wins"] == 3 and row["cost"]["grad_evals_ratio"] == pytest.approx(1.33)
  # where the compared runs trained (a record without a platform predates them: a CPU run)
  assert row["cost"]["where"] == ["NVIDIA H200", "cpu"]
  (pp,) = result["paper_protocol"]
  assert pp["winners"] == [{"alpha1": 1.0, "alpha2": 0.5}] * 2  # chosen on test
  assert pp["gain"]["recall@5"]["mean"] == pytest.approx(20.0)
  assert pp["aa_gain"]["recall@5"]["mean"] == pytest.approx(10.0)  # best of 2 no-op variants: 0.55 vs 0.5
  text = study_lib.format_report(result)
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
  row_md = next(line for line in study_lib.format_markdown(result).splitlines() if "0.0314 → 0.0337" in line)
  assert "| +7.3 | 3 | 0.5000 [0.5000, 0.5000] → 0.6000 | +20.0 [" in row_md and row_md.endswith(
    "| yes | 17 | table 9 |"
  )
  assert "Published figures beside ours" in text


TINY_SPEC = """
name = "tiny-test"
tuning_seeds = 1
aa_variants = 2
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
  result = study_lib.main(args)
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
  again = study_lib.main(args)  # everything is in the store: nothing trains, same figures
  assert json.loads(json.dumps(again)) == saved
  assert study_lib.main(args + ["--report-only"]) == again
  assert "study tiny-test: 9/9 runs in the store, 0 to go" in out.getvalue()


def test_model_grid_is_tuned_with_plain_first_and_its_winner_used_everywhere(tmp_path):
  raw = copy.deepcopy(BASE)
  raw["cells"][0]["model_grids"] = {"lightgcn": {"reg_weight": [1e-4, 1e-2]}}
  study = parse_spec(raw)
  plan = study_lib.Plan(study, study_lib.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
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
  result = study_lib.analyse(plan)
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
  proc = subprocess.run(
    cmd + ["--work-dir", str(work)], cwd=study_lib.REPO_ROOT, capture_output=True, text=True, timeout=600
  )
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
    study_lib.main([str(study_lib.REPO_ROOT / "benchmarks" / "studies" / "tiny.toml"), *flags])
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

  spec = str(study_lib.REPO_ROOT / "benchmarks" / "studies" / "tiny.toml")
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
    cwd=study_lib.REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    for line in proc.stdout:  # training starts right after this line
      if "runs in the store" in line:
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == study_lib.INTERRUPTED_EXIT, err
  assert "interrupted; finished runs are in the store" in err and "Traceback" not in err


def test_cells_plan_only_the_named_cells_after_the_tuning_they_depend_on(tmp_path):
  raw = copy.deepcopy(BASE)
  raw["cells"].append(
    {"data": "synthetic:tiny", "models": ["vbpr"], "methods": ["plain", "mg"], "eval_seeds": 2},
  )
  study = parse_spec(raw)
  plan = study_lib.Plan(study, study_lib.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
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
  plan = study_lib.Plan(study, study_lib.load_datasets(study), RunStore(tmp_path / "runs", tmp_path / "work"))
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

  monkeypatch.setattr(study_lib, "load_datasets", no_data)
  spec = str(study_lib.REPO_ROOT / "benchmarks" / "studies" / "table9.toml")
  for flags, message in (
    (["--cells", "baby/vbpr"], "--cells: no cell baby/vbpr in study table9; its cells: baby/layergcn, baby/selfcf, "),
    (["--cells", "baby/selfcf,baby/selfcf"], "--cells: baby/selfcf given twice"),
    (["--cells", ","], "--cells: no cell given"),
    (["--cells", "baby/selfcf", "--report-only"], "--cells chooses what to train; it cannot be combined"),
  ):
    with pytest.raises(SystemExit):
      study_lib.main([spec, *flags])
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
  result = study_lib.main(args + ["--cells", "synthetic:tiny/vbpr"])
  cells = [json.loads(p.read_text())["info"]["cell"] for p in (tmp_path / "store" / "runs").glob("*.json")]
  assert cells == ["synthetic:tiny/vbpr"] * 6  # plain and MG tuned on one seed, both on 2 evaluation seeds
  assert "study tiny-test (cells synthetic:tiny/vbpr): 0/6 runs in the store, 6 to go" in out.getvalue()
  assert result["runs_done"] == 6 and result["runs_total"] == 12  # the report covers both cells
