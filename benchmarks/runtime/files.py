"""Files the harness writes: complete or not at all, in directories checked before any work starts."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["TEMP_SUFFIX", "atomic_write", "atomic_write_all", "json_default", "save_png", "writable_dir_problem"]


def atomic_write(path: Path, text: str | bytes) -> None:
  """Writes ``path`` via a temporary file in the same directory and ``os.replace``."""
  atomic_write_all({path: text})


def atomic_write_all(files: Mapping[Path, str | bytes]) -> None:
  """Writes every file of ``files`` via a temporary file in its directory, then renames them all.

  Every new content is complete and on disk before the first rename, so an error (or an interrupt)
  while writing changes none of the files, and no temporary file outlives this call (one left by a
  killed process is removed by :func:`clear_outputs` of the next command). Only a kill between the
  consecutive renames could leave some files renamed and others not.
  """
  temps: list[tuple[str, Path]] = []
  try:
    for path, text in files.items():
      path = Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
      temps.append((tmp, path))
      with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o644)  # mkstemp creates 0600
    while temps:
      tmp, path = temps[0]
      os.replace(tmp, path)
      temps.pop(0)
  finally:
    for tmp, _ in temps:
      Path(tmp).unlink(missing_ok=True)


#: The suffix of :func:`atomic_write_all`'s temporary files (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"


def writable_dir_problem(path: Path) -> Optional[str]:
  """Creates the directory ``path`` (and its parents) and writes a file there; why that fails, or ``None``."""
  if path.exists() and not path.is_dir():
    return f"{path} exists and is not a directory"
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    return f"cannot create or write to the directory {path} ({e.strerror or e})"
  return None


def save_png(fig, path: Path, *, dpi: int = 90) -> None:
  """Renders the matplotlib figure ``fig`` to PNG, writes it atomically to ``path`` and closes it."""
  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def json_default(x: Any) -> Any:
  """``json.dumps(default=...)`` for numpy scalars."""
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x)}")
