"""``tools/dd_tables.py``: the committed double-double tables are what the generator writes from mpmath, and
each entry is the exact value to double-double precision."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mpmath

TOOL = Path(__file__).resolve().parents[2] / "tools" / "dd_tables.py"


def _tool():
    spec = importlib.util.spec_from_file_location("dd_tables", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_header_is_the_generators_output() -> None:
    tool = _tool()
    assert tool.HEADER.read_text() == tool.render()


def _table(text: str, name: str) -> list[float]:
    body = text.split(f"{name}[")[1].split("{", 1)[1].split("}", 1)[0]
    return [float.fromhex(v.strip()) for v in body.split(",") if v.strip()]


def test_entries_are_the_exact_values() -> None:
    text = _tool().HEADER.read_text()
    mp = mpmath.MPContext()
    mp.prec = 300
    tables = {
        "EXP2_NEG": lambda j, n: mp.power(2, -mp.mpf(j) / n),
        "POW10_NEG": lambda k, n: mp.mpf(10) ** -k,
    }
    for name, exact_of in tables.items():
        his, los = _table(text, f"{name}_HI"), _table(text, f"{name}_LO")
        assert len(his) == len(los) > 20
        for j, (hi, lo) in enumerate(zip(his, los, strict=True)):
            exact = exact_of(j, len(his))
            assert abs(mp.mpf(hi) + mp.mpf(lo) - exact) <= exact * mp.mpf(2) ** -106, (name, j)
            assert abs(lo) <= abs(hi) * 2.0**-53
