"""The comparison command: outputs, bad input, a diverging run that does not sink the table."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.experiments import comparison as compare
from benchmarks.data import dataset as data_lib

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


def test_format_tables_paired_change():
  def rec(method, seed, r20):
    metrics = {m: r20 for m in compare.TABLE_METRICS}
    return {
      "model": "lightgcn",
      "method": method,
      "seed": seed,
      "status": "ok",
      "test": metrics,
      "best_epoch": 1,
      "epochs": 2,
      "wall_s": 1.0,
      "grad_evals": 10,
      "grad_evals_per_update": 1.0,
    }

  text = compare.format_tables([rec("plain", 0, 0.10), rec("plain", 1, 0.20), rec("mg", 0, 0.11), rec("mg", 1, 0.22)])
  mg_line = [l for l in text.splitlines() if l.startswith("lightgcn  mg")][-1]
  assert "+10.0±0.0" in mg_line  # +10 % on both seeds
  first = [l for l in text.splitlines() if l.startswith("lightgcn  mg")][0]
  assert "0.1650±0.0778" in first  # mean ± sample sd of 0.11 and 0.22


@pytest.mark.parametrize(
  "args,message",
  [
    (["--models", "vbpr,mf"], "unknown model mf; valid names: vbpr, lightgcn, bm3"),
    (["--methods", "mg,swa"], "unknown method swa; valid names: plain, mg, sam, gnp"),
    (["--optimizer", "lion"], "unknown optimizer lion; valid names: adam, sgd, rmsprop, adagrad"),
    (["--hparam", "reg_weight"], "expected [model.]name=value"),
    (["--models", "lightgcn", "--hparam", "vbpr.reg_weight=1"], "model 'vbpr' is not in --models"),
    (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),
    (["--valid-metric", "auc"], "unknown valid_metric 'auc'"),
  ],
)
def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as e:
    compare.main([*SMALL, "--out", str(tmp_path), *args])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


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
# Nothing silent: checkpoints of grid points, earlier results, damaged checkpoints, logs, README
# --------------------------------------------------------------------------------------------------

ONE = [*SMALL, "--models", "lightgcn", "--methods", "plain", "--seeds", "1", "--max-epochs", "2"]


def test_every_grid_point_has_its_own_checkpoint_directory(tmp_path):
  ckpt = tmp_path / "ck"
  argv = [*ONE, "--methods", "mg", "--grid", "alpha2=0.1,0.2", "--checkpoint-dir", str(ckpt)]
  first = compare.main([*argv, "--out", str(tmp_path / "a")])
  assert sorted(p.name for p in ckpt.iterdir()) == ["lightgcn-mg-seed0-alpha2=0.1", "lightgcn-mg-seed0-alpha2=0.2"]
  # both points are found again: a resume loads the finished runs and ends with the same records
  again = compare.main([*argv, "--resume", "--out", str(tmp_path / "b")])
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
    f"--out {out} already holds results.json, results.csv, curves.png of an earlier run; pass --overwrite "
    "to replace them, or choose another --out"
  ) in capsys.readouterr().err
  assert (out / "results.json").read_text() == "an earlier run"
  records = compare.main([*ONE, "--out", str(out), "--overwrite"])
  saved = json.loads((out / "results.json").read_text())
  rows = list(csv.DictReader((out / "results.csv").open()))
  assert len(saved) == len(rows) == len(records) == 1
  assert float(rows[0]["test_recall@20"]) == saved[0]["test"]["recall@20"]
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.csv", "results.json"]  # no temp files


def test_results_json_and_csv_are_written_together_or_not_at_all(tmp_path, monkeypatch):
  def broken_csv(records):
    raise RuntimeError("disk full")

  monkeypatch.setattr(compare, "_csv", broken_csv)
  with pytest.raises(RuntimeError, match="disk full"):
    compare.main([*ONE, "--out", str(tmp_path)])
  assert list(tmp_path.iterdir()) == []  # not results.json without results.csv, no temporary file

  monkeypatch.undo()
  (tmp_path / "results.json").write_text("old json")
  (tmp_path / "results.csv").write_text("old csv")
  calls = []

  def interrupted_replace(src, dst):
    calls.append(dst)
    raise KeyboardInterrupt

  monkeypatch.setattr(compare.os, "replace", interrupted_replace)
  with pytest.raises(KeyboardInterrupt):
    compare.write_results(tmp_path, [{"model": "m", "method": "plain", "seed": 0, "test": {}}])
  assert len(calls) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]
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


def _truncate_meta(run_dir: Path, step: int) -> None:
  meta = run_dir / str(step) / "meta" / "metadata"
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys):
  ckpt = tmp_path / "ck"
  argv = [*ONE, "--max-epochs", "3", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
  full = compare.main([*argv, "--out", str(tmp_path / "a")])
  run_dir = ckpt / "lightgcn-plain-seed0"
  assert sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit()) == [1, 2]
  _truncate_meta(run_dir, 2)
  with pytest.warns(RuntimeWarning, match=f"checkpoint step 2 in {re.escape(str(run_dir.absolute()))} is damaged"):
    resumed = compare.main([*argv, "--resume", "--out", str(tmp_path / "b")])
  assert resumed[0]["test"] == full[0]["test"] and resumed[0]["best_epoch"] == full[0]["best_epoch"]
  assert [h["loss"] for h in resumed[0]["history"]] == [h["loss"] for h in full[0]["history"]]
  # no readable step at all: a clear error before anything trains, naming the directory and the steps
  _truncate_meta(run_dir, 1)
  _truncate_meta(run_dir, 2)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    compare.main([*argv, "--resume", "--out", str(tmp_path / "c")])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert f"no usable checkpoint in {run_dir.absolute()}: step 2: its metadata cannot be read (JSONDecodeError" in err
  assert "; step 1: its metadata cannot be read" in err


def test_no_progress_bars_in_logs(tmp_path, capsys):
  # stderr is not a terminal under pytest's capture, as in a log file: one line per run, no bar frames
  compare.main([a for a in ONE if a != "--no-progress"] + ["--out", str(tmp_path)])
  captured = capsys.readouterr()
  assert "\r" not in captured.err and "\r" not in captured.out
  assert "lightgcn/plain seed 0: test recall@20" in captured.out


def test_readme_states_how_often_checkpoints_are_saved():
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = " ".join(readme[readme.index("## Comparing methods") : readme.index("### Real data")].split())
  sentence = next(s for s in section.split(". ") if "`--checkpoint-dir`" in s and "saves" in s)
  default = compare.build_parser().get_default("checkpoint_every")
  assert "every epoch" not in sentence
  assert f"`--checkpoint-every` epochs (default {default})" in sentence
