"""python -m benchmarks.data_speed: see :mod:`benchmarks.perf.data_speed`."""

from benchmarks.perf import data_speed

main = data_speed.main

if __name__ == "__main__":
  main()
