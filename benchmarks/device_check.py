"""python -m benchmarks.device_check: one budgeted accelerator check (see :mod:`benchmarks.perf.device_check`)."""

from benchmarks.perf import device_check  # first: it sets JAX's environment before anything imports JAX
from benchmarks.runtime import cli

main = cli.command(
  device_check.PROG, device_check.parse_args, device_check.execute, device_check.report, resumable=False
)

if __name__ == "__main__":
  main()
