"""Training on 2 local processes (jax.distributed, gloo CPU collectives) matches one process.

Every multi-process run happens in subprocesses with 2 host CPU devices each
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``: 4 devices in all), talking over 127.0.0.1 only,
every wait bounded. The single-process references run in this pytest process (one device).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import compare
from benchmarks.data import dataset as data_lib
from benchmarks.parallel import distributed
from benchmarks.training.loop import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in (distributed.ENV_VAR, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  }
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
    PYTHONUNBUFFERED="1",
  )
  return env


def _launch(cmds: list[list[str]], logs: Path) -> list[subprocess.Popen]:
  logs.mkdir(parents=True, exist_ok=True)
  return [
    subprocess.Popen(
      cmd, cwd=ROOT, env=_env(), stdout=open(logs / f"p{i}.out", "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    for i, cmd in enumerate(cmds)
  ]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
  finally:
    for p in procs:  # never leave one behind
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _log(logs: Path, i: int) -> str:
  text = (logs / f"p{i}.out").read_text()
  return "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# --------------------------------------------------------------------------------------------------
# fit() on 2 processes x 2 devices vs one process: MG with row-sharded tables
# --------------------------------------------------------------------------------------------------

CASES = {  # name: (method, shard_tables); plain with replicated tables: the command-line test below
  "mg_sharded": ("mg", True),
}
BASE = dict(
  model="lightgcn",
  batch_size=32,
  max_epochs=2,
  patience=10,
  seed=1,
  model_hparams={"n_layers": 2},
  method_hparams={"beta": 3},
)

FIT_SCRIPT = textwrap.dedent(
  """
    import json, sys
    from benchmarks.parallel import distributed
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.initialize(distributed.Options(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                               initialization_timeout=60, heartbeat_timeout=20))
    import jax
    from benchmarks.data import dataset as data
    from benchmarks.training.loop import TrainConfig, fit
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    cases, base = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    ds = data.synthetic_preset("tiny", seed=0)
    result = {}
    for name, (method, shard) in cases.items():
        fitted = fit(ds, TrainConfig(**base, method=method, shard_tables=shard, devices=4 if shard else None),
                     progress=False)
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(fitted.params)[0]}
        gathered = distributed.allgather(flat)
        result[name] = {"record": {k: fitted.record[k] for k in ("valid", "test", "history", "updates")},
                        "params": {k: v.tolist() for k, v in gathered.items()},
                        "specs": {k: str(v.sharding.spec) for k, v in flat.items()},
                        "local_shape": {k: list(v.addressable_shards[0].data.shape) for k, v in flat.items()}}
    if distributed.is_primary():
        with open(out, "w") as f:
            json.dump(result, f)
    """
)


@pytest.fixture(scope="module")
def two_process_fits(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fit2")
  port = _free_port()
  out = tmp / "result.json"
  cmds = [
    [sys.executable, "-c", FIT_SCRIPT, str(port), str(i), str(out), json.dumps(CASES), json.dumps(BASE)]
    for i in range(2)
  ]
  procs = _launch(cmds, tmp)
  rcs = _wait_all(procs, timeout=400)
  assert rcs == [0, 0], _log(tmp, 0)[-3000:] + "\n-----\n" + _log(tmp, 1)[-3000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process(two_process_fits, name):
  method, shard = CASES[name]
  ds = data_lib.synthetic_preset("tiny", seed=0)
  one = fit(ds, TrainConfig(**BASE, method=method), progress=False)
  two = two_process_fits[name]
  rec = two["record"]
  assert rec["updates"] == one.record["updates"] == 2 * 15
  metrics = max(abs(one.record[s][m] - rec[s][m]) for s in ("valid", "test") for m in one.record[s])
  losses = max(abs(a["loss"] - b["loss"]) for a, b in zip(one.record["history"], rec["history"]))
  ref = _flat(one.params)
  params = max(float(np.max(np.abs(ref[k] - np.asarray(two["params"][k])))) for k in ref)
  print(f"{name}: max |metric diff| {metrics:.3g}, |loss diff| {losses:.3g}, |param diff| {params:.3g}")
  assert metrics <= TOL and losses <= TOL and params <= TOL, (metrics, losses, params)
  tables = {k: v for k, v in two["specs"].items() if k.endswith("embedding")}
  if shard:  # row-sharded over the 4 devices of both processes: each device holds a quarter of the rows
    assert set(tables.values()) == {"P('data', None)"}, tables
    assert two["local_shape"]["user_embedding/embedding"] == [ds.n_users // 4, 64]
  else:
    assert set(tables.values()) == {"P()"}, tables


# --------------------------------------------------------------------------------------------------
# The command line: a dead peer stops the other; after both are dead, the same command ends as one process
# --------------------------------------------------------------------------------------------------

ARGS = [
  "--data",
  "synthetic:tiny",
  "--models",
  "lightgcn",
  "--methods",
  "plain",
  "--seeds",
  "1",
  "--max-epochs",
  "8",
  "--patience",
  "50",
  "--batch-size",
  "32",
  "--checkpoint-every",
  "1",
  "--no-progress",
]


def _cli(port: int, pid: int, out: Path, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "benchmarks.compare",
    *ARGS,
    "--out",
    str(out),
    "--coordinator",
    f"127.0.0.1:{port}",
    "--num-processes",
    "2",
    "--process-id",
    str(pid),
    "--init-timeout",
    "60",
    "--heartbeat-timeout",
    "10",
    *extra,
  ]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli2")
  out = tmp / "out"  # the same command on both processes: one --out (process 0 alone writes records and outputs)
  port = _free_port()
  procs = _launch([_cli(port, i, out) for i in range(2)], tmp / "first")
  deadline = time.time() + 300
  try:
    while time.time() < deadline:  # two finished epochs (checkpoint steps 0 and 1), then kill -9 process 1
      steps = [int(p.name) for p in out.glob("work/*/*") if p.name.isdigit()]
      if (steps and max(steps) >= 1) or any(p.poll() is not None for p in procs):
        break
      time.sleep(0.05)
    running_at_kill = [p.poll() is None for p in procs]
    t_kill = time.time()
    os.killpg(procs[1].pid, signal.SIGKILL)
    rc0 = procs[0].wait(timeout=90)  # the survivor must stop by itself, with a message
    survivor_s = time.time() - t_kill
  finally:
    _wait_all(procs, timeout=30)
  first = {
    "running_at_kill": running_at_kill,
    "rc0": rc0,
    "survivor_s": survivor_s,
    "log0": _log(tmp / "first", 0),
    "results_after_kill": (out / "results.json").exists(),
  }

  port = _free_port()
  procs = _launch([_cli(port, i, out) for i in range(2)], tmp / "resumed")  # the same command again
  rcs = _wait_all(procs, timeout=400)
  assert rcs == [0, 0], _log(tmp / "resumed", 0)[-3000:] + "\n-----\n" + _log(tmp / "resumed", 1)[-3000:]

  reference = compare.main([*ARGS, "--out", str(tmp / "ref")])
  return {
    "first": first,
    "out": out,
    "reference": reference[0],
    "resumed_log0": _log(tmp / "resumed", 0),
    "resumed_log1": _log(tmp / "resumed", 1),
  }


def test_dead_peer_stops_the_other_process_with_a_message(killed_and_resumed):
  first = killed_and_resumed["first"]
  log = first["log0"]
  assert first["running_at_kill"] == [True, True], log[-2000:]
  # Either JAX's coordination service aborts the survivor once the heartbeats stop, or -- when the kill finds
  # the survivor inside a collective with its peer -- gloo's broken connection reaches it first and the hook
  # says so. Both within the heartbeat timeout, both with a message, never a hang or a bare traceback.
  if first["rc0"] == -signal.SIGABRT:
    assert "The following tasks are unhealthy (stopped sending heartbeats)" in log, log[-3000:]
    assert "Terminating process because the JAX distributed service detected fatal errors" in log
  else:
    assert first["rc0"] == distributed.PEER_LOST_EXIT, (first["rc0"], log[-3000:])
    assert "process 0 of 2: lost the connection to a peer process inside a collective (" in log, log[-3000:]
    assert "stopping this process too (exit status 75)" in log
    assert "Traceback" not in log, log[-3000:]
  assert first["survivor_s"] < 10 + 30  # --heartbeat-timeout 10, plus slack for a loaded machine
  assert not first["results_after_kill"]
  print(f"survivor stopped (exit {first['rc0']}) {first['survivor_s']:.1f} s after its peer was killed")


FAIL_SCRIPT = textwrap.dedent(
  """
    import sys
    from benchmarks.parallel import distributed
    port, pid = sys.argv[1], int(sys.argv[2])
    distributed.initialize(distributed.Options(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                               initialization_timeout=60, heartbeat_timeout=60))
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("both joined")
    if pid == 1:
        raise MemoryError("simulated failure in process 1")
    multihost_utils.sync_global_devices("never reached by process 1")  # blocks: the watchdog must end it
    """
)


def test_peer_that_raises_stops_the_others_with_its_error(tmp_path):
  port = _free_port()
  procs = _launch([[sys.executable, "-c", FAIL_SCRIPT, str(port), str(i)] for i in range(2)], tmp_path)
  t0 = time.time()
  rcs = _wait_all(procs, timeout=120)
  log0 = _log(tmp_path, 0)
  assert rcs[0] == distributed.PEER_LOST_EXIT and rcs[1] != 0, (rcs, log0[-3000:])
  assert (
    "benchmarks.distributed: process 0 of 2: process 1 failed: MemoryError: simulated failure in process 1; "
    "stopping this process too"
  ) in log0
  # its own traceback (it then exits 1, or is aborted by JAX once process 0, the coordinator, is gone)
  assert "MemoryError: simulated failure in process 1" in _log(tmp_path, 1)
  assert time.time() - t0 < 60  # heartbeat timeout 60 s: it was the watchdog, not the heartbeat


def test_resume_after_killing_both_processes_matches_one_process(killed_and_resumed):
  r = killed_and_resumed
  two = json.loads((r["out"] / "results.json").read_text())[0]
  one = r["reference"]
  assert two["resumed"] and "runs: 1 trained (1 resumed from a checkpoint), 0 reused" in r["resumed_log0"]
  assert two["epochs"] == one["epochs"] == 8 and two["best_epoch"] == one["best_epoch"]
  assert two["updates"] == one["updates"] and two["key"] == one["key"]
  metrics = max(abs(one[s][m] - two[s][m]) for s in ("valid", "test") for m in one[s])
  losses = max(abs(a["loss"] - b["loss"]) for a, b in zip(one["history"], two["history"], strict=True))
  # (the parameters are compared by test_two_processes_match_one_process: a finished run's checkpoints are deleted)
  print(f"resumed 2-process run vs one process: |metric diff| {metrics:.3g}, |loss diff| {losses:.3g}")
  assert metrics <= TOL and losses <= TOL, (metrics, losses)


def test_only_process_zero_writes_results(killed_and_resumed):
  out = killed_and_resumed["out"]
  assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "curves.png", "command.json", "runs"}
  assert len(list((out / "runs").glob("*.json"))) == 1 and list((out / "work").iterdir()) == []
  assert "Test metrics at the best-validation epoch" in killed_and_resumed["resumed_log0"]
  assert "Test metrics at the best-validation epoch" not in killed_and_resumed["resumed_log1"]
  assert "wrote " not in killed_and_resumed["resumed_log1"]


def test_unreachable_coordinator_fails_within_the_init_timeout(tmp_path):
  port = _free_port()  # nobody listens there
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.compare",
    "--data",
    "synthetic:tiny",
    "--models",
    "lightgcn",
    "--coordinator",
    f"127.0.0.1:{port}",
    "--num-processes",
    "2",
    "--process-id",
    "1",
    "--init-timeout",
    "3",
    "--out",
    str(tmp_path / "out"),
  ]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]  # JAX ends it (a C++ fatal error)
  assert (
    f"benchmarks.distributed: joining coordinator 127.0.0.1:{port} as process 1 of 2 (waiting up to 3 s" in proc.stderr
  ), proc.stderr[-2000:]
  assert "DEADLINE_EXCEEDED" in proc.stderr and "RegisterTask" in proc.stderr
  assert time.time() - t0 < 60
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# In-process pieces
# --------------------------------------------------------------------------------------------------


def _parse(argv):
  p = argparse.ArgumentParser()
  distributed.add_arguments(p)
  return distributed.options_from_args(p.parse_args(argv))


def test_flags_and_environment(monkeypatch):
  for var in (distributed.ENV_VAR, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert _parse([]) is None
  o = _parse(
    ["--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3", "--heartbeat-timeout", "30"]
  )
  assert (o.coordinator, o.num_processes, o.process_id, o.auto, o.heartbeat_timeout) == (
    "10.0.0.1:1234",
    4,
    3,
    False,
    30,
  )
  assert _parse(["--distributed", "auto"]).auto
  monkeypatch.setenv(distributed.ENV_VAR, "auto")
  assert _parse([]) == distributed.Options(auto=True)
  assert _parse(["--distributed", "off"]) is None
  monkeypatch.delenv(distributed.ENV_VAR)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  assert _parse(["--process-id", "1"]) == distributed.Options(coordinator="h:1", num_processes=2, process_id=1)
  with pytest.raises(ValueError, match="--process-id must be in \\[0, 2\\)"):
    _parse(["--process-id", "2"])
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  with pytest.raises(ValueError, match="--coordinator missing"):
    _parse(["--process-id", "1"])
  with pytest.raises(ValueError, match="HOST:PORT"):
    distributed.Options(coordinator="nohost", num_processes=2, process_id=0)


def test_compare_reports_bad_flags_through_the_parser(monkeypatch, capsys):
  monkeypatch.delenv(distributed.ENV_VAR, raising=False)
  with pytest.raises(SystemExit):
    compare.main(["--data", "synthetic:tiny", "--num-processes", "2", "--process-id", "0"])
  assert "--coordinator missing" in capsys.readouterr().err


class _Sharding:
  def __init__(self, index_map):
    self.index_map = index_map

  def addressable_devices_indices_map(self, shape):
    return self.index_map


def test_local_slice():
  s = slice(None)
  both = _Sharding({0: (s, slice(0, 8)), 1: (s, slice(8, 16))})
  assert distributed.local_slice(both, (3, 32)) == (slice(0, 3), slice(0, 16))
  gap = _Sharding({0: (s, slice(0, 8)), 1: (s, slice(16, 24))})
  assert distributed.local_slice(gap, (3, 32)) is None
  replicated = _Sharding({0: (s, s), 1: (s, s)})
  assert distributed.local_slice(replicated, (3, 32)) == (slice(0, 3), slice(0, 32))
  assert distributed.local_slice(_Sharding({0: ()}), ()) == ()
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = np.arange(12, dtype=np.int32).reshape(3, 4)
  put = distributed.put_global(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
  np.testing.assert_array_equal(np.asarray(put), x)


class _FakeClient:
  def __init__(self, failed=()):
    self.failed = list(failed)

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.failed if k.startswith(prefix)]

  def key_value_set(self, key, value):
    self.failed.append((key, value))


def test_watchdog_names_a_peer_that_failed_with_an_exception(capsys):
  client = _FakeClient(failed=[(distributed.FAILED_DIR + "2", "MemoryError: out of memory")])
  exits = []
  thread = distributed.start_watchdog(0.05, client=client, process_id=0, num_processes=3, exit_fn=exits.append)
  thread.join(10)
  assert exits == [distributed.PEER_LOST_EXIT]
  assert (
    "process 0 of 3: process 2 failed: MemoryError: out of memory; stopping this process too" in capsys.readouterr().err
  )


def test_watchdog_ignores_its_own_failure_record_and_stops_when_disarmed():
  client = _FakeClient(failed=[(distributed.FAILED_DIR + "0", "KeyboardInterrupt: ")])
  exits = []
  thread = distributed.start_watchdog(0.05, client=client, process_id=0, num_processes=3, exit_fn=exits.append)
  time.sleep(0.5)
  assert exits == [] and thread.is_alive()
  distributed._STATE["watchdog"]["stopping"] = True  # what the orderly-exit hook does
  thread.join(5)
  assert not thread.is_alive()


GLOO_RESET = (
  "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
  "[127.0.0.1]:32129: Connection reset by peer"
)


def test_lost_peer_recognises_a_broken_gloo_connection_and_nothing_else():
  assert distributed.lost_peer(jax.errors.JaxRuntimeError(GLOO_RESET + "\nmore")) == GLOO_RESET
  assert distributed.lost_peer(jax.errors.JaxRuntimeError("UNKNOWN: ... Connection closed by peer")) is not None
  assert distributed.lost_peer(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
  assert distributed.lost_peer(RuntimeError(GLOO_RESET)) is None  # not from XLA: this process's own error
  assert distributed.lost_peer(MemoryError("x")) is None


def test_hook_turns_a_lost_peer_into_one_line_and_the_peer_lost_status(capsys):
  client, exits, previous = _FakeClient(), [], sys.excepthook
  try:
    distributed.start_watchdog(
      0.01, client=client, process_id=0, num_processes=2, exit_fn=exits.append, install_hook=True
    )
    hook = sys.excepthook
    assert hook is not previous
    hook(jax.errors.JaxRuntimeError, jax.errors.JaxRuntimeError(GLOO_RESET), None)
    err = capsys.readouterr().err
    assert exits == [distributed.PEER_LOST_EXIT]
    assert f"process 0 of 2: lost the connection to a peer process inside a collective ({GLOO_RESET})" in err
    assert "Traceback" not in err
    assert client.failed == [(distributed.FAILED_DIR + "0", "lost a peer: " + GLOO_RESET)]

    sys.excepthook, client = previous, _FakeClient()
    distributed.start_watchdog(
      0.01, client=client, process_id=1, num_processes=2, exit_fn=exits.append, install_hook=True
    )
    sys.excepthook(MemoryError, MemoryError("simulated"), None)  # its own failure: the traceback, exit 1
    assert exits[-1] == 1
    assert "MemoryError: simulated" in capsys.readouterr().err
    assert client.failed == [(distributed.FAILED_DIR + "1", "MemoryError: simulated")]
  finally:
    sys.excepthook = previous
    distributed._STATE["watchdog"]["stopping"] = True
