"""Shared fixtures: the demo model repository, built once per test session from code."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.compile.variants import build_ort_fp32
from backends.demo.echo import ECHO_TYPES, build_echo
from backends.demo.models import build
from backends.repository import ModelRepository


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build(root)
    # FP16 has no typed-contents field, so typed requests need a model without it.
    build_echo(root / "echo_typed", tuple(t for t in ECHO_TYPES if t != "FP16"))
    build_ort_fp32(ModelRepository(root), "echo_typed")
    return root
