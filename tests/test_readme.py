"""The READMEs: every Python example runs on its own, the first lines are the two documented commands, and every
``python -m benchmarks.X`` named in README.md exists.

Each ```python block runs in a fresh interpreter (``sys.executable -c``) in an empty temporary directory with
``JAX_PLATFORMS=cpu``, so it can use only its own imports and the installed packages. In README.md, a ```text
block that directly follows a ```python block is that block's printed output, and must match it.
mirror_optax/README.md (the library's own page) is checked the same way when it exists, without the output rule.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIBRARY_README = ROOT / "mirror_optax" / "README.md"
MAX_README_LINES = 260
BLOCK_TIMEOUT_S = 120
COMMANDS = (
  "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && python -m benchmarks.compare",
  "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && python -m pytest -q",
)

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def fenced_blocks(text):
  """``[(language, body, first_line, end_offset)]`` of the fenced code blocks of a Markdown text, in order."""
  return [(m[1].strip(), m[2], text.count("\n", 0, m.start()) + 1, m.end()) for m in _FENCE.finditer(text)]


def python_examples(path, *, with_output):
  """``[(id, code, expected_stdout or None)]`` of the ```python blocks of ``path``; with ``with_output``, a
  ```text block that follows a python block with nothing but blank lines between them is its expected output."""
  text = path.read_text(encoding="utf-8")
  blocks = fenced_blocks(text)
  examples = []
  for k, (lang, body, line, end) in enumerate(blocks):
    if lang != "python":
      continue
    expected = None
    if with_output and k + 1 < len(blocks):
      next_lang, next_body, _, _ = blocks[k + 1]
      start = text.index("```", end)
      if next_lang == "text" and not text[end:start].strip():
        expected = next_body
    examples.append((f"{path.relative_to(ROOT)}:{line}", body, expected))
  return examples


def _all_examples():
  examples = python_examples(README, with_output=True)
  if LIBRARY_README.exists():
    examples += python_examples(LIBRARY_README, with_output=False)
  return examples


EXAMPLES = _all_examples()


def _lines(text):
  return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.mark.parametrize("code, expected", [e[1:] for e in EXAMPLES], ids=[e[0] for e in EXAMPLES])
def test_python_example_runs_on_its_own(code, expected, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=BLOCK_TIMEOUT_S,
  )
  assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
  if expected is not None:
    assert _lines(proc.stdout) == _lines(expected), f"printed:\n{proc.stdout}\nREADME says:\n{expected}"


def test_readme_has_python_examples():
  assert len(python_examples(README, with_output=False)) >= 2  # the optax chain and flax.nnx.Optimizer
  assert all(expected is not None for _, _, expected in python_examples(README, with_output=True))


def test_library_readme_examples_are_collected_when_it_exists():
  if not LIBRARY_README.exists():
    pytest.skip("mirror_optax/README.md does not exist (yet)")
  collected = [e for e in EXAMPLES if e[0].startswith("mirror_optax/")]  # each runs above, as its own test
  assert len(collected) == len(python_examples(LIBRARY_README, with_output=False))


def test_readme_is_short():
  n = len(README.read_text(encoding="utf-8").splitlines())
  assert n <= MAX_README_LINES, f"README.md has {n} lines; the long material belongs in benchmarks/README.md"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
  text = README.read_text(encoding="utf-8")
  bash = [(body, line) for lang, body, line, _ in fenced_blocks(text) if lang == "bash"]
  assert bash, "README.md has no ```bash block"
  body, line = bash[0]
  assert tuple(body.strip("\n").splitlines()) == COMMANDS
  assert line == 3, "the two commands open the README"
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert COMMANDS[1] in ci.splitlines()


def test_every_benchmarks_command_named_in_the_readme_exists():
  names = sorted(set(re.findall(r"python -m benchmarks\.(\w+)", README.read_text(encoding="utf-8"))))
  assert names, "README.md names no benchmarks command"
  missing = [
    n
    for n in names
    if not (ROOT / "benchmarks" / f"{n}.py").is_file() and not (ROOT / "benchmarks" / n / "__main__.py").is_file()
  ]
  assert not missing, f"README.md names python -m benchmarks.X for which no module exists: {missing}"
