"""The README's Python snippets run as written (a stranger copies them first)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from _chdir import chdir

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int) -> None:
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})


def test_setup_command_scores_the_example(tmp_path: Path) -> None:
    """Set-up command 1's `bcekit score ...` runs on the committed example and prints bcekit.numpy's loss."""
    import io
    import json
    import shlex

    import numpy as np
    import pyarrow.parquet as pq

    import bcekit.numpy as bce
    from bcekit.cli import main

    text = README.read_text(encoding="utf-8")
    setup = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", text, re.S)
    assert setup is not None
    command = next(line for line in setup.group(1).splitlines() if line.startswith("python3"))
    argv = shlex.split(command.split("&& bcekit ", 1)[1])
    plot = argv.index("--plot")
    argv[plot + 1] = str(tmp_path / argv[plot + 1])
    stdout, stderr = io.StringIO(), io.StringIO()
    with chdir(README.parent):
        assert main([*argv, "--format", "json"], stdout=stdout, stderr=stderr) == 0, stderr.getvalue()
        table = pq.read_table(argv[1])
    result = json.loads(stdout.getvalue())
    targets = argv[argv.index("--target") + 1 : argv.index("--pred")]
    predictions = argv[argv.index("--pred") + 1 : argv.index("--logits")]
    x = np.column_stack([table.column(c).to_numpy() for c in predictions])
    y = np.column_stack([table.column(c).to_numpy() for c in targets])
    expected = float(bce.binary_cross_entropy_with_logits(x, y))
    assert result["rows"] == table.num_rows == 569
    assert abs(result["loss"] - expected) <= 1e-12 * expected
    assert os.path.getsize(tmp_path / "calibration.png") > 10_000
