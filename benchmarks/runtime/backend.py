"""Backend-dependent defaults, chosen in one place: the graph-propagation kernel and the evaluation chunk.

What is fastest differs between XLA:CPU and accelerators (measured by ``benchmarks.speed`` and
``benchmarks.propagation_speed`` on CPU; the accelerator side follows XLA's usual preference for few, large
kernels and is what ``benchmarks.device_check`` measures on a GPU):

=====================  ============================================  ==========================================
default                CPU                                           GPU / TPU
=====================  ============================================  ==========================================
propagation kernel     ``"chunked"``: a ``lax.scan`` over edge       ``"segment_sum"``: one gather + one sorted
                       chunks of :data:`CPU_PROPAGATION_CHUNK_BYTES`  ``segment_sum`` over all edges (what
                       of messages (cache-sized; ~3x faster on        ``"chunked"`` does there anyway: a single
                       XLA:CPU than one big scatter)                  chunk); messages ``(n_edges, d)`` in memory
evaluation chunk       users whose scores fill                       :data:`ACCEL_EVAL_CHUNK_ELEMENTS` (1 GiB of
                       :data:`CPU_EVAL_CHUNK_ELEMENTS` (24 MiB, under float32 scores), at most 32,768 users
                       glibc's mmap threshold), at most 4,096 users
=====================  ============================================  ==========================================

:func:`benchmarks.train.build` passes :func:`propagation_method` to every model that takes a ``propagation``
argument (unless the run's hyper-parameters set one) and :func:`benchmarks.train.evaluate_params` asks
:func:`eval_chunk_size` for the chunk, so a run's backend choices come from here. ``benchmarks.metrics.evaluate``
asks it too when no chunk is given. ``models.graph`` must not import the harness, so its chunk size
(``CHUNK_BYTES``) is the one number defined there and taken from there; ``tests/test_backend.py`` checks
its CPU/accelerator rule against :func:`propagation_chunk_size` under faked backends.

Every function reads ``jax.default_backend()`` when called (nothing is cached), or takes ``platform``.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import jax

from models import graph

__all__ = [
  "ACCEL_EVAL_CHUNK_ELEMENTS",
  "CPU_EVAL_CHUNK_ELEMENTS",
  "CPU_PROPAGATION_CHUNK_BYTES",
  "describe",
  "eval_chunk_size",
  "is_accelerator",
  "model_defaults",
  "platform",
  "propagation_chunk_size",
  "propagation_method",
]

#: Bytes of ``(edges, d)`` messages per propagation chunk on CPU: ``models.graph``'s own default.
CPU_PROPAGATION_CHUNK_BYTES = graph.CHUNK_BYTES
#: Score-matrix elements per evaluation chunk on CPU: 24 MiB of float32, under glibc's 32 MiB mmap ceiling.
CPU_EVAL_CHUNK_ELEMENTS = 6 * 2**20
#: Score-matrix elements per evaluation chunk on accelerators: 1 GiB of float32.
ACCEL_EVAL_CHUNK_ELEMENTS = 2**28
_EVAL_CHUNK_CAP = {"cpu": 4096, "accelerator": 32768}


def platform() -> str:
  """``jax.default_backend()``: ``"cpu"``, ``"gpu"`` (CUDA and ROCm) or ``"tpu"``."""
  return jax.default_backend()


def is_accelerator(platform_name: Optional[str] = None) -> bool:
  """Anything but the CPU."""
  return (platform_name or platform()) != "cpu"


def propagation_method(platform_name: Optional[str] = None) -> str:
  """The ``models.graph`` propagation kernel to use: ``"chunked"`` on CPU, ``"segment_sum"`` elsewhere."""
  return "segment_sum" if is_accelerator(platform_name) else "chunked"


def propagation_chunk_size(n_edges: int, dim: int, itemsize: int = 4, platform_name: Optional[str] = None) -> int:
  """Edges per chunk of ``models.graph.propagate_chunked``: cache-sized on CPU, all edges elsewhere."""
  if is_accelerator(platform_name):
    return int(n_edges)
  return max(1024, CPU_PROPAGATION_CHUNK_BYTES // (int(itemsize) * int(dim)))


def eval_chunk_size(n_items: int, platform_name: Optional[str] = None) -> int:
  """Users per full-ranking evaluation chunk (a multiple of 8), for ``n_items`` scores per user."""
  accel = is_accelerator(platform_name)
  budget = ACCEL_EVAL_CHUNK_ELEMENTS if accel else CPU_EVAL_CHUNK_ELEMENTS
  cap = _EVAL_CHUNK_CAP["accelerator" if accel else "cpu"]
  return int(min(max(8, budget // int(n_items) // 8 * 8), cap))


def model_defaults(model_cls: Any, platform_name: Optional[str] = None) -> dict[str, Any]:
  """Constructor defaults of ``model_cls`` that depend on the backend (``propagation`` if it takes one)."""
  try:
    parameters = inspect.signature(model_cls.__init__).parameters
  except (TypeError, ValueError):
    return {}
  return {"propagation": propagation_method(platform_name)} if "propagation" in parameters else {}


def describe(
  n_items: Optional[int] = None, n_edges: Optional[int] = None, dim: int = 64, platform_name: Optional[str] = None
) -> dict[str, Any]:
  """The defaults in force, as a JSON-ready dict (for ``benchmarks.device_check`` and logs)."""
  name = platform_name or platform()
  out: dict[str, Any] = {
    "platform": name,
    "propagation": propagation_method(name),
    "propagation_chunk_bytes": None if is_accelerator(name) else CPU_PROPAGATION_CHUNK_BYTES,
    "eval_chunk_elements": ACCEL_EVAL_CHUNK_ELEMENTS if is_accelerator(name) else CPU_EVAL_CHUNK_ELEMENTS,
  }
  if n_items is not None:
    out["eval_chunk_users"] = eval_chunk_size(n_items, name)
  if n_edges is not None:
    out["propagation_chunk_edges"] = propagation_chunk_size(n_edges, dim, 4, name)
  return out
