"""The demo build's record: a repository counts as a fresh build of this code only while
every file it wrote is as written, no file was added, and it holds the models asked for
(the tests' session repository copies `make models`' only then)."""

from __future__ import annotations

import json
from pathlib import Path

from backends.demo.models import BUILD_RECORD, is_fresh_build, record_build, source_digest


def built(root: Path) -> Path:
    (root / "digits" / "variants" / "ort-cpu-fp32").mkdir(parents=True)
    (root / "digits" / "variants" / "ort-cpu-fp32" / "model.onnx").write_bytes(b"onnx")
    (root / "digits" / "samples.npz").write_bytes(b"npz")
    record_build(root, ["digits"])
    return root


def test_a_repository_as_built_is_fresh(tmp_path: Path) -> None:
    root = built(tmp_path)
    assert is_fresh_build(root, ["digits"])
    (root / ".built").touch()  # make's stamp, written after the record
    assert is_fresh_build(root, ["digits"])
    assert json.loads((root / BUILD_RECORD).read_text())["source"] == source_digest()


def test_a_changed_added_or_missing_file_is_not_fresh(tmp_path: Path) -> None:
    root = built(tmp_path / "a")
    (root / "digits" / "samples.npz").write_bytes(b"edited")
    assert not is_fresh_build(root, ["digits"])

    root = built(tmp_path / "b")
    tvm = root / "digits" / "variants" / "tvm-llvm-avx2-fp32"
    tvm.mkdir()
    (tvm / "model.so").write_bytes(b"so")  # `make models-tvm` added a variant
    assert not is_fresh_build(root, ["digits"])

    root = built(tmp_path / "c")
    (root / "digits" / "samples.npz").unlink()
    assert not is_fresh_build(root, ["digits"])


def test_other_models_another_build_or_no_record_is_not_fresh(tmp_path: Path) -> None:
    root = built(tmp_path / "a")
    assert not is_fresh_build(root, ["digits", "cnn"])

    record = json.loads((root / BUILD_RECORD).read_text())
    record["source"] = "0" * 64  # built by other code or other library versions
    (root / BUILD_RECORD).write_text(json.dumps(record))
    assert not is_fresh_build(root, ["digits"])

    (root / BUILD_RECORD).write_text("not json")
    assert not is_fresh_build(root, ["digits"])
    assert not is_fresh_build(tmp_path / "nothing-here", ["digits"])
