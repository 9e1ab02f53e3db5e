"""The documentation runs as written: docstring examples, the README's Python, the Sphinx site.

The API reference (docs/api/*.rst) has an entry for every public name, checked without Sphinx;
the slow test builds the site with warnings as errors (the docs extra).
"""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys
import tomllib

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
  # CI installs the test extra (with the docs extra, for the docs build test) and runs the tests.
  assert "python -m pytest" in ci and re.search(r'pip install -e "\.\[test(,\w+)*\]"', ci)


# The API reference (docs/api/*.rst): every public name has an entry, as optax's coverage check.

API_DIR = ROOT / "docs" / "api"
PUBLIC_MODULES = ["optax_mtl"] + [
    name for name in MODULES if not any(part.startswith("_") for part in name.split("."))
]
_DIRECTIVE = re.compile(r"^\s*\.\. (?:py:)?(\w+)::\s*(\S+)?\s*$")
_OBJECT_DIRECTIVES = {"autofunction", "autoclass", "autodata", "autoexception", "autoattribute"}
_MODULE_DIRECTIVES = {"module", "automodule", "currentmodule"}


def api_entries():
  """``(modules, objects, summarized)`` of docs/api/*.rst, as qualified names.

  ``modules``: the modules a page declares (``.. module::``/``.. automodule::``); ``objects``:
  the names of ``.. autofunction::``/``.. autoclass::`` entries, resolved against the
  ``currentmodule``; ``summarized``: the names listed in ``.. autosummary::`` tables.
  """
  modules, objects, summarized = set(), {}, {}
  for page in sorted(API_DIR.glob("*.rst")):
    current, in_summary = None, False
    for line in page.read_text().splitlines():
      match = _DIRECTIVE.match(line)
      if in_summary and not match:
        entry = line.strip()
        if line[:1].isspace() or not entry:
          if entry and not entry.startswith(":"):
            summarized[f"{current}.{entry}"] = page.name
          continue
      in_summary = False
      if not match:
        continue
      directive, argument = match.groups()
      if directive in _MODULE_DIRECTIVES:
        current = argument
        if directive != "currentmodule":
          modules.add(argument)
      elif directive in _OBJECT_DIRECTIVES:
        assert current, f"{page.name}: {argument} comes before any currentmodule"
        objects[f"{current}.{argument}"] = page.name
      elif directive == "autosummary":
        in_summary = True
  return modules, objects, summarized


def public_names():
  """``{qualified name: object}`` of every public module's ``__all__``."""
  names = {}
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} is public and has no __all__"
    for name in module.__all__:
      names[f"{module_name}.{name}"] = getattr(module, name)
  return names


def test_public_modules_are_found():
  assert {"optax_mtl", "optax_mtl.weighting"} <= set(PUBLIC_MODULES)


def test_every_public_name_has_an_api_entry():
  modules, objects, _ = api_entries()
  missing = []
  for name, value in public_names().items():
    if inspect.ismodule(value):
      if value.__name__ not in modules:
        missing.append(f"{name} (a module: `.. automodule:: {value.__name__}` on its page)")
    elif name not in objects:
      missing.append(name)
  assert not missing, f"public names with no autofunction/autoclass entry in docs/api/*.rst: {missing}"


def test_every_api_entry_is_a_public_name():
  modules, objects, _ = api_entries()
  public = public_names()
  assert modules <= set(PUBLIC_MODULES), modules - set(PUBLIC_MODULES)
  stale = sorted(f"{name} ({page})" for name, page in objects.items() if name not in public)
  assert not stale, f"docs/api entries that are not in a public __all__: {stale}"


def test_every_api_entry_is_in_a_summary_table_of_its_page():
  _, objects, summarized = api_entries()
  assert summarized == objects


def test_every_api_page_is_in_the_index():
  index = (ROOT / "docs" / "index.md").read_text()
  pages = sorted(API_DIR.glob("*.rst"))
  assert pages
  for page in pages:
    assert re.search(rf"^api/{re.escape(page.stem)}$", index, flags=re.M), page.name


def test_package_ships_py_typed_and_the_license():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["optax_mtl"]
  assert (ROOT / "optax_mtl" / "py.typed").exists()
  assert pyproject["project"]["license"] == "Apache-2.0"
  license_text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
  """``sphinx-build -W --keep-going -b html docs``: no warning, and every public name rendered."""
  for module in ("sphinx", "myst_parser", "furo"):
    pytest.importorskip(module)
  html = tmp_path / "html"
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
             "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(html)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  assert (html / "index.html").exists()
  rendered = "".join((html / "api" / f"{page.stem}.html").read_text() for page in API_DIR.glob("*.rst"))
  _, objects, _ = api_entries()
  absent = [name for name in objects if f'id="{name}"' not in rendered]
  assert not absent, f"api entries with no rendered description: {absent}"
