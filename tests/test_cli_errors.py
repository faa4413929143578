"""Nothing silent: bad input to the commands is a one-line usage error (exit status 2) that names the option
or item, raised before anything is trained. (Earlier runs in compare's --out: test_rerun.py.)"""

import os
import tempfile
from pathlib import Path

import pytest

from benchmarks import compare
from benchmarks import landscape
from benchmarks import robustness
from benchmarks.experiments import robustness as robustness_lib
from benchmarks.training import records

BASE = [
  "--data",
  "synthetic:tiny",
  "--models",
  "lightgcn",
  "--methods",
  "plain",
  "--seeds",
  "1",
  "--max-epochs",
  "2",
  "--batch-size",
  "128",
  "--no-progress",
]


def _argv(main, out, *extra):
  """Small-run arguments of ``main`` (compare, robustness or landscape) writing to ``out``."""
  common = [
    "--data",
    "synthetic:tiny",
    "--methods",
    "plain",
    "--max-epochs",
    "2",
    "--batch-size",
    "128",
    "--no-progress",
    "--out",
    str(out),
  ]
  if main is compare.main:
    return [*common, "--models", "lightgcn", "--seeds", "1", *extra]
  flat = ["--hessian-iters", "2", "--hessian-pairs", "128"]
  if main is robustness.main:
    return [
      *common,
      *flat,
      "--models",
      "lightgcn",
      "--seeds",
      "1",
      "--repeats",
      "1",
      "--sigmas",
      "0",
      "--fractions",
      "0",
      *extra,
    ]
  return [*common, *flat, "--model", "lightgcn", "--grid-points", "2", *extra]


@pytest.fixture
def no_training(monkeypatch):
  """Makes any training fail the test: every refusal must come before the first run trains."""

  def trained(*args, **kwargs):
    raise AssertionError("a run was trained before the bad input was refused")

  monkeypatch.setattr(records, "fit", trained)  # compare trains through its run store
  monkeypatch.setattr(robustness_lib, "fit", trained)


def _refused(main, argv, capsys, *messages):
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  if main is compare.main:
    assert err.startswith("python -m benchmarks.compare: error: ") and err.count("\n") == 1, err  # one line
  for message in messages:
    assert message in err, err
  return err


# --------------------------------------------------------------------------------------------------
# Numbers that would train nonsense (class 4)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args,message",
  [
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got 0.0"),
    (["--lr=-1e-3"], "argument --lr: expected a finite number > 0, got -0.001"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["--alpha1", "inf"], "argument --alpha1: expected a finite number > 0, got inf"),
    (["--alpha2", "0"], "argument --alpha2: expected a finite number > 0, got 0.0"),
    (["--alpha2", "1.5"], "--alpha2 must be smaller than --alpha1"),
    (["--beta", "0"], "argument --beta: expected an integer >= 1, got 0"),
    (["--beta", "2.5"], "argument --beta: expected an integer >= 1, got '2.5'"),
    (["--rho", "0"], "argument --rho: expected a finite number > 0, got 0.0"),
    (["--gnp-penalty=-0.1"], "argument --gnp-penalty: expected a finite number >= 0, got -0.1"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--max-epochs", "0"], "argument --max-epochs: expected an integer >= 1, got 0"),
    (["--patience", "-1"], "argument --patience: expected an integer >= 0, got -1"),
    (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got 0"),
    (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: expected an integer >= 1, got 0"),
    (["--devices", "0"], "argument --devices: expected an integer >= 1, got 0"),
    (["--grid", "beta=3,0"], "--grid beta=0: beta: expected an integer >= 1, got 0"),
    (["--grid", "alpha2=0.1,1.5"], "--grid alpha2=1.5: alpha2 must be smaller than alpha1"),
    (["--grid", "learning_rate=1e-3,-1"], "--grid learning_rate=-1: learning_rate: expected a finite number > 0"),
    (["--grid", "batch_size=64,0"], "--grid batch_size=0: batch_size: expected an integer >= 1, got 0"),
    (["--grid", "rho=0.05,inf"], "--grid rho=inf: rho: expected a finite number > 0, got 'inf'"),
  ],
)
def test_out_of_range_numbers_are_refused_before_training(tmp_path, capsys, no_training, args, message):
  out = tmp_path / "out"
  _refused(compare.main, [*BASE, "--methods", "plain,mg", "--out", str(out), *args], capsys, message)
  assert not (out / "results.json").exists()


@pytest.mark.parametrize(
  "main,args,message",
  [
    (robustness.main, ["--lr", "0"], "argument --lr: expected a finite number > 0"),
    (robustness.main, ["--alpha1", "inf"], "argument --alpha1: expected a finite number > 0, got inf"),
    (robustness.main, ["--alpha2", "2"], "--alpha2 must be smaller than --alpha1"),
    (robustness.main, ["--sigmas", "0,inf"], "--sigmas"),
    (robustness.main, ["--hparam", "n_layers=1.5"], "lightgcn.n_layers: expected an integer, got 1.5"),
    (landscape.main, ["--lr", "-1"], "argument --lr: expected a finite number > 0"),
    (landscape.main, ["--radius", "inf"], "argument --radius: expected a finite number > 0, got inf"),
    (landscape.main, ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (landscape.main, ["--hparam", "n_layers=-1"], "--hparam lightgcn.n_layers=-1: LightGCN: n_layers must be >= 0"),
  ],
)
def test_robustness_and_landscape_refuse_bad_numbers_before_training(
  tmp_path, capsys, no_training, main, args, message
):
  _refused(main, _argv(main, tmp_path / "out", *args), capsys, message)


# --------------------------------------------------------------------------------------------------
# --hparam / --grid strings (class 5)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args,message",
  [
    (["--hparam", "=1"], "--hparam '=1': expected [model.]name=value with a non-empty name and value"),
    (["--hparam", "n_layers="], "--hparam 'n_layers=': expected [model.]name=value"),
    (["--hparam", "lightgcn.=2"], "--hparam 'lightgcn.=2': expected [model.]name=value"),
    (
      ["--hparam", "n_layers=1", "--hparam", "lightgcn.n_layers=2"],
      "--hparam 'lightgcn.n_layers=2': lightgcn.n_layers is already set by --hparam 'n_layers=1'",
    ),
    (
      ["--hparam", "reg_wieght=1e-4"],
      "--hparam 'reg_wieght=1e-4': lightgcn has no hyper-parameter 'reg_wieght' (it takes: embedding_dim, n_layers",
    ),
    (["--hparam", "alpha2=0.1"], "lightgcn has no hyper-parameter 'alpha2'"),
    (["--hparam", "n_layers=1.5"], "--hparam 'n_layers=1.5': lightgcn.n_layers: expected an integer, got 1.5"),
    (
      ["--hparam", "reg_weight=abc"],
      "--hparam 'reg_weight=abc': lightgcn.reg_weight: expected a finite number, got 'abc'",
    ),
    (["--hparam", "n_layers=-1"], "--hparam lightgcn.n_layers=-1: LightGCN: n_layers must be >= 0, got -1"),
    (["--grid", "=1,2"], "--grid part '=1,2': expected name=v1,v2,... with a non-empty name and values"),
    (["--grid", "n_layers="], "--grid part 'n_layers=': expected name=v1,v2,..."),
    (["--grid", "n_layers=1,,2"], "--grid part 'n_layers=1,,2': expected name=v1,v2,..."),
    (["--grid", ""], "--grid '' names no hyper-parameter"),
    (["--grid", "n_layers=1;n_layers=2"], "--grid: n_layers is given twice"),
    (["--grid", "n_layers=1,1"], "--grid n_layers: value 1 is given twice"),
    (["--grid", "reg_wieght=1,2"], "--grid part 'reg_wieght=1,2': unknown hyper-parameter 'reg_wieght'"),
    (["--grid", "seed=0,1"], "unknown hyper-parameter 'seed'"),
    (
      ["--grid", "max_epochs=1,2"],
      "unknown hyper-parameter 'max_epochs' (max_epochs cannot be searched: set it with --max-epochs)",
    ),
    (["--grid", "n_layers=1,1.5"], "--grid n_layers=1.5: lightgcn.n_layers: expected an integer, got 1.5"),
    (["--grid", "reg_weight=a,b"], "--grid reg_weight=a: lightgcn.reg_weight: expected a finite number, got 'a'"),
    (["--grid", "n_layers=2,-1"], "--grid n_layers=-1 (lightgcn): LightGCN: n_layers must be >= 0, got -1"),
    (
      ["--models", "vbpr,lightgcn", "--grid", "n_layers=1,2"],
      "n_layers is a hyper-parameter of lightgcn but not of vbpr",
    ),
    (["--hparam", "n_layers=1", "--grid", "n_layers=2,3"], "--grid n_layers and --hparam both set n_layers"),
  ],
)
def test_bad_hparam_and_grid_items_are_named(tmp_path, capsys, no_training, args, message):
  _refused(compare.main, [*BASE, "--out", str(tmp_path / "out"), *args], capsys, message)


# --------------------------------------------------------------------------------------------------
# --out that cannot be written (class 6)
# --------------------------------------------------------------------------------------------------


def _unwritable_dir(tmp_path: Path) -> Path:
  if os.geteuid() != 0:
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    return d
  for d in (Path("/sys"), Path("/proc")):  # root writes anywhere else
    try:
      os.close(tempfile.mkstemp(dir=d)[0])
    except OSError:
      return d
  pytest.skip("no unwritable directory available")


@pytest.mark.parametrize("main", [compare.main, robustness.main, landscape.main])
@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable"])
def test_a_bad_out_is_refused_before_training(tmp_path, capsys, no_training, main, kind):
  (tmp_path / "f").write_text("not a directory")
  out = {"file": tmp_path / "f", "under a file": tmp_path / "f" / "sub", "unwritable": _unwritable_dir(tmp_path)}[kind]
  message = {
    "file": f"--out {out}: {out} exists and is not a directory",
    "under a file": f"--out {out}: cannot create or write to the directory {out}",
    "unwritable": f"--out {out}: cannot create or write to the directory {out}",
  }[kind]
  _refused(main, _argv(main, out), capsys, message)
