r"""Training on several processes (one or many machines) with JAX's multi-controller runtime.

    # one machine, 2 processes (CPU: 2 host devices each, 4 in all)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.compare ... \
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.compare ... \
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1
    # under SLURM / Open MPI / Kubernetes (what jax.distributed.initialize() detects by itself)
    srun python -m benchmarks.compare ... --distributed auto

Every process runs the same command. :func:`initialize` calls :func:`jax.distributed.initialize` (before any
other JAX call) with bounded timeouts; after it ``jax.devices()`` lists the devices of every process and
:func:`benchmarks.parallel.mesh.make_mesh` builds the one-axis ``("data",)`` mesh over all of them (in multi-process
mode it must span them all). Then, in :func:`benchmarks.training.loop.fit`:

* **batches**: every process runs the same negative sampler with the same seed, so each holds the same global
  epoch sample; :func:`put_global` gives ``jax.make_array_from_process_local_data`` only this process's
  rows of each global batch (the rows its devices hold under ``P(None, "data")``). The global batch is
  therefore exactly the one a single process trains on, and XLA's collectives (gloo on CPU, NCCL on GPU)
  reduce the gradients across processes;
* **parameters / optimizer state**: replicated on every device, or with ``--shard-tables`` the embedding
  tables (and their Adam moments) row-sharded across all devices of all processes
  (:func:`benchmarks.parallel.mesh.place_state`; ``jax.device_put`` of the identically initialised local copy
  keeps only this process's shards);
* **evaluation** (:func:`evaluate_params`): the users of each chunk are split over the mesh (each device
  scores and ranks its rows against all items), the per-user metric rows are gathered to every process
  (``process_allgather``) and averaged there in float64 -- the same formula and order as one process, so
  every process reaches the same early-stopping decisions;
* **checkpoints**: :class:`benchmarks.training.checkpoints.RunCheckpoints` (orbax) is called by every process; orbax
  writes each process's shards and process 0 the metadata, and restores every array with the sharding it was
  saved with -- so a run resumes with the **same process count** (and devices per process) on a directory all
  processes can read (one machine, or a shared file system);
* **results**: only process 0 (:func:`is_primary`) writes ``results.json`` / ``.csv`` / ``curves.png`` and
  prints the tables.

Failure -- no process hangs:

* a process that cannot reach the coordinator, or whose peers do not all join, gives up after
  ``--init-timeout`` seconds (``initialization_timeout``) with a message;
* a process killed outright (``kill -9``, the kernel's OOM killer, a lost machine) stops sending heartbeats:
  after ``--heartbeat-timeout`` seconds the coordination service aborts every other process with "The
  following tasks are unhealthy (stopped sending heartbeats): <ids> ... Terminating process because the JAX
  distributed service detected fatal errors" (SIGABRT); if the dead one is process 0, which hosts the
  coordination service, the others abort as soon as their next call to it fails. A survivor that is waiting
  in a collective with the dead process usually learns of it first from the collective (gloo: "Connection
  reset by peer") and stops at once with exit status :data:`PEER_LOST_EXIT` and "lost the connection to a
  peer process inside a collective (<JAX's error>)";
* a process that dies of a Python exception leaves its error in the coordination service and exits at once;
  the others stop within :func:`start_watchdog`'s interval (2 s) with exit status :data:`PEER_LOST_EXIT` and
  "process <i> failed: <error>".
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import numpy as np

__all__ = [
  "ENV_VAR",
  "PEER_LOST_EXIT",
  "Options",
  "add_arguments",
  "allgather",
  "initialize",
  "is_multiprocess",
  "is_primary",
  "local_slice",
  "lost_peer",
  "options_from_args",
  "put_global",
  "setup_from_args",
  "start_watchdog",
]

#: ``MIRROR_OPTAX_DISTRIBUTED=auto`` is the same as ``--distributed auto``.
ENV_VAR = "MIRROR_OPTAX_DISTRIBUTED"
#: Exit status of a process that the watchdog ends because a peer died of an exception.
PEER_LOST_EXIT = 75

_DEFAULT_INIT_TIMEOUT = 300
_DEFAULT_HEARTBEAT_TIMEOUT = 100


@dataclasses.dataclass(frozen=True)
class Options:
  """How to join a multi-process run (``None`` fields: let ``jax.distributed.initialize`` detect them)."""

  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  auto: bool = False  # no explicit coordinator/count/id needed: cluster auto-detection (SLURM, Open MPI, ...)
  initialization_timeout: int = _DEFAULT_INIT_TIMEOUT
  heartbeat_timeout: int = _DEFAULT_HEARTBEAT_TIMEOUT
  shutdown_timeout: int = 300  # how long an orderly exit waits for the other processes (JAX's default)
  watchdog_interval: Optional[float] = 2.0  # seconds between checks for failed peers; None: none

  def __post_init__(self):
    if self.num_processes is not None and int(self.num_processes) < 1:
      raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
    if (
      self.process_id is not None
      and self.num_processes is not None
      and not (0 <= int(self.process_id) < int(self.num_processes))
    ):
      raise ValueError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")
    if self.process_id is not None and int(self.process_id) < 0:
      raise ValueError(f"--process-id must be >= 0, got {self.process_id}")
    if self.coordinator is not None and ":" not in self.coordinator:
      raise ValueError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
    for name in ("initialization_timeout", "heartbeat_timeout"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1 second, got {getattr(self, name)}")
    if not self.auto and None in (self.coordinator, self.num_processes, self.process_id):
      missing = [
        flag
        for flag, v in (
          ("--coordinator", self.coordinator),
          ("--num-processes", self.num_processes),
          ("--process-id", self.process_id),
        )
        if v is None
      ]
      raise ValueError(
        f"multi-process run: {', '.join(missing)} missing (give all three, or --distributed auto "
        "to let jax.distributed.initialize detect them, e.g. under SLURM)"
      )


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The multi-process options (a group of their own, so they do not mix with the training options)."""
  g = p.add_argument_group("several processes / machines (jax.distributed; see benchmarks/distributed.py)")
  g.add_argument(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="address of process 0's coordination service (the same on every process)",
  )
  g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the run")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's rank, 0..N-1")
  g.add_argument(
    "--distributed",
    choices=("off", "auto"),
    default=None,
    help=f"auto: call jax.distributed.initialize() and let it detect the cluster (SLURM, Open MPI, "
    f"Kubernetes, Cloud TPU); default: ${ENV_VAR} or off",
  )
  g.add_argument(
    "--init-timeout",
    type=int,
    default=_DEFAULT_INIT_TIMEOUT,
    metavar="S",
    help="seconds to wait for every process to join (default %(default)s)",
  )
  g.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=_DEFAULT_HEARTBEAT_TIMEOUT,
    metavar="S",
    help="seconds after which a silent (dead) process fails the run (default %(default)s)",
  )


def options_from_args(args: argparse.Namespace) -> Optional[Options]:
  """The :class:`Options` the parsed flags ask for, or ``None`` for a single-process run.

  Explicit flags win; ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` fill gaps.

  Raises:
    ValueError: an incomplete or inconsistent set of flags (the message names what is missing).
  """
  mode = getattr(args, "distributed", None) or os.environ.get(ENV_VAR, "off").strip().lower() or "off"
  if mode not in ("off", "auto"):
    raise ValueError(f"${ENV_VAR} must be 'off' or 'auto', got {mode!r}")
  coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = getattr(args, "num_processes", None)
  pid = getattr(args, "process_id", None)
  num = int(os.environ["JAX_NUM_PROCESSES"]) if num is None and os.environ.get("JAX_NUM_PROCESSES") else num
  pid = int(os.environ["JAX_PROCESS_ID"]) if pid is None and os.environ.get("JAX_PROCESS_ID") else pid
  explicit = any(
    v is not None
    for v in (
      getattr(args, "coordinator", None),
      getattr(args, "num_processes", None),
      getattr(args, "process_id", None),
    )
  )
  if mode == "off" and not explicit:
    return None
  return Options(
    coordinator=coordinator,
    num_processes=num,
    process_id=pid,
    auto=mode == "auto",
    initialization_timeout=getattr(args, "init_timeout", _DEFAULT_INIT_TIMEOUT),
    heartbeat_timeout=getattr(args, "heartbeat_timeout", _DEFAULT_HEARTBEAT_TIMEOUT),
  )


def setup_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[Options]:
  """What a command does with the flags of :func:`add_arguments`, before any JAX computation.

  A single-process run (no flag, ``$MIRROR_OPTAX_DISTRIBUTED`` unset or ``off``) is left untouched. Otherwise
  it joins the run (:func:`initialize`), trains over all devices of all processes (``args.devices``, if the
  namespace has it, defaults to ``jax.device_count()``) and turns off the progress bars of processes other
  than 0. Bad flags end in ``parser.error``.
  """
  try:
    options = options_from_args(args)
  except ValueError as e:
    parser.error(str(e))
  if options is None:
    return None
  initialize(options)
  if getattr(args, "devices", "absent") is None:
    args.devices = jax.device_count()
  if hasattr(args, "no_progress") and not is_primary():
    args.no_progress = True
  print(
    f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
    f"{jax.default_backend()} device(s), {jax.device_count()} in all",
    flush=True,
  )
  return options


_STATE: dict[str, Any] = {"options": None, "watchdog": None}


def initialize(options: Options) -> None:
  """Joins the multi-process run: ``jax.distributed.initialize`` with bounded timeouts, then the watchdog.

  Must come before any other JAX computation in the process. On CPU the cross-process collectives are gloo's
  (``jax_cpu_collectives_implementation``, unless set in the environment). A second call with the same
  options does nothing.

  If the coordinator does not answer, or not every process joins, within ``options.initialization_timeout``
  seconds, JAX ends the process (SIGABRT, "DEADLINE_EXCEEDED ... RegisterTask"), after the line printed here
  that says what it was waiting for.

  Raises:
    RuntimeError: ``jax.distributed.initialize`` raised (JAX's message, prefixed with what was tried).
  """
  if _STATE["options"] is not None:
    if _STATE["options"] != options:
      raise RuntimeError("benchmarks.parallel.distributed.initialize was already called with other options")
    return
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(
    initialization_timeout=int(options.initialization_timeout),
    heartbeat_timeout_seconds=int(options.heartbeat_timeout),
    shutdown_timeout_seconds=int(options.shutdown_timeout),
  )
  if not options.auto:
    kwargs["cluster_detection_method"] = "deactivate"
  where = (
    f"coordinator {options.coordinator} as process {options.process_id} of {options.num_processes}"
    if not options.auto
    else "the auto-detected cluster"
  )
  # said first: if the coordinator never answers, JAX aborts the process (DEADLINE_EXCEEDED) after the timeout
  print(
    f"benchmarks.distributed: joining {where} (waiting up to {options.initialization_timeout} s for all processes)",
    file=sys.stderr,
    flush=True,
  )
  try:
    jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id, **kwargs)
  except Exception as e:  # e.g. no cluster detected, a bad address, the backend already started
    raise RuntimeError(
      f"jax.distributed.initialize failed ({where}; initialization timeout {options.initialization_timeout} s): {e}"
    ) from e
  _STATE["options"] = options
  if jax.process_count() > 1 and options.watchdog_interval:
    start_watchdog(options.watchdog_interval)


def is_multiprocess() -> bool:
  """More than one JAX process (call it after :func:`initialize`: it starts the backend)."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0 -- the one that writes results (``True`` in a single-process run)."""
  return jax.process_index() == 0


#: Key-value directory (in the coordination service) where a process that fails with an exception leaves
#: its message for the others.
FAILED_DIR = "mirror_optax/failed/"


def _client():
  return jax._src.distributed.global_state.client  # pylint: disable=protected-access


def start_watchdog(
  interval: float = 2.0,
  *,
  client: Any = None,
  process_id: Optional[int] = None,
  num_processes: Optional[int] = None,
  exit_fn: Callable[[int], None] = os._exit,
  install_hook: Optional[bool] = None,
) -> threading.Thread:
  """Stops this process soon after a peer dies of an uncaught exception, naming the peer and its error.

  A hook (``sys.excepthook``) makes a process that dies of an uncaught exception leave
  ``"<type>: <message>"`` under :data:`FAILED_DIR` in the coordination service's key-value store and exit at
  once (not through JAX's orderly shutdown, which would wait for the peers at a barrier); a daemon thread
  reads that directory every ``interval`` seconds and ends this process (``exit_fn(PEER_LOST_EXIT)``) with
  the peer's message when another process has left one. A process killed outright (``kill -9``, out of
  memory) is JAX's to detect: it stops sending heartbeats and after ``heartbeat_timeout`` seconds the
  coordination service aborts every other process ("The following tasks are unhealthy (stopped sending
  heartbeats)"); if process 0 (the coordinator) dies, the others abort at once. A survivor that is inside
  a collective when its peer dies usually learns of it sooner, from the collective itself (gloo:
  "Connection reset by peer"): the hook turns that error (:func:`lost_peer`) into one line saying a peer
  was lost and exits with :data:`PEER_LOST_EXIT`. An orderly exit disarms the thread (``atexit``).
  ``client``/``process_id``/``num_processes`` default to JAX's (tests pass fakes); ``install_hook``
  (default: only with the real ``os._exit``) sets ``sys.excepthook``.
  """
  client = client if client is not None else _client()
  n = jax.process_count() if num_processes is None else int(num_processes)
  me = jax.process_index() if process_id is None else int(process_id)
  state = {"stopping": False}
  _STATE["watchdog"] = state

  def failures_of_others() -> list[str]:
    try:
      entries = client.key_value_dir_get(FAILED_DIR)
    except Exception:  # the coordinator is gone: JAX aborts this process by itself
      return []
    return [
      f"process {key.rsplit('/', 1)[-1]} failed: {value}"
      for key, value in sorted(entries)
      if key.rsplit("/", 1)[-1] != str(me)
    ]

  def watch() -> None:
    while not state["stopping"]:
      time.sleep(interval)
      failed = failures_of_others()
      if failed and not state["stopping"]:
        state["stopping"] = True
        print(
          f"benchmarks.distributed: process {me} of {n}: {'; '.join(failed)}; stopping this process too "
          f"(exit status {PEER_LOST_EXIT})",
          file=sys.stderr,
          flush=True,
        )
        exit_fn(PEER_LOST_EXIT)
        return

  def disarm() -> None:
    state["stopping"] = True

  def publish_failure(exc_type, exc, tb) -> None:
    lost = lost_peer(exc)
    summary = f"lost a peer: {lost}" if lost else f"{exc_type.__name__}: {exc}"
    try:
      client.key_value_set(f"{FAILED_DIR}{me}", summary[:2000])
    except Exception:
      pass
    disarm()
    if lost:  # not this process's fault: one line, not a traceback through the collective
      print(
        f"benchmarks.distributed: process {me} of {n}: lost the connection to a peer process inside a "
        f"collective ({lost}); a peer died (killed, out of memory, or its machine lost); stopping this "
        f"process too (exit status {PEER_LOST_EXIT})",
        file=sys.stderr,
        flush=True,
      )
    else:
      previous_hook(exc_type, exc, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(2 * interval)  # the others read the message while the coordinator (maybe this process) runs
    exit_fn(PEER_LOST_EXIT if lost else 1)

  previous_hook = sys.excepthook
  if install_hook is None:
    install_hook = exit_fn is os._exit  # the real thing, not a test
  if install_hook:
    sys.excepthook = publish_failure
  if exit_fn is os._exit:
    atexit.register(disarm)  # registered after JAX's clean-up, so it runs before it
  thread = threading.Thread(target=watch, name="peer-failures", daemon=True)
  thread.start()
  return thread


#: What a collective's error says when the connection to a peer process broke under it (gloo on CPU).
_LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_peer(exc: BaseException) -> Optional[str]:
  """The first line of JAX's error when ``exc`` is a collective failing because a peer's connection broke.

  ``None`` for any other exception (those are this process's own failures). On CPU a peer that is killed
  while the others wait in a gloo collective shows up as ``JaxRuntimeError: UNKNOWN: Gloo AllGather failed:
  ... Read error ...: Connection reset by peer``.
  """
  if not isinstance(exc, jax.errors.JaxRuntimeError):
    return None
  text = str(exc).strip()
  if not any(sign in text for sign in _LOST_PEER_SIGNS):
    return None
  return text.splitlines()[0]  # not empty: it holds a sign


# --------------------------------------------------------------------------------------------------
# Global arrays from identical host data
# --------------------------------------------------------------------------------------------------


def local_slice(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> Optional[tuple[slice, ...]]:
  """The block of a global ``shape`` array that this process's devices hold, or ``None`` if not one block."""
  index_map = sharding.addressable_devices_indices_map(tuple(shape))
  blocks = {tuple(_bounds(s, n) for s, n in zip(index, shape)) for index in index_map.values()}
  box = [(min(b[d][0] for b in blocks), max(b[d][1] for b in blocks)) for d in range(len(shape))]
  volume = int(np.prod([hi - lo for lo, hi in box]))
  covered = sum(int(np.prod([hi - lo for lo, hi in b])) for b in blocks)  # distinct shards are disjoint
  return tuple(slice(lo, hi) for lo, hi in box) if covered == volume else None


def _bounds(s: slice, size: int) -> tuple[int, int]:
  start, stop, _ = s.indices(size)
  return start, stop


def put_global(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array with ``sharding`` from a host value that every process holds identically.

  Each process hands over only its own block (``jax.make_array_from_process_local_data``), so the result is
  exactly the array one process would have built. In a single process it is ``jax.device_put``.
  """
  if not is_multiprocess():
    return jax.device_put(value, sharding)
  value = np.asarray(value)
  block = local_slice(sharding, value.shape)
  if block is None:  # this process's shards are not one block: build them one by one
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.make_array_from_process_local_data(sharding, value[block], value.shape)


def allgather(tree: Any) -> Any:
  """Every leaf of ``tree`` as a full numpy array on every process (``process_allgather``)."""
  from jax.experimental import multihost_utils

  if not is_multiprocess():
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
