"""The graph-propagation kernel a run uses, chosen by backend in one place.

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
=====================  ============================================  ==========================================

:func:`benchmarks.training.loop.build` passes :func:`propagation_kernel` to every model that takes a
``propagation`` argument (unless the run's hyper-parameters set one). ``models.graph`` must not import the
harness, so its chunk size (``CHUNK_BYTES``) is the one number defined there and taken from there.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from benchmarks.runtime import backend
from models import graph

__all__ = ["CPU_PROPAGATION_CHUNK_BYTES", "describe", "model_defaults", "propagation_chunk_size", "propagation_kernel"]

#: Bytes of ``(edges, d)`` messages per propagation chunk on CPU: ``models.graph``'s own default.
CPU_PROPAGATION_CHUNK_BYTES = graph.CHUNK_BYTES


def propagation_kernel(platform_name: Optional[str] = None) -> str:
  """The ``models.graph`` propagation kernel to use: ``"chunked"`` on CPU, ``"segment_sum"`` elsewhere."""
  return "segment_sum" if backend.is_accelerator(platform_name) else "chunked"


def propagation_chunk_size(n_edges: int, dim: int, itemsize: int = 4, platform_name: Optional[str] = None) -> int:
  """Edges per chunk of ``models.graph.propagate_chunked``: cache-sized on CPU, all edges elsewhere."""
  if backend.is_accelerator(platform_name):
    return int(n_edges)
  return max(1024, CPU_PROPAGATION_CHUNK_BYTES // (int(itemsize) * int(dim)))


def model_defaults(model_cls: Any, platform_name: Optional[str] = None) -> dict[str, Any]:
  """Constructor defaults of ``model_cls`` that depend on the backend (``propagation`` if it takes one)."""
  try:
    parameters = inspect.signature(model_cls.__init__).parameters
  except (TypeError, ValueError):
    return {}
  return {"propagation": propagation_kernel(platform_name)} if "propagation" in parameters else {}


def describe(
  n_items: Optional[int] = None, n_edges: Optional[int] = None, dim: int = 64, platform_name: Optional[str] = None
) -> dict[str, Any]:
  """The backend defaults in force (kernel and evaluation chunk), JSON-ready (for ``device_check`` and logs)."""
  name = platform_name or backend.platform()
  accel = backend.is_accelerator(name)
  out: dict[str, Any] = {
    "platform": name,
    "propagation": propagation_kernel(name),
    "propagation_chunk_bytes": None if accel else CPU_PROPAGATION_CHUNK_BYTES,
    "eval_chunk_elements": backend.ACCEL_EVAL_CHUNK_ELEMENTS if accel else backend.CPU_EVAL_CHUNK_ELEMENTS,
  }
  if n_items is not None:
    out["eval_chunk_users"] = backend.eval_chunk_size(n_items, name)
  if n_edges is not None:
    out["propagation_chunk_edges"] = propagation_chunk_size(n_edges, dim, 4, name)
  return out
