"""This process's memory as the Linux kernel counts it (``/proc/self/status``): the one reader of it.

``VmRSS`` is the resident set now, ``VmHWM`` its high-water mark; writing ``5`` to ``/proc/self/clear_refs``
resets the mark (Linux >= 4.0), so a measurement can exclude what came before it (e.g. data generation).
"""

from __future__ import annotations

import resource

__all__ = ["peak_rss_mib", "reset_peak", "status_kib", "status_mib"]


def status_kib(field: str) -> int:
  """The ``field`` (e.g. ``"VmHWM"``) of ``/proc/self/status`` in KiB; ``RuntimeError`` if it has none."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def status_mib(field: str) -> float:
  """:func:`status_kib` in MiB."""
  return status_kib(field) / 1024


def reset_peak() -> bool:
  """Resets ``VmHWM`` to the current ``VmRSS``; ``False`` where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_mib() -> dict[str, float]:
  """Peak resident memory of this process: ``ru_maxrss`` (since start) and ``VmHWM`` (since the last reset), MiB."""
  out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    out["vmhwm_mib"] = status_mib("VmHWM")
  except (OSError, RuntimeError):  # no /proc (not Linux)
    pass
  return out
