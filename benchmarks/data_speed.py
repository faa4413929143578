"""python -m benchmarks.data_speed: timing of the data layer (see :mod:`benchmarks.perf.data_speed`)."""

from benchmarks.perf import data_speed
from benchmarks.runtime import cli

main = cli.command(data_speed.PROG, data_speed.parse_args, data_speed.execute, resumable=False)

if __name__ == "__main__":
  main()
