"""Sphinx configuration of bcekit's documentation site (``python -m sphinx -W -n docs build/docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import bcekit  # noqa: E402  (the installed package: the site documents what users import)

project = "bcekit"
author = "the bcekit developers"
copyright = "2026, the bcekit developers"
release = version = bcekit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the site itself: no CDN, equations render offline
    "myst_parser",
    "bcekit_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# "--target" stays two hyphens (option names), not an en dash
smartquotes = False

# Broken references are errors (the build runs with -W -n); names from other projects cannot be resolved
# without fetching their inventories, which the build must not do, so only those are let through.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|numpy|np|jax|jaxlib|scipy|pyarrow|dask|distributed|argparse|collections|typing|types|math|pathlib)(\..*)?",
    ),
    (r"py:.*", r"(Tensor|ArrayLike|Any|Callable|Sequence|IO|NDArray|Array|ndarray|Module|dtype|Size)"),
    (r"py:.*", r"(Literal|Optional|Union|TypeVar|T|str|int|float|bool|None|tuple|list|dict|object)"),
]

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"bcekit {release}"
html_static_path = ["_static"]
html_css_files = ["bcekit.css"]
html_theme_options = {"navigation_with_keys": True}
