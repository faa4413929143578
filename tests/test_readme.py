"""The README's Python examples run as printed, and its first lines are the two documented commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run_as_printed():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 3
  namespace: dict = {}
  for block in blocks:  # the blocks build on each other, like a reader's session
    exec(compile(block, str(README), "exec"), namespace)
  assert float(namespace["model_loss"](namespace["model"])) < float(namespace["before"])


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
  lines = README.read_text().splitlines()
  commands = [l for l in lines[:6] if l.startswith("python3 -m venv")]
  assert len(commands) == 2
  assert commands[0].endswith("python -m benchmarks.compare")
  assert commands[1].endswith("python -m pytest -q")
  ci = (README.parent / ".ci" / "run").read_text()
  assert commands[1] in ci
