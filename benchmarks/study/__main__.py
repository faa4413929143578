"""``python -m benchmarks.study SPEC``: tune, evaluate and report a study (see :mod:`benchmarks.study.runner`)."""

from benchmarks.runtime import cli
from benchmarks.study import runner

if __name__ == "__main__":
  cli.run("benchmarks.study", runner.main)
