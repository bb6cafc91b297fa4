"""Running the CLI in-process from tests."""

from __future__ import annotations

from dtop_export.cli import main


def cli(*argv: str) -> int:
    """Run ``dtop-export ARGV`` in-process; returns its exit code (what ``main`` would exit with)."""
    try:
        main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return 0
