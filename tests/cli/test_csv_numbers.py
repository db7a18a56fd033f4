"""The kernels' CSV number reader (``bcekit._native.parse_csv``) against pyarrow's text-to-float64 cast, which
``bcekit score`` uses for every CSV line the reader refuses: whatever the reader accepts must be what
pyarrow reads, to the bit; what pyarrow refuses, the reader must refuse. And a file whose later chunks are
refused gives the same result and the same errors as reading it all as text.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest

from bcekit import _native
from bcekit.cli import _sources

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason="the C++ kernels are not built")


def _reader(text: str) -> float | None:
    """The reader's value of one field (a one-column CSV line), or None where it refuses."""
    data = np.frombuffer((text + "\n").encode(), np.uint8)
    values = _native.parse_csv(data, 1, [0], 1)
    return None if values is None else float(values[0, 0])


def _pyarrow(text: str) -> float | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(pa.array([text]), pa.float64())[0].as_py()
    except pa.ArrowInvalid:
        return None


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def _check(texts: list[str]) -> int:
    accepted = 0
    for text in texts:
        ours, theirs = _reader(text), _pyarrow(text)
        if ours is None:
            continue
        accepted += 1
        assert theirs is not None, f"{text!r}: the reader took {ours!r}, pyarrow refuses it"
        assert _same(ours, theirs), f"{text!r}: reader {ours!r}, pyarrow {theirs!r}"
    return accepted


FORMS = [
    "0",
    "1",
    "-0",
    "+1",
    "00012",
    "1.",
    ".5",
    "-.5",
    "1e5",
    "1E-5",
    "1e+05",
    "-1.5e-3",
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-Inf",
    "+inf",
    "infinity",
    "-INFINITY",
    "1e400",
    "-1e400",
    "1e-400",
    "4.9e-324",
    "5e-324",
    "2.2250738585072011e-308",
    "2.2250738585072014e-308",
    "1.7976931348623157e308",
    "1.7976931348623159e308",
    "9007199254740993",
    "9007199254740992.5",
    "9007199254740993.0000000001",
    "18014398509481985",
    "1.00000000000000011102230246251565404236316680908203125",
    "0.1000000000000000055511151231257827",
    "123456789012345678901234567890",
    "0.000000000000000000000000000001234",
    "1e22",
    "1e23",
    "1e-22",
    "1e-23",
    "12345678901234567890e-20",
    "1234567890123456789e-22",
    "9999999999999999999",
    "0.3",
    "3e-1",
    "",
    "-",
    "+",
    ".",
    "e5",
    "1e",
    "1e+",
    "1.5.1",
    "--1",
    "+-1",
    "-+1",
    "0x10",
    "1_000",
    "1,5",
    "abc",
    "nana",
    "infinit",
    "in",
    "1d5",
    "1e5.5",
    "١",
]


def test_forms() -> None:
    assert _check(FORMS) > 40


def test_random_round_trips_and_lengths() -> None:
    rng = random.Random(7)
    texts = []
    for _ in range(3000):
        value = rng.choice([rng.gauss(0, 3), rng.random(), 10 ** rng.uniform(-30, 30), rng.getrandbits(64)])
        texts += [repr(float(value)), f"{value:.{rng.randint(1, 25)}g}", f"{value:.{rng.randint(0, 22)}f}"]
    for _ in range(2000):  # digit strings of every length, with a point and an exponent anywhere
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 24)))
        cut = rng.randint(0, len(digits))
        texts.append(f"{rng.choice(['', '-'])}{digits[:cut]}.{digits[cut:]}e{rng.randint(-40, 40)}")
    assert _check(texts) > 8000


def test_midpoints_between_doubles() -> None:
    """Decimal strings at and within a hair of the midpoint between two neighbouring doubles, with 17 to
    22 significant digits: where a rounding that is not exact gives the wrong neighbour."""
    getcontext().prec = 60
    rng = random.Random(11)
    texts = []
    for _ in range(1500):
        x = rng.choice([rng.gauss(0, 3), rng.random(), 10 ** rng.uniform(-20, 20)])
        middle = (Fraction(x) + Fraction(np.nextafter(x, math.inf))) / 2
        exact = Decimal(middle.numerator) / Decimal(middle.denominator)
        for digits in (17, 18, 19, 20, 22):
            texts.append(f"{exact:.{digits}e}")
        texts.append(format(exact, "f"))
    assert _check(texts) > 3000


@pytest.mark.parametrize(
    ("text", "fields", "slots", "read"),
    [
        ("1,2\n3,4\n", 2, [0, 1], True),
        ("1,2\r\n3,4\r\n", 2, [0, 1], True),
        ("1,2\n3,4", 2, [0, 1], True),  # no line end at the end
        ("1,x y\n3,\n", 2, [0, -1], True),  # fields not read may hold anything but quotes and line ends
        ('1,"a,b"\n', 2, [0, -1], False),
        ('"1",2\n', 2, [0, 1], False),
        ("1, 2\n", 2, [0, 1], False),
        ("1,2 \n", 2, [0, 1], False),
        ("1\t,2\n", 2, [0, 1], False),
        ("1,2,3\n", 2, [0, 1], False),
        ("1\n", 2, [0, 1], False),
        ("1,2\n\n", 2, [0, 1], False),  # a blank line is a row of empty fields: pyarrow's business
        ("1,\n", 2, [0, 1], False),
        ("1,2\r3,4\n", 2, [0, 1], False),  # a lone \r ends a line for pyarrow
    ],
)
def test_lines(text: str, fields: int, slots: list[int], read: bool) -> None:
    values = _native.parse_csv(np.frombuffer(text.encode(), np.uint8), fields, slots, 2)
    assert (values is not None) == read
    if read:
        assert values[0].tolist() == [1.0, 3.0][: values.shape[1]]


def _score_json(run, *argv):
    code, out, err = run(*argv, "--format", "json", "--progress", "never")
    return code, out, err


@pytest.mark.parametrize("bad_at", [None, 2_500, 9_000])
def test_refused_chunk_midway_reads_on_as_text(tmp_path, write, run, monkeypatch, bad_at):
    """Small chunks, so the reader takes some before it refuses one (a quoted value; with bad_at, a word
    too): the result, or the error and its row, are those of reading the whole file as text."""
    rng = np.random.default_rng(3)
    n = 12_000
    x = rng.normal(0.0, 3.0, n)
    columns = {
        "z": x.astype(object),
        "y": (rng.random(n) < 0.5).astype(float),
        "w": rng.uniform(0.5, 2, n).astype(object),
    }
    columns["z"][7_000] = f'"{float(x[7_000])!r}"'  # quoted: refused by the reader, fine for pyarrow
    if bad_at is not None:
        columns["w"][bad_at] = "heavy"

    def field(value: object) -> str:
        return value if isinstance(value, str) else repr(float(value))

    lines = ["z,y,w"] + [",".join(field(columns[c][i]) for c in "zyw") for i in range(n)]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(lines) + "\n")
    argv = ["score", path, "--target", "y", "--pred", "z", "--logits", "--weight", "w"]
    monkeypatch.setattr(_sources, "CSV_CHUNK_BYTES", 4096)
    mixed = _score_json(run, *argv, "--batch-rows", "1000")
    monkeypatch.setattr(_sources, "_csv_numbers", lambda piece: _sources._csv_text(piece))
    text = _score_json(run, *argv, "--batch-rows", "1000")
    assert mixed == text
    if bad_at is None:
        assert mixed[0] == 0
    else:
        assert mixed[0] == 2 and f"row {bad_at + 1}:" in mixed[2]
