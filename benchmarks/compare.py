"""python -m benchmarks.compare: see :mod:`benchmarks.experiments.comparison`."""

from benchmarks.experiments import comparison
from benchmarks.runtime import cli

main = cli.command(comparison.PROG, comparison.parse, comparison.run, comparison.report)

if __name__ == "__main__":
  main()
