"""python -m benchmarks.device_check: see :mod:`benchmarks.perf.device_check`."""

from benchmarks.perf import device_check

main = device_check.main

if __name__ == "__main__":
  main()
