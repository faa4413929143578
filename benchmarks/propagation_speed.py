"""python -m benchmarks.propagation_speed: see :mod:`benchmarks.perf.propagation`."""

from benchmarks.perf import propagation

main = propagation.main

if __name__ == "__main__":
  main()
