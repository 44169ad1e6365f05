"""The test suite: tests/unit (pure logic), tests/integration (real gRPC in one
process), tests/e2e (real processes and the CLI), each laid out as the source tree."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root."""
