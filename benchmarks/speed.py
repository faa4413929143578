"""python -m benchmarks.speed: training and evaluation speed (see :mod:`benchmarks.perf.speed`)."""

from benchmarks.perf import speed
from benchmarks.runtime import cli

main = cli.command(speed.PROG, speed.parse_args, speed.execute, speed.report, resumable=False)

if __name__ == "__main__":
  main()
