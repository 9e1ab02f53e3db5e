"""Sphinx configuration of the optax_mtl documentation.

Build (offline: no intersphinx, nothing is fetched)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

``tests/test_docs.py`` checks that every public name has an entry in ``docs/api/`` and, in the
slow tier, runs this build with ``-W``.
"""

import os
import re
import sys

from sphinx.util.matching import patfilter

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # this checkout's package, installed or not

import optax_mtl  # noqa: E402  (after the path set-up)

# -- Project -------------------------------------------------------------------------------------

project = "optax_mtl"
author = "The optax_mtl Authors"
copyright = "2026, The optax_mtl Authors"  # noqa: A001  (Sphinx's name)
release = optax_mtl.__version__
version = release

# -- General ---------------------------------------------------------------------------------------

extensions = [
    "myst_parser",  # the .md pages (guides, methods, benchmarks)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the sources' Google-style docstrings (Args:, Returns:, Attributes:)
    "sphinx.ext.mathjax",  # :math: in the docstrings, $...$ in the pages
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

# Unresolved cross-references are not errors: the docstrings refer to optax and jax objects that
# are not documented here, and there is no intersphinx (the build must work offline).
nitpicky = False

# -- API reference (docs/api/*.rst) ----------------------------------------------------------------

# The api pages hold plain autosummary tables (no :toctree:, so nothing is generated) linking to
# the autofunction/autoclass entries below them, as optax's pages do.
autosummary_generate = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # defaults as written (``key=0``), not their repr
add_module_names = False  # "nash_mtl(num_tasks, ...)" rather than "optax_mtl.nash_mtl(...)"
python_use_unqualified_type_names = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become attribute entries of their class (linkable, in the page's
# contents), described by the docstring alone: the field annotations are in the class signature
# already, and napoleon would print their resolved private paths (jax.jaxlib._jax.Array).
napoleon_use_ivar = False
napoleon_attr_annotations = False
napoleon_use_rtype = False

# -- MyST ------------------------------------------------------------------------------------------

myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
]
myst_heading_anchors = 3  # GitHub-style #section links inside and between pages

# -- HTML ------------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"optax_mtl {release}"
html_static_path = []


# -- The landing page's toctrees -------------------------------------------------------------------


_GLOB = re.compile(r"[*?\[]")  # what makes a toctree entry a glob pattern, as in Sphinx


def _drop_empty_globs(app, docname, source):
  """Drops the root page's toctree glob entries that match no page yet.

  The guides, method and benchmark pages are picked up by glob so that a new page needs no
  edit of index.md; Sphinx warns (an error under -W) on a glob that matches nothing, so a
  section with no page yet is left out until its first page appears.
  """
  if docname != root_doc:
    return
  others = app.env.found_docs - {docname}
  lines, in_toctree = [], False
  for line in source[0].splitlines():
    entry = line.strip()
    if entry.startswith("```{toctree}"):
      in_toctree = True
    elif in_toctree and entry.startswith("```"):
      in_toctree = False
    elif in_toctree and entry and not entry.startswith(":") and _GLOB.search(entry):
      if not patfilter(others, entry):
        continue
    lines.append(line)
  source[0] = "\n".join(lines) + "\n"


def _results_are_orphans(app, docname, source):
  """Marks the tables under results/ as pages outside every toctree.

  examples/mtl_benchmark.py writes them (docs/results/*.md, untitled fragments): a page links to
  one, or pulls it in with MyST's ``{include}``, without a warning that it is in no toctree.
  """
  if docname.startswith("results/"):
    source[0] = "---\norphan: true\n---\n" + source[0]


def setup(app):
  app.connect("source-read", _drop_empty_globs)
  app.connect("source-read", _results_are_orphans)
