"""Backend-dependent defaults of the harness itself: which platform runs, and the evaluation chunk.

=====================  ============================================  ==========================================
default                CPU                                           GPU / TPU
=====================  ============================================  ==========================================
evaluation chunk       users whose scores fill                       :data:`ACCEL_EVAL_CHUNK_ELEMENTS` (1 GiB of
                       :data:`CPU_EVAL_CHUNK_ELEMENTS` (24 MiB, under float32 scores), at most 32,768 users
                       glibc's mmap threshold), at most 4,096 users
=====================  ============================================  ==========================================

The graph-propagation kernel a model runs with is chosen per backend in :mod:`benchmarks.training.kernels`
(it depends on ``models``; this module does not). Every function reads ``jax.default_backend()`` when
called (nothing is cached), or takes ``platform_name``.
"""

from __future__ import annotations

from typing import Optional

import jax

__all__ = [
  "ACCEL_EVAL_CHUNK_ELEMENTS",
  "CPU_EVAL_CHUNK_ELEMENTS",
  "eval_chunk_size",
  "is_accelerator",
  "platform",
]

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


def eval_chunk_size(n_items: int, platform_name: Optional[str] = None) -> int:
  """Users per full-ranking evaluation chunk (a multiple of 8), for ``n_items`` scores per user."""
  accel = is_accelerator(platform_name)
  budget = ACCEL_EVAL_CHUNK_ELEMENTS if accel else CPU_EVAL_CHUNK_ELEMENTS
  cap = _EVAL_CHUNK_CAP["accelerator" if accel else "cpu"]
  return int(min(max(8, budget // int(n_items) // 8 * 8), cap))
