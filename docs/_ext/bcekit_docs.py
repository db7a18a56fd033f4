"""bcekit's own Sphinx extension: the command line's reference from its argparse definition, and the checks
that make a public name without a page entry, or a loss without its formula, a build error (under ``-W``).

* ``{bcekit-cli}`` (a directive, no arguments) renders every option of ``bcekit score`` from
  ``bcekit.cli._parser()``: the page cannot drift from what the command accepts.
* Every name in the ``__all__`` of :data:`PUBLIC_MODULES` must have an entry on some page, and a
  docstring.
* Every public loss (a name matching :data:`LOSS_NAME`) must carry its formula (``.. math::`` or
  ``:math:``) in its docstring.
"""

from __future__ import annotations

import argparse
import importlib
import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

PUBLIC_MODULES = ("bcekit", "bcekit.torch", "bcekit.numpy", "bcekit.jax")
NOT_ENTRIES = {"__version__"}  # data named in __all__ that the API page states in prose
LOSS_NAME = re.compile(r"cross_entropy|Loss$|focal")
_MATH = re.compile(r"\.\. math::|:math:`")


def _record_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Remember which documented objects have a docstring, and which of those give a formula."""
    text = "\n".join(lines)
    if text.strip():
        app.env.bcekit_docstrings = getattr(app.env, "bcekit_docstrings", set()) | {name}
    if _MATH.search(text):
        app.env.bcekit_math = getattr(app.env, "bcekit_math", set()) | {name}


def _check_public_names(app: Sphinx, env: BuildEnvironment) -> None:
    documented = set(env.get_domain("py").objects)
    with_docstring = getattr(env, "bcekit_docstrings", set())
    with_math = getattr(env, "bcekit_math", set())
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in NOT_ENTRIES:
                continue
            # a public name is documented where its module exports it, or where it is defined
            obj = getattr(module, name)
            homes = {f"{module_name}.{name}", f"{getattr(obj, '__module__', '')}.{name}"}
            if not homes & documented:
                logger.warning("public name %s.%s has no entry in the API reference", module_name, name)
            elif not homes & with_docstring:
                logger.warning("public name %s.%s has no docstring", module_name, name)
            elif LOSS_NAME.search(name) and not homes & with_math:
                logger.warning(
                    "public loss %s.%s: its docstring gives no formula (.. math::)", module_name, name
                )


def _merge(app: Sphinx, env: BuildEnvironment, docnames: Any, other: BuildEnvironment) -> None:
    for attribute in ("bcekit_docstrings", "bcekit_math"):
        setattr(env, attribute, getattr(env, attribute, set()) | getattr(other, attribute, set()))


class CommandLine(Directive):
    """The options of ``bcekit score``, one definition per option, from the parser itself."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from bcekit.cli import _parser

        parser = _parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sections: list[nodes.Node] = []
        for command, subparser in commands.choices.items():
            items = nodes.definition_list()
            for action in subparser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                items += self._entry(action)
            usage = subparser.format_usage().replace("usage: ", "", 1).strip()
            sections += [
                nodes.paragraph("", "", nodes.strong("", f"bcekit {command}")),
                nodes.literal_block(usage, usage, language="text"),
                nodes.paragraph("", subparser.description or ""),
                items,
            ]
        return sections

    @staticmethod
    def _entry(action: argparse.Action) -> nodes.definition_list_item:
        metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
        if action.nargs == 0:
            shown = ", ".join(action.option_strings)
        elif action.option_strings:
            values = f"{{{','.join(action.choices)}}}" if action.choices else metavar
            repeat = f" [{values} ...]" if action.nargs in ("+", "*") else ""
            shown = ", ".join(f"{option} {values}{repeat}" for option in action.option_strings)
        else:
            shown = f"{metavar} [{metavar} ...]" if action.nargs in ("+", "*") else metavar
        text = action.help or ""
        if action.required:
            text += " (required)"
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += f" (default: {action.default})"
        return nodes.definition_list_item(
            "",
            nodes.term("", "", nodes.literal(shown, shown)),
            nodes.definition("", nodes.paragraph(text, text)),
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("bcekit-cli", CommandLine)
    app.connect("autodoc-process-docstring", _record_docstring)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_public_names)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
