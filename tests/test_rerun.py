"""Reruns of ``python -m benchmarks.compare``: the same command again -- after it finished, after Ctrl-C, after
``kill -9`` -- reuses the finished runs, resumes the interrupted one and ends as an uninterrupted command would;
another command in the same ``--out`` is refused; ``--overwrite`` starts afresh; bad data is one line, status 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import compare
from benchmarks.data import dataset as data_lib
from benchmarks.training import loop, records

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.compare"

BASE = [
  "--data",
  "synthetic:tiny",
  "--models",
  "lightgcn",
  "--methods",
  "plain,mg",
  "--seeds",
  "1",
  "--batch-size",
  "128",
  "--no-progress",
]
#: 4 epochs, a checkpoint after each: an interrupt at mg's 3rd validation leaves its checkpoints of epochs 0, 1.
RESUMABLE = [*BASE, "--max-epochs", "4", "--patience", "50", "--checkpoint-every", "1"]


def _usage_error(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    compare.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err  # one line, no traceback
  return err


def _same_results(a: list[dict], b: list[dict]) -> None:
  """The same runs with the same outcome (not the same wall times)."""
  assert [(r["model"], r["method"], r["seed"]) for r in a] == [(r["model"], r["method"], r["seed"]) for r in b]
  for x, y in zip(a, b):
    for key in ("key", "status", "valid", "test", "best_epoch", "epochs", "updates", "grad_evals", "stopped_by"):
      assert x[key] == y[key], key
    assert [h["loss"] for h in x["history"]] == [h["loss"] for h in y["history"]]


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
  return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "runs").glob("*.json"))}


# --------------------------------------------------------------------------------------------------
# The same command twice
# --------------------------------------------------------------------------------------------------


def test_the_same_command_twice_trains_nothing_the_second_time(tmp_path, capsys):
  argv = [*BASE, "--max-epochs", "2", "--out", str(tmp_path)]
  first = compare.main(argv)
  assert "runs: 2 trained, 0 reused" in capsys.readouterr().out
  runs = _snapshot(tmp_path)
  results = (tmp_path / "results.json").read_bytes()
  assert len(runs) == 2

  again = compare.main(argv)
  out = capsys.readouterr().out
  assert "runs: 0 trained, 2 reused" in out
  assert out.count("reused (finished earlier)") == 2 and ": trained:" not in out
  assert _snapshot(tmp_path) == runs  # no record written again
  assert (tmp_path / "results.json").read_bytes() == results  # identical results.json
  assert again == first
  # --resume (deprecated) is accepted and changes nothing
  assert compare.main([*argv, "--resume"]) == first
  assert "runs: 0 trained, 2 reused" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Ctrl-C, then the same command
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """An uninterrupted reference, and an ``--out`` whose command was interrupted (KeyboardInterrupt, as Ctrl-C
  raises it) in mg's third epoch, after plain had finished."""
  tmp = tmp_path_factory.mktemp("interrupted")
  reference = compare.main([*RESUMABLE, "--out", str(tmp / "reference")])
  out = tmp / "out"
  evaluations = []
  real = loop.evaluate_params

  def interrupting(*args, **kwargs):
    evaluations.append(args[4])  # the split
    if len(evaluations) == 8:  # plain: 4 valid + 1 test; mg: valid of epochs 0, 1, then this one
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  stderr = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
    mp.setattr(loop, "evaluate_params", interrupting)
    with pytest.raises(SystemExit) as e:
      compare.main([*RESUMABLE, "--out", str(out)])
  return {"reference": reference, "out": out, "code": e.value.code, "stderr": stderr.getvalue()}


def _copy(interrupted, tmp_path) -> Path:
  out = tmp_path / "out"
  shutil.copytree(interrupted["out"], out)
  return out


def test_ctrl_c_ends_with_one_line_and_status_130_and_keeps_the_finished_run(interrupted):
  assert interrupted["code"] == 130
  lines = interrupted["stderr"].splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{PROG} (pid {os.getpid()}): interrupted; finished runs are in")
  out = interrupted["out"]
  assert len(list((out / "runs").glob("*.json"))) == 1  # plain finished: its record is kept
  (work,) = [p for p in (out / "work").iterdir() if p.is_dir()]  # mg's checkpoints
  assert sorted(int(p.name) for p in work.iterdir() if p.name.isdigit()) == [0, 1]
  assert not (out / "results.json").exists()
  assert not list((out / "work").glob("*.lock"))  # the locks were released


def test_the_same_command_after_ctrl_c_completes_like_an_uninterrupted_run(interrupted, tmp_path, capsys):
  out = _copy(interrupted, tmp_path)
  records = compare.main([*RESUMABLE, "--out", str(out)])
  text = capsys.readouterr().out
  assert "runs: 1 trained (1 resumed from a checkpoint), 1 reused" in text
  assert "lightgcn/mg seed 0: resumed from its checkpoint: " in text
  _same_results(records, interrupted["reference"])
  assert json.loads((out / "results.json").read_text()) == records
  assert list((out / "work").iterdir()) == []


def _truncate_meta(run_dir: Path, step: int) -> None:
  meta = run_dir / str(step) / "meta" / "metadata"
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(interrupted, tmp_path, capsys):
  out = _copy(interrupted, tmp_path)
  (run_dir,) = [p for p in (out / "work").iterdir() if p.is_dir()]
  _truncate_meta(run_dir, 1)
  with pytest.warns(RuntimeWarning, match=f"checkpoint step 1 in {re.escape(str(run_dir.absolute()))} is damaged"):
    records = compare.main([*RESUMABLE, "--out", str(out)])
  _same_results(records, interrupted["reference"])


def test_no_readable_checkpoint_is_refused_before_training(interrupted, tmp_path, capsys, monkeypatch):
  out = _copy(interrupted, tmp_path)
  (run_dir,) = [p for p in (out / "work").iterdir() if p.is_dir()]
  _truncate_meta(run_dir, 0)
  _truncate_meta(run_dir, 1)
  monkeypatch.setattr(records, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
  err = _usage_error([*RESUMABLE, "--out", str(out)], capsys)
  assert f"--out {out}: no usable checkpoint in {run_dir.absolute()}: step 1: its metadata cannot be read" in err
  assert "; step 0: its metadata cannot be read" in err and "pass --overwrite" in err


# --------------------------------------------------------------------------------------------------
# kill -9, then the same command (real processes)
# --------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


KILLED = [*BASE, "--methods", "mg", "--max-epochs", "30", "--patience", "50", "--checkpoint-every", "2"]


def test_kill_9_then_the_same_command_ends_like_an_uninterrupted_run(tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "benchmarks.compare", *KILLED, "--out", str(out)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a few checkpointed epochs, then kill -9 mid-run
      steps = [int(p.name) for p in out.glob("work/*/*") if p.name.isdigit()]
      if steps and max(steps) >= 3:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "results.json").exists()
  assert list(out.glob("work/*.lock"))  # the dead process's locks: taken over by the next command

  again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "runs: 1 trained (1 resumed from a checkpoint), 0 reused" in again.stdout, again.stdout[-3000:]
  resumed = json.loads((out / "results.json").read_text())
  reference = compare.main([*KILLED, "--out", str(tmp_path / "reference")])
  _same_results(resumed, reference)


# --------------------------------------------------------------------------------------------------
# Another command in the same --out; --overwrite
# --------------------------------------------------------------------------------------------------


def test_another_command_in_the_same_out_is_refused_naming_what_differs(tmp_path, capsys, monkeypatch):
  data = tmp_path / "data"
  data_lib.write_mmrec(data_lib.synthetic_preset("tiny"), data)
  argv = [*BASE, "--data", str(data), "--methods", "plain", "--max-epochs", "1", "--out", str(tmp_path / "out")]
  compare.main(argv)
  runs = _snapshot(tmp_path / "out")
  monkeypatch.setattr(records, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
  err = _usage_error([*argv, "--max-epochs", "2", "--hparam", "n_layers=1"], capsys)
  assert f"--out {tmp_path / 'out'} holds the runs of another command (" in err
  assert "--max-epochs 1 there, 2 here; --hparam none there, lightgcn.n_layers=1 here)" in err
  assert "pass --overwrite to delete its runs and start afresh, or choose another --out" in err
  # the same flags on data whose content changed
  shutil.rmtree(data)
  data_lib.write_mmrec(data_lib.synthetic_preset("tiny", seed=1), data)
  err = _usage_error(argv, capsys)
  assert "(the data changed (content fingerprint " in err
  assert _snapshot(tmp_path / "out") == runs


def test_the_same_data_under_another_path_is_the_same_command(tmp_path, capsys):
  data = tmp_path / "data"
  data_lib.write_mmrec(data_lib.synthetic_preset("tiny"), data)
  argv = [*BASE, "--methods", "plain", "--max-epochs", "1", "--out", str(tmp_path / "out")]
  compare.main([*argv, "--data", str(data)])
  capsys.readouterr()
  (inter,) = data.glob("*.inter")
  compare.main([*argv, "--data", str(inter)])  # the .inter file itself: same content, same runs
  assert "runs: 0 trained, 1 reused" in capsys.readouterr().out


def test_a_second_compare_in_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, monkeypatch):
  (tmp_path / "work").mkdir()
  lock = tmp_path / "work" / "compare.lock"
  lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
  monkeypatch.setattr(records, "fit", lambda *a, **k: pytest.fail("trained beside another compare"))
  err = _usage_error([*BASE, "--out", str(tmp_path)], capsys)
  assert f"--out {tmp_path} is in use by another compare ({lock}); wait for it to end" in err
  assert lock.exists()


def test_overwrite_deletes_the_runs_and_trains_afresh(tmp_path, capsys):
  argv = [*BASE, "--max-epochs", "1", "--out", str(tmp_path)]
  first = compare.main(argv)
  capsys.readouterr()
  again = compare.main([*argv, "--overwrite"])
  out = capsys.readouterr().out
  assert f"--overwrite: deleted the 2 run(s) and the outputs that {tmp_path} held" in out
  assert "runs: 2 trained, 0 reused" in out
  _same_results(again, first)
  # another command with --overwrite replaces the earlier one
  other = compare.main([*argv, "--methods", "plain", "--overwrite"])
  assert len(other) == 1 and len(list((tmp_path / "runs").glob("*.json"))) == 1
  assert json.loads((tmp_path / "command.json").read_text())["settings"]["--methods"] == "plain"


def test_removed_checkpoint_dir_is_refused_with_a_hint(tmp_path, capsys):
  err = _usage_error([*BASE, "--out", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck")], capsys)
  assert "--checkpoint-dir was removed: a run's checkpoints now live in <out>/work/" in err


# --------------------------------------------------------------------------------------------------
# Data errors: one line naming --data and the file, status 2
# --------------------------------------------------------------------------------------------------


def _inter(directory: Path, rows: bytes) -> Path:
  directory.mkdir(parents=True)
  (directory / "toy.inter").write_bytes(b"userID\titemID\tx_label\n" + rows)
  return directory


@pytest.mark.parametrize("kind", ["missing", "preset", "malformed"])
def test_data_errors_are_one_line_naming_data_and_the_file(tmp_path, capsys, kind):
  if kind == "missing":
    spec, where = str(tmp_path / "nope"), f"{tmp_path / 'nope'} does not exist"
  elif kind == "preset":
    spec, where = "synthetic:nope", "unknown synthetic preset 'nope'"
  else:
    spec = str(_inter(tmp_path / "toy", b"0\t0\t0\n0\tx\t1\n"))
    where = f"{tmp_path / 'toy' / 'toy.inter'}, line 3, column 'itemID'"
  err = _usage_error([*BASE, "--data", spec, "--out", str(tmp_path / "out")], capsys)
  assert f"{PROG}: error: --data {spec}: {where}" in err


def test_a_malformed_inter_file_exits_2_without_a_traceback(tmp_path):
  data = _inter(tmp_path / "toy", b"0\t0\t0\n0\tx\t1\n")
  cmd = [sys.executable, "-m", "benchmarks.compare", "--data", str(data), "--out", str(tmp_path / "out")]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"{PROG}: error: --data {data}: {data / 'toy.inter'}, line 3, column 'itemID'")
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
