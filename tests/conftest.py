"""Shared fixtures: the demo model repository, built once per test session from code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends.compile.variants import build_ort_fp32
from backends.demo.echo import ECHO_TYPES, build_echo
from backends.demo.models import BUILDERS, NOT_BUILT, build, is_fresh_build
from backends.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository in a folder of the session's own: a copy of `make models`'
    when that is exactly what a build by this code makes now (its build record says so),
    else built here."""
    root = tmp_path_factory.mktemp("models")
    made = ROOT / "models"
    if is_fresh_build(made, list(BUILDERS)):
        shutil.copytree(made, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_BUILT))
    else:
        build(root)
    # FP16 has no typed-contents field, so typed requests need a model without it.
    build_echo(root / "echo_typed", tuple(t for t in ECHO_TYPES if t != "FP16"))
    build_ort_fp32(ModelRepository(root), "echo_typed")
    return root
