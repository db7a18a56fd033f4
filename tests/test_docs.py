"""The documentation: the site builds without a warning, and every code block in it is run or checked.

* ``python`` blocks run as written, from the repository root (a reader copies them first).
* ``console`` blocks show ``$ bcekit ...`` commands and what they print: each command runs and its output
  must be the one shown.
* ``bash`` blocks hold set-up and tool commands. Each command is checked against what it names: a
  requirement file or extra that exists, a benchmark or tool whose own argument parser accepts the
  arguments (parsed, not run: benchmarks take minutes), a script that exists; ``bcekit`` commands run.
  A command of a form this file does not know fails the test, so a new kind of block gets a check.
* The docstring examples (``>>>``) of every object an API page documents run as doctests.

The pages are ``docs/**/*.md``, ``CONTRIBUTING.md`` and ``benchmarks/README.md``, plus the shell blocks of
``README.md`` (whose Python snippets ``test_readme.py`` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from _chdir import chdir

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(
    r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence) *$", re.S | re.M
)
CHECKED_LANGUAGES = {"python", "console", "bash"}


def _blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block, MyST directives (``{toctree}``, ...) left out."""
    blocks = []
    for match in FENCE.finditer(page.read_text(encoding="utf-8")):
        language = match["info"].strip()
        if language.startswith("{"):
            continue
        indent = len(match["indent"])
        code = "".join(line[indent:] for line in match["body"].splitlines(keepends=True))
        blocks.append((language, code))
    return blocks


def _cases(pages: list[Path], languages: set[str]) -> list:
    return [
        pytest.param(language, code, id=f"{page.relative_to(ROOT)}:{index}")
        for page in pages
        for index, (language, code) in enumerate(_blocks(page))
        if language in languages
    ]


def test_every_block_says_its_language() -> None:
    unchecked = [
        f"{page.relative_to(ROOT)}: ```{language or '(none)'}"
        for page in PAGES
        for language, _ in _blocks(page)
        if language not in CHECKED_LANGUAGES
    ]
    assert not unchecked, f"code blocks this test neither runs nor checks: {unchecked}"


def test_the_pages_have_blocks() -> None:
    languages = {language for page in PAGES for language, _ in _blocks(page)}
    assert languages == CHECKED_LANGUAGES


@pytest.mark.parametrize(("language", "code"), _cases(PAGES, {"python"}))
def test_python_block_runs(language: str, code: str) -> None:
    with chdir(ROOT):
        exec(compile(code, "docs block", "exec"), {"__name__": "__docs__"})


def _run_bcekit(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    from bcekit.cli import main

    if "--plot" in argv:  # the picture goes to the test's folder, not the checkout
        at = argv.index("--plot") + 1
        argv = [*argv[:at], str(tmp_path / Path(argv[at]).name), *argv[at + 1 :]]
    stdout, stderr = io.StringIO(), io.StringIO()
    with chdir(ROOT):
        status = main(argv, stdout=stdout, stderr=stderr)
    return status, stdout.getvalue() + stderr.getvalue()


@pytest.mark.parametrize(("language", "code"), _cases([*PAGES, ROOT / "README.md"], {"console"}))
def test_console_block_prints_what_it_shows(language: str, code: str, tmp_path: Path) -> None:
    sessions = re.split(r"^\$ ", code, flags=re.M)
    assert sessions[0] == "" and len(sessions) > 1, "a console block starts with a '$ ' command"
    for session in sessions[1:]:
        command, _, shown = session.partition("\n")
        argv = shlex.split(command)
        assert argv[0] == "bcekit", f"console blocks show bcekit commands: {command}"
        status, printed = _run_bcekit(argv[1:], tmp_path)
        assert [line.rstrip() for line in printed.strip().splitlines()] == [
            line.rstrip() for line in shown.strip().splitlines()
        ], f"{command}: exit status {status}"


class _Parsed(Exception):
    """Raised in place of running a script once its argument parser has accepted the arguments."""


@contextlib.contextmanager
def _parse_only(argv: list[str]) -> Iterator[None]:
    original = argparse.ArgumentParser.parse_args

    def parse_args(parser, args=None, namespace=None):
        original(parser, args, namespace)  # exits with status 2 on arguments it does not accept
        raise _Parsed

    saved_argv = sys.argv
    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = argv
    try:
        with chdir(ROOT), pytest.raises(_Parsed):
            yield
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv


def _extras() -> set[str]:
    """The extras pyproject.toml declares (tomllib is Python >= 3.11; the table is simple enough to read)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z][a-z0-9_-]*) *=", table, re.M))


def _check_pip(arguments: list[str]) -> None:
    extras = _extras()
    arguments = list(arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument in ("-r", "--requirement"):
            assert (ROOT / arguments.pop(0)).is_file()
        elif argument == "-e":
            assert arguments.pop(0) == "."
        elif argument.startswith("-"):
            assert argument in ("--no-build-isolation", "--no-deps", "-q") or argument.startswith("-C"), (
                argument
            )
        else:
            match = re.fullmatch(r"\.(?:\[(?P<extras>[a-z,]+)\])?", argument)
            assert match, f"pip installs this checkout or its extras: {argument}"
            for extra in (match["extras"] or "").split(","):
                assert not extra or extra in extras, f"no extra {extra!r} in pyproject.toml"


def _check_command(argv: list[str], tmp_path: Path) -> None:
    program, arguments = argv[0], argv[1:]
    if program == "pip":
        assert arguments[0] == "install"
        _check_pip(arguments[1:])
    elif program in ("python", "python3") and arguments[:2] == ["-m", "venv"]:
        assert arguments[2:] == [".venv"]
    elif program in ("python", "python3") and arguments[:2] == ["-m", "pytest"]:
        for path in arguments[2:]:
            assert path.startswith("-") or (ROOT / path.split("::")[0]).exists(), path
    elif program in ("python", "python3") and arguments[:2] == ["-m", "sphinx"]:
        assert "-W" in arguments and "docs" in arguments, "the docs are built with warnings as errors"
    elif program in ("python", "python3") and arguments[0] == "-m":
        module = arguments[1]
        assert module.startswith("benchmarks."), module
        with _parse_only([module, *arguments[2:]]):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif program in ("python", "python3"):
        script = ROOT / arguments[0]
        assert script.is_file() and script.parts[-2] == "tools", arguments[0]
        with _parse_only([str(script), *arguments[1:]]):
            runpy.run_path(str(script), run_name="__main__")
    elif program == "." and arguments == [".venv/bin/activate"]:
        pass
    elif program == "bash":
        assert arguments == [".ci/run"] and (ROOT / ".ci" / "run").is_file()
    elif program == "tools/sanitize.sh":
        assert os.access(ROOT / program, os.X_OK)
        assert all(a.startswith("-") or (ROOT / a).exists() for a in arguments), arguments
    elif program == "bcekit":
        status, printed = _run_bcekit(arguments, tmp_path)
        assert status == 0, printed
    else:
        pytest.fail(f"a command test_docs.py does not know how to check: {shlex.join(argv)}")


@pytest.mark.parametrize(("language", "code"), _cases([*PAGES, ROOT / "README.md"], {"bash"}))
def test_shell_block_names_what_exists(language: str, code: str, tmp_path: Path) -> None:
    for line in code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for command in line.split(" && "):
            _check_command(shlex.split(command), tmp_path)


def _documented_objects() -> list[str]:
    names = []
    for page in sorted(DOCS.rglob("*.md")) + sorted(DOCS.rglob("*.rst")):
        text = page.read_text(encoding="utf-8")
        # (an autodata entry shows the comment beside the value, not the docstring of the value's type)
        names += re.findall(r"^\s*\.\. auto(?:module|function|class|exception):: (\S+)", text, re.M)
    return sorted(set(names))


def _resolve(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        module, _, attribute = name.rpartition(".")
        return getattr(importlib.import_module(module), attribute)


def test_the_api_pages_document_objects() -> None:
    assert {"bcekit.torch.BCEWithLogitsLoss", "bcekit.numpy.binary_cross_entropy"} <= set(
        _documented_objects()
    )


@pytest.mark.parametrize("name", _documented_objects())
def test_docstring_examples_on_the_pages_run(name: str) -> None:
    obj = _resolve(name)
    # a module page shows the module's docstring only; a class page its methods' docstrings too
    finder = doctest.DocTestFinder(recurse=not isinstance(obj, type(os)))
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    # examples see the globals of the module that defines the object, as doctest.testmod gives them
    module = obj if isinstance(obj, type(os)) else sys.modules[obj.__module__]
    for test in finder.find(obj, name, globs=dict(vars(module))):
        runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} docstring example(s) failed"


@contextlib.contextmanager
def _quiet(log: io.StringIO) -> Iterator[None]:
    """Sphinx's messages into ``log``; its and its extensions' deprecation warnings out of the report."""
    with (
        contextlib.redirect_stderr(log),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    """The whole site, with warnings (broken references, missing entries, losses without formulas) as
    errors, as CI builds it."""
    sphinx = pytest.importorskip("sphinx.cmd.build")
    log = io.StringIO()
    with _quiet(log):
        status = sphinx.build_main(
            ["-W", "-n", "--keep-going", "-q", "-E", "-b", "html", str(DOCS), str(tmp_path)]
        )
    assert status == 0, log.getvalue()
    assert (tmp_path / "_static" / "mathjax" / "tex-chtml.js").is_file()  # equations render offline


def test_a_public_name_without_an_entry_fails_the_build(tmp_path: Path) -> None:
    """The check that keeps the API reference complete: a page set that leaves one public name out
    does not build."""
    sphinx = pytest.importorskip("sphinx.cmd.build")
    pages = tmp_path / "docs"
    pages.mkdir()
    conf = (
        (DOCS / "conf.py")
        .read_text(encoding="utf-8")
        .replace('Path(__file__).parent / "_ext"', repr(str(DOCS / "_ext")))
    )
    (pages / "conf.py").write_text(conf.replace('html_static_path = ["_static"]', "html_static_path = []"))
    torch_page = (DOCS / "api" / "torch.rst").read_text(encoding="utf-8")
    assert ".. autofunction:: bcekit.torch.linear_topk\n" in torch_page
    body = torch_page.replace(".. autofunction:: bcekit.torch.linear_topk\n", "")
    body = re.sub(r"See :doc:`[^`]+` for [^\n]*\n", "", body)
    for name in ("numpy", "jax", "package"):
        body += "\n" + (DOCS / "api" / f"{name}.rst").read_text(encoding="utf-8").replace(
            ":doc:`../performance`", "the docs"
        )
    (pages / "index.rst").write_text(body)
    log = io.StringIO()
    with _quiet(log):
        status = sphinx.build_main(["-W", "-n", "-q", "-E", "-b", "html", str(pages), str(tmp_path / "out")])
    assert status != 0
    assert "public name bcekit.torch.linear_topk has no entry" in log.getvalue()


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "benchmarks/README.md"])
def test_links_outside_the_site_lead_somewhere(page: str) -> None:
    """The Markdown pages read on the repository's front page (not built by Sphinx) link to files that
    exist and to headings they have."""
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page != "README.md"
    for link in links:
        target, _, anchor = link.partition("#")
        if re.match(r"[a-z]+://", target):
            continue
        linked = path.parent / target if target else path
        assert linked.exists(), f"{page}: {link} leads to no file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
            assert anchor in {_github_anchor(h) for h in headings}, f"{page}: no heading for #{anchor}"
