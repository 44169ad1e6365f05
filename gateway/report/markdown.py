"""Markdown tables, as every report and bench section writes them (the shop-around, the
load report, BENCHMARKS.md's sections).

Pure formatting: imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None
) -> str:
    """A Markdown table (lines joined by newlines, none at the end). `right` says per
    column whether it is right-aligned (figures); None: every column but the first."""
    if right is None:
        right = [index > 0 for index in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if r else "---" for r in right) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
