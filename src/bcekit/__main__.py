"""``python -m bcekit``: the ``bcekit`` command (see :mod:`bcekit.cli`)."""

from bcekit.cli import run

run()
