"""BENCHMARKS.md's marked sections: each benchmark command rewrites its own where it
stands, leaving the others and their order as they were."""

from __future__ import annotations

from pathlib import Path

from gateway.bench.report import with_section, write_section

TEXT = """# Benchmarks

<!-- a: written by one -->
old a
<!-- /a -->

<!-- b: written by another -->
old b
<!-- /b -->
"""


def test_a_section_is_rewritten_where_it_stands() -> None:
    text = with_section(TEXT, "new a\n", "<!-- a: written by one -->", "<!-- /a -->")
    assert "old a" not in text
    assert text.index("new a") < text.index("old b")
    assert text == TEXT.replace("old a", "new a")


def test_a_missing_section_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(TEXT)
    write_section(path, "c", "<!-- c: written by a third -->", "<!-- /c -->")
    text = path.read_text()
    assert text.startswith(TEXT.rstrip())
    assert text.endswith("<!-- c: written by a third -->\nc\n<!-- /c -->\n")
