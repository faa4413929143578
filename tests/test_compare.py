"""The comparison command: outputs, bad input, a diverging run that does not sink the table."""

import csv
import json

import numpy as np
import pytest

from benchmarks import compare
from benchmarks import data as data_lib

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
  table = out[out.index("Relative change vs plain"):]
  assert table.count("%") >= 1


def test_format_tables_paired_change():
  def rec(method, seed, r20):
    metrics = {m: r20 for m in compare.TABLE_METRICS}
    return {"model": "lightgcn", "method": method, "seed": seed, "status": "ok", "test": metrics,
            "best_epoch": 1, "epochs": 2, "wall_s": 1.0, "grad_evals": 10, "grad_evals_per_update": 1.0}

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
        (["--seeds", "0"], "--seeds must be >= 1"),
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
  bare = data_lib.Dataset(name="bare", n_users=ds.n_users, n_items=ds.n_items, train=ds.train,
                          valid=ds.valid, test=ds.test, features={})
  data_lib.write_mmrec(bare, tmp_path / "bare")
  with pytest.raises(SystemExit):
    compare.main(["--data", str(tmp_path / "bare"), "--models", "lightgcn,bm3", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert "model bm3 needs the" in err and "which data set" in err and "has: none" in err
  assert not (tmp_path / "o" / "results.json").exists()  # nothing was trained


def test_a_diverging_run_is_reported_and_the_table_completes(tmp_path, capsys):
  # SGD with alpha1 = 1e30: MG's first update explodes; plain training is unaffected.
  records = compare.main([*SMALL, "--models", "lightgcn", "--methods", "plain,mg", "--optimizer", "sgd",
                          "--lr", "0.05", "--alpha1", "1e30", "--seeds", "1", "--out", str(tmp_path)])
  captured = capsys.readouterr()
  status = {r["method"]: r["status"] for r in records}
  assert status == {"plain": "ok", "mg": "diverged"}
  assert "training loss is nan at epoch 0" in captured.err.lower() or "training loss is inf" in captured.err.lower()
  assert "run(s) failed" in captured.out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["status"] for r in saved] == ["ok", "diverged"]
  assert np.isfinite(saved[0]["test"]["recall@20"])
