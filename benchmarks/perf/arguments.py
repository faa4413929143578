"""Command-line parsing of the perf commands: argparse whose every error is one :class:`~benchmarks.runtime.cli.UsageError`.

argparse itself prints a usage block and exits on bad input; :class:`ArgumentParser` raises a
:class:`~benchmarks.runtime.cli.UsageError` instead, so :func:`benchmarks.runtime.cli.run` prints the one line
``prog: error: argument --flag: ...`` and exits with status 2. The ``type=`` helpers here check a value where
argparse reads it, so the message names the flag. Nothing here imports JAX (``device_check`` sets its
environment before JAX starts, and ``scale`` estimates without it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional

from benchmarks.runtime import cli
from benchmarks.runtime.files import writable_dir_problem

__all__ = ["ArgumentParser", "integer", "integer_list", "json_path", "real"]


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse.ArgumentParser`` for a ``python -m benchmarks.<command>`` whose errors raise
  :class:`cli.UsageError`. Its help comes from the module docstring ``doc``: the first paragraph above the flags,
  the paragraph of indented ``python -m`` examples (if any) below them."""

  def __init__(self, prog: str, doc: Optional[str], **kwargs: Any):
    paragraphs = (doc or "").strip().split("\n\n")
    examples = [
      p for p in paragraphs[1:] if p.startswith("    python -m") and all(x.startswith("    ") for x in p.splitlines())
    ]
    kwargs.setdefault("description", paragraphs[0])
    kwargs.setdefault("epilog", "examples:\n" + examples[0] if examples else None)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(prog=prog, **kwargs)

  def error(self, message: str) -> NoReturn:
    raise cli.UsageError(message)


def _number(text: str, integer_: bool, low: float, inclusive: bool) -> Any:
  want = f"{'an integer' if integer_ else 'a finite number'} {'>=' if inclusive else '>'} {low:g}"
  try:
    value: Any = int(text) if integer_ else float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
  if not math.isfinite(value) or value < low or (value == low and not inclusive):
    raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
  return value


def integer(low: int) -> Callable[[str], int]:
  """An argparse ``type``: an integer ``>= low``."""
  parse = lambda text: _number(text, True, low, True)
  parse.__name__ = "integer"
  return parse


def real(low: float, inclusive: bool = True) -> Callable[[str], float]:
  """An argparse ``type``: a finite number ``>= low`` (``> low`` unless ``inclusive``); ``1e6`` is accepted."""
  parse = lambda text: _number(text, False, low, inclusive)
  parse.__name__ = "number"
  return parse


def integer_list(low: int) -> Callable[[str], tuple[int, ...]]:
  """An argparse ``type``: a non-empty comma list of integers ``>= low``."""

  def parse(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
      values = tuple(int(t) for t in items)
    except ValueError:
      values = ()
    if not values or any(v < low for v in values):
      raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {low}, got {text!r}")
    return values

  parse.__name__ = "integer list"
  return parse


def json_path(text: str) -> Path:
  """An argparse ``type``: a file to write, in a directory that exists or can be created and is writable (checked
  now, before any work, by creating the directory and a probe file in it)."""
  path = Path(text)
  if not text or path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file name")
  problem = writable_dir_problem(path.parent)
  if problem:
    raise argparse.ArgumentTypeError(problem)
  return path
