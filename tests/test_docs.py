"""The documentation runs as written: docstring examples and the README's Python."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import optax_mtl

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(optax_mtl.__path__, prefix="optax_mtl.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.failed == 0


def test_every_docstring_example_is_collected():
  """Each ``>>>`` line of the package's sources is an example doctest finds (none is lost to formatting)."""
  finder = doctest.DocTestFinder()
  for name in MODULES:
    module = importlib.import_module(name)
    found = sum(len(test.examples) for test in finder.find(module) if test.filename == module.__file__)
    source = pathlib.Path(module.__file__).read_text()
    assert found == len(re.findall(r"^\s*>>> ", source, flags=re.M)), name


def readme_blocks(language):
  text = (ROOT / "README.md").read_text()
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_python_runs():
  blocks = readme_blocks("python")
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_readme_has_exactly_two_setup_commands():
  commands = [b.strip() for b in readme_blocks("bash")]
  assert len(commands) == 2
  demo, tests = commands
  assert "examples/demo.py" in demo and '".[examples]"' in demo
  assert "pytest" in tests and '".[test]"' in tests
  assert (ROOT / "examples" / "demo.py").exists()
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pytest" in ci and '".[test]"' in ci
