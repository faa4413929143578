"""python -m benchmarks.speed: see :mod:`benchmarks.perf.speed`."""

from benchmarks.perf import speed

main = speed.main

if __name__ == "__main__":
  main()
