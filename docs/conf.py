"""Sphinx configuration of the gradconflict docs: the Markdown pages (MyST) and the API reference generated from
the docstrings (autodoc + napoleon for their Google-style sections).

Build (what CI runs; any warning fails it): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import gradconflict

project = "gradconflict"
author = "the gradconflict authors"
release = version = gradconflict.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings get anchors, so pages can link to a section (`monitor.md#the-history`).
myst_heading_anchors = 3

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"gradconflict {release}"
