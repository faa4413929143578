"""python -m benchmarks.robustness: see :mod:`benchmarks.experiments.robustness`."""

from benchmarks.experiments import robustness

main = robustness.main

if __name__ == "__main__":
  main()
