"""python -m benchmarks.landscape: see :mod:`benchmarks.experiments.landscape`."""

from benchmarks.experiments import landscape

main = landscape.main

if __name__ == "__main__":
  main()
