"""python -m benchmarks.scale: the memory model (see :mod:`benchmarks.perf.scale`)."""

from benchmarks.perf import scale
from benchmarks.runtime import cli

main = cli.command(scale.PROG, scale.parse_args, scale.execute, scale.report, resumable=False)

if __name__ == "__main__":
  main()
