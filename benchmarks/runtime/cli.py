"""How every command ends: its result, a one-line error with status 2, or a one-line interrupt with 130.

A command is ``main = cli.command(prog, parse, call, report)``: ``parse(argv)`` turns the command line into one
validated options object (raising :class:`UsageError` naming the flag), ``call(options)`` is the one library
call, ``report(result)`` prints. :func:`run` maps the ways a command can end to what a shell user expects:
argparse's own convention for bad input (status 2, ``prog: error: ...``, no traceback), and one line with
status 130 for Ctrl-C, after which the same command continues from what was finished.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

USAGE_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C

T = TypeVar("T")


class UsageError(ValueError):
  """Bad input a user can fix: a flag's value, a data path or file. The message names the flag (and the
  file, line and column where it applies); it is printed as ``prog: error: <message>`` with status 2."""


def interrupted_line(prog: str, resumable: bool = True) -> str:
  """What a command prints when Ctrl-C ends it: what is kept, and how to go on."""
  if not resumable:  # a measurement: nothing half-written, nothing to continue
    return f"{prog} (pid {os.getpid()}): interrupted; nothing was written"
  return (
    f"{prog} (pid {os.getpid()}): interrupted; finished runs are in the store, and a run that was "
    "training resumes from its last checkpoint when the same command runs again"
  )


def run(prog: str, body: Callable[[], T], *, resumable: bool = True) -> T:
  """``body()``, with :class:`UsageError` and Ctrl-C turned into one line on stderr and a ``SystemExit``."""
  try:
    return body()
  except UsageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT) from None
  except KeyboardInterrupt:
    # Ctrl-C, or `timeout -s INT` around a bounded session (SIGINT reaches every worker too): one line
    # per process, not a traceback -- nothing is lost, so there is nothing to debug.
    print(interrupted_line(prog, resumable), file=sys.stderr)
    raise SystemExit(INTERRUPTED_EXIT) from None


def command(
  prog: str,
  parse: Callable[[Optional[Sequence[str]]], Any],
  call: Callable[[Any], T],
  report: Optional[Callable[[T], None]] = None,
  *,
  resumable: bool = True,
) -> Callable[[Optional[Sequence[str]]], T]:
  """The ``main(argv=None)`` of a command: parse, make the one library call, print, as :func:`run` says.

  ``resumable``: the command keeps its finished runs and continues them when run again (the training
  commands); ``False`` for measurements, whose Ctrl-C line says that nothing was written.
  """

  def main(argv: Optional[Sequence[str]] = None) -> T:
    def body() -> T:
      result = call(parse(argv))
      if report is not None:
        report(result)
      return result

    return run(prog, body, resumable=resumable)

  main.__doc__ = f"``python -m {prog} [args]`` as a function: returns what the command computed."
  return main
