"""The documentation of ``mirror_optax`` runs as printed.

The doctest examples of every module (the ``Example:`` sections of the public functions), the Python blocks
of ``mirror_optax/README.md``, and the length of the transformations' module docstrings (optax-sized: the
derivations live beside the code and in the README).
"""

import doctest
import importlib
import re
from pathlib import Path

import pytest

import mirror_optax

MODULES = [
  "mirror_optax.checks",
  "mirror_optax.flatness",
  "mirror_optax.gradient_norm_penalty",
  "mirror_optax.mirror_gradient",
]
LIBRARY_README = Path(mirror_optax.__file__).resolve().parent / "README.md"


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
  module = importlib.import_module(name)  # the module itself (the package re-exports functions of the same name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name} (output above)"


@pytest.mark.parametrize("function", [mirror_optax.mirror_gradient, mirror_optax.gradient_norm_penalty])
def test_public_transformations_have_a_doctest_example(function):
  examples = [e for t in doctest.DocTestFinder().find(function) for e in t.examples]
  assert len(examples) >= 5, function.__name__
  for section in ("Args:", "Returns:", "Raises:", "Example:", "References:"):
    assert section in function.__doc__, (function.__name__, section)


@pytest.mark.parametrize("name", ["mirror_optax.mirror_gradient", "mirror_optax.gradient_norm_penalty"])
def test_module_docstrings_stay_short(name):
  assert len(importlib.import_module(name).__doc__.strip().splitlines()) <= 30


def test_library_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", LIBRARY_README.read_text(), flags=re.S)
  assert len(blocks) >= 3
  namespace = {"__name__": "readme"}
  for block in blocks:  # in order, sharing one namespace, as a reader would run them
    exec(compile(block, str(LIBRARY_README), "exec"), namespace)
  assert int(namespace["multi_state"].gradient_step) == 1  # the MultiSteps block emitted one update
