"""``python -m benchmarks.landscape``: training-loss landscapes of plain / MG / SAM on one plane (paper fig. 3).

See :mod:`benchmarks.experiments.landscape`. Parses the command line into checked options, makes the one
library call (trains or loads every method, writes ``landscape.json`` and ``landscape.png``) and prints the
table.
"""

from __future__ import annotations

from typing import Any

from benchmarks.experiments import landscape
from benchmarks.runtime import cli


def report(document: dict[str, Any]) -> None:
  print()
  print(landscape.format_table(document))


main = cli.command(landscape.PROG, landscape.parse_options, landscape.run, report)

if __name__ == "__main__":
  main()
