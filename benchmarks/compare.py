"""python -m benchmarks.compare: see :mod:`benchmarks.experiments.comparison`."""

from benchmarks.experiments import comparison

main = comparison.main

if __name__ == "__main__":
  main()
