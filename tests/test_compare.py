"""The comparison command: outputs, bad input, a diverging run that does not sink the table, the printed tables.

Reruns (the same command again, after Ctrl-C or kill -9; another command in the same --out) are in test_rerun.py.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import compare
from benchmarks.data import dataset as data_lib
from benchmarks.experiments import comparison

SMALL = ["--data", "synthetic:tiny", "--max-epochs", "3", "--batch-size", "128", "--no-progress"]


def test_default_command_on_a_reduced_synthetic_set(tmp_path, capsys):
  records = compare.main([*SMALL, "--seeds", "1", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  # 3 models x 3 methods (x 1 seed, to keep the suite fast), in the documented schema
  assert len(records) == 9
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [(r["model"], r["method"], r["seed"]) for r in saved] == [
    (m, k, s) for m in ("vbpr", "lightgcn", "bm3") for k in ("plain", "mg", "sam") for s in (0,)
  ]
  for r in saved:
    for key in ("model", "method", "seed", "valid", "test", "best_epoch", "wall_s", "grad_evals"):
      assert key in r
    assert set(r["test"]) >= {"recall@20", "ndcg@5", "map@5", "precision@20"}
    assert r["status"] == "ok"
  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert len(rows) == 9 and "test_recall@20" in rows[0]
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # the printed table: every model x method row, and MG's cost in gradient evaluations
  for model in ("vbpr", "lightgcn", "bm3"):
    for method in ("plain", "mg", "sam"):
      assert any(line.startswith(f"{model:9s} {method:6s}") for line in out.splitlines())
  mg = [r for r in saved if r["method"] == "mg"][0]
  sam = [r for r in saved if r["method"] == "sam"][0]
  assert 1.0 < mg["grad_evals_per_update"] < 2.0
  assert sam["grad_evals_per_update"] == 2.0
  # paired relative change vs plain is printed for mg and sam
  table = out[out.index("Relative change vs plain") :]
  assert table.count("%") >= 1


def _rec(method, seed, value, *, stopped_by="patience", model="lightgcn"):
  return {
    "model": model,
    "method": method,
    "seed": seed,
    "status": "ok",
    "test": {m: value for m in comparison.TABLE_METRICS},
    "best_epoch": 1,
    "epochs": 2,
    "stopped_by": stopped_by,
    "wall_s": 1.0,
    "grad_evals": 10,
    "grad_evals_per_update": 1.0,
  }


def _line(text, start):
  return [line for line in text.splitlines() if line.startswith(start)]


def test_format_tables_two_seeds_states_n_and_that_they_cannot_tell():
  text = comparison.format_tables(
    [_rec("plain", 0, 0.10), _rec("plain", 1, 0.20), _rec("mg", 0, 0.11), _rec("mg", 1, 0.22)]
  )
  metrics, change = _line(text, "lightgcn  mg")
  assert "0.1650±0.0778" in metrics  # mean ± sample sd of 0.11 and 0.22
  assert "mean±sd over n = 2 seeds" in text
  assert change.startswith(f"{'lightgcn':9s} {'mg':6s} {2:>2d} ")  # n beside the changes
  assert "+10.0 [+10.0,+10.0]" in change  # +10 % on both seeds: no spread, the interval is the point
  assert "With n = 2 paired seeds these numbers cannot tell an effect from seed noise" in text
  # the cost columns are explained in a footnote
  flat = " ".join(text.split())
  for column in ("best ep =", "epochs =", "wall s =", "grad ev =", "ev/upd ="):
    assert column in flat


def test_format_tables_gives_the_t_interval_of_the_paired_changes():
  from scipy import stats

  plain = [0.10, 0.20, 0.10]
  mg = [0.11, 0.20, 0.12]  # +10 %, 0 %, +20 %
  records = [_rec("plain", s, v) for s, v in enumerate(plain)] + [_rec("mg", s, v) for s, v in enumerate(mg)]
  text = comparison.format_tables(records)
  d = np.array([10.0, 0.0, 20.0])
  half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
  change = _line(text, f"{'lightgcn':9s} {'mg':6s} {3:>2d} ")[-1]
  assert f"+10.0 [{10 - half:+.1f},{10 + half:+.1f}]" in change  # [-14.8,+34.8]
  assert "Every 95 % interval covers 0: at n = 3 seeds no change vs plain is distinguishable" in text
  # an interval that excludes 0 is named, with the caveat that it is not corrected
  records = [_rec("plain", s, 0.1) for s in range(3)] + [_rec("mg", s, v) for s, v in enumerate([0.11, 0.111, 0.112])]
  text = comparison.format_tables(records)
  assert "4 of 4 intervals exclude 0 (lightgcn/mg recall@5, " in text and "not corrected" in text


def test_format_tables_flags_runs_stopped_by_the_epoch_cap():
  records = [_rec("plain", 0, 0.1, stopped_by="max_epochs"), _rec("mg", 0, 0.1)]
  text = comparison.format_tables(records)
  plain_cost = _line(text, "lightgcn  plain")[1]
  assert "2*" in plain_cost and "2*" not in _line(text, "lightgcn  mg")[1]
  assert "*: 1 run(s) ended at --max-epochs (the cap) before early stopping ended them" in " ".join(text.split())
  assert "*:" not in comparison.format_tables([_rec("plain", 0, 0.1), _rec("mg", 0, 0.1)])
  assert "With n = 1 paired seed these numbers cannot tell" in text


@pytest.mark.parametrize(
  "args,message",
  [
    (["--models", "vbpr,mf"], "--models: unknown model mf; valid names: vbpr, lightgcn, bm3"),
    (["--methods", "mg,swa"], "--methods: unknown method swa; valid names: plain, mg, sam, gnp"),
    (["--methods", "mg,plain,mg"], "--methods: mg given twice"),
    (["--optimizer", "lion"], "--optimizer: unknown optimizer lion; valid names: adam, sgd, rmsprop, adagrad"),
    (["--optimizer", "adam,sgd"], "--optimizer: give one optimizer, got 'adam,sgd'"),
    (["--hparam", "reg_weight"], "expected [model.]name=value"),
    (["--models", "lightgcn", "--hparam", "vbpr.reg_weight=1"], "model 'vbpr' is not in --models"),
    (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),
    (["--valid-metric", "auc"], "--valid-metric: unknown valid_metric 'auc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
  ],
)
def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as e:
    compare.main([*SMALL, "--out", str(tmp_path), *args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("python -m benchmarks.compare: error: ") and err.count("\n") == 1, err  # one line
  assert message in err


def test_multimodal_model_on_data_without_features_fails_before_training(tmp_path, capsys):
  ds = data_lib.synthetic_preset("tiny")
  bare = data_lib.Dataset(
    name="bare", n_users=ds.n_users, n_items=ds.n_items, train=ds.train, valid=ds.valid, test=ds.test, features={}
  )
  data_lib.write_mmrec(bare, tmp_path / "bare")
  with pytest.raises(SystemExit):
    compare.main(["--data", str(tmp_path / "bare"), "--models", "lightgcn,bm3", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert "model bm3 needs the" in err and "which data set" in err and "has: none" in err
  assert not (tmp_path / "o" / "results.json").exists()  # nothing was trained


def test_a_diverging_run_is_reported_and_the_table_completes(tmp_path, capsys):
  # SGD with alpha1 = 1e30: MG's first update explodes; plain training is unaffected.
  records = compare.main(
    [
      *SMALL,
      "--models",
      "lightgcn",
      "--methods",
      "plain,mg",
      "--optimizer",
      "sgd",
      "--lr",
      "0.05",
      "--alpha1",
      "1e30",
      "--seeds",
      "1",
      "--out",
      str(tmp_path),
    ]
  )
  captured = capsys.readouterr()
  status = {r["method"]: r["status"] for r in records}
  assert status == {"plain": "ok", "mg": "diverged"}
  assert "training loss is nan at epoch 0" in captured.err.lower() or "training loss is inf" in captured.err.lower()
  assert "run(s) failed" in captured.out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["status"] for r in saved] == ["ok", "diverged"]
  assert np.isfinite(saved[0]["test"]["recall@20"])


# --------------------------------------------------------------------------------------------------
# Nothing silent: grid points, earlier results, logs, README
# --------------------------------------------------------------------------------------------------

ONE = [*SMALL, "--models", "lightgcn", "--methods", "plain", "--seeds", "1", "--max-epochs", "2"]


def test_every_grid_point_is_a_run_of_its_own_and_a_rerun_reuses_them(tmp_path, capsys):
  argv = [*ONE, "--methods", "mg", "--grid", "alpha2=0.1,0.2", "--out", str(tmp_path)]
  first = compare.main(argv)
  assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # one record per grid point
  assert len({r["key"] for r in first}) == 1  # the winner's run
  capsys.readouterr()
  again = compare.main(argv)
  assert "runs: 0 trained, 2 reused" in capsys.readouterr().out
  assert [r["grid_point"] for r in again] == [r["grid_point"] for r in first]
  assert [r["test"] for r in again] == [r["test"] for r in first]


def test_earlier_results_are_refused_and_overwrite_replaces_them(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  for name in ("results.json", "results.csv", "curves.png"):
    (out / name).write_text("an earlier run")
  (out / ".results.json.k3j2x.tmp").write_text("left by a killed write")
  with pytest.raises(SystemExit) as e:
    compare.main([*ONE, "--out", str(out)])
  assert e.value.code == 2
  assert (
    f"--out {out} already holds results.json, results.csv, curves.png of an earlier run that recorded no "
    "command.json; pass --overwrite to replace them, or choose another --out"
  ) in capsys.readouterr().err
  assert (out / "results.json").read_text() == "an earlier run"
  records = compare.main([*ONE, "--out", str(out), "--overwrite"])
  saved = json.loads((out / "results.json").read_text())
  rows = list(csv.DictReader((out / "results.csv").open()))
  assert len(saved) == len(rows) == len(records) == 1
  assert float(rows[0]["test_recall@20"]) == saved[0]["test"]["recall@20"]
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in out.iterdir()) == [
    "command.json",
    "curves.png",
    "results.csv",
    "results.json",
    "runs",
    "work",
  ]  # no temp files
  assert list((out / "work").iterdir()) == []  # a finished run's checkpoints are deleted


def test_results_json_and_csv_are_written_together_or_not_at_all(tmp_path, monkeypatch):
  def broken_csv(records):
    raise RuntimeError("disk full")

  monkeypatch.setattr(comparison, "results_csv", broken_csv)
  with pytest.raises(RuntimeError, match="disk full"):
    compare.main([*ONE, "--out", str(tmp_path)])
  # not results.json without results.csv, no temporary file; the finished run is kept for the rerun
  assert sorted(p.name for p in tmp_path.iterdir()) == ["command.json", "runs", "work"]
  assert len(list((tmp_path / "runs").iterdir())) == 1

  monkeypatch.undo()
  (tmp_path / "results.json").write_text("old json")
  (tmp_path / "results.csv").write_text("old csv")
  calls = []

  def interrupted_replace(src, dst):
    calls.append(dst)
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", interrupted_replace)
  with pytest.raises(KeyboardInterrupt):
    comparison.write_results(tmp_path, [{"model": "m", "method": "plain", "seed": 0, "test": {}}])
  monkeypatch.undo()
  assert len(calls) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["command.json", "results.csv", "results.json", "runs", "work"]
  assert (tmp_path / "results.json").read_text() == "old json" and (tmp_path / "results.csv").read_text() == "old csv"


def test_no_curves_png_when_no_run_succeeded(tmp_path, capsys):
  (tmp_path / "curves.png").write_bytes(b"an earlier picture")
  records = compare.main(
    [
      *ONE,
      "--methods",
      "mg",
      "--optimizer",
      "sgd",
      "--lr",
      "0.05",
      "--alpha1",
      "1e30",
      "--out",
      str(tmp_path),
      "--overwrite",
    ]
  )
  assert [r["status"] for r in records] == ["diverged"]
  out = capsys.readouterr().out
  assert not (tmp_path / "curves.png").exists()
  wrote = [line for line in out.splitlines() if line.startswith("wrote ")]
  assert wrote == [f"wrote {tmp_path / 'results.json'}, {tmp_path / 'results.csv'} (no curves.png: no run succeeded)"]


def test_no_progress_bars_in_logs(tmp_path, capsys):
  # stderr is not a terminal under pytest's capture, as in a log file: one line per run, no bar frames
  compare.main([a for a in ONE if a != "--no-progress"] + ["--out", str(tmp_path)])
  captured = capsys.readouterr()
  assert "\r" not in captured.err and "\r" not in captured.out
  assert "lightgcn/plain seed 0: trained: test recall@20" in captured.out


def test_help_works_and_documents_the_rerun_behaviour(capsys):
  with pytest.raises(SystemExit) as e:
    compare.main(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--checkpoint-every N" in text and "--overwrite" in text
  assert "The same command run again reuses the finished runs and resumes an interrupted one" in text
  assert "--resume deprecated, no effect" in text
  assert "--checkpoint-dir" not in text


def _compare_section() -> str:
  readme = (Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
  return " ".join(readme[readme.index("## Comparing methods") : readme.index("### Real data")].split())


def test_readme_states_how_often_checkpoints_are_saved():
  section = _compare_section()
  sentence = next(s for s in section.split(". ") if "`--checkpoint-every`" in s and "checkpoint" in s)
  default = comparison.build_parser().get_default("checkpoint_every")
  assert "every epoch" not in sentence
  assert f"`--checkpoint-every` epochs (default {default})" in sentence


def test_readme_describes_reruns_not_the_removed_flags():
  section = _compare_section()
  assert "--checkpoint-dir DIR" not in section and section.count("`--checkpoint-dir`") == 1
  assert "`--checkpoint-dir` was removed" in section
  for phrase in ("command.json", "runs/", "work/", "`--overwrite`", "kill -9", "exit status 2", "130"):
    assert phrase in section, phrase
