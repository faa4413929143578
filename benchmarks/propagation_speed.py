"""python -m benchmarks.propagation_speed: LightGCN propagation kernels timed (see :mod:`benchmarks.perf.propagation`)."""

from benchmarks.perf import propagation
from benchmarks.runtime import cli

main = cli.command(propagation.PROG, propagation.parse_args, propagation.execute, propagation.report, resumable=False)

if __name__ == "__main__":
  main()
