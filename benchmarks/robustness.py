"""``python -m benchmarks.robustness``: noise, information adjustment and flatness of trained runs (paper section 5).

See :mod:`benchmarks.experiments.robustness`. Parses the command line into checked options, makes the one
library call (trains or loads every run, measures it, writes ``robustness.json``) and prints the tables.
"""

from __future__ import annotations

from typing import Any

from benchmarks.experiments import robustness
from benchmarks.runtime import cli


def report(records: list[dict[str, Any]]) -> None:
  print()
  print(robustness.format_tables(records))


main = cli.command(robustness.PROG, robustness.parse_options, robustness.run, report)

if __name__ == "__main__":
  main()
