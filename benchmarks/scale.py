"""python -m benchmarks.scale: see :mod:`benchmarks.perf.scale`."""

from benchmarks.perf import scale

main = scale.main

if __name__ == "__main__":
  main()
