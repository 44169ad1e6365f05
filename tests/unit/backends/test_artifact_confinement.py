"""A variant's artifacts are read from inside its folder only, once, and checked against
the manifest's sha256 (backends/files.py, backends/repository.py); a bad manifest refuses
its own variant and no other.

Symbolic links are refused anywhere on an artifact's path, those that stay inside the
variant's folder too: the compiler writes none, and a link inside can be re-pointed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from backends.files import UnsafePath, confined_parts, private_copy, read_confined
from backends.repository import ArtifactEntry, Manifest, ManifestError, ModelRepository

MODEL = "m"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_variant(root: Path, name: str, files: dict[str, bytes], listed: list[str]) -> Path:
    """A variant folder holding `files`, its manifest listing `listed` with the sha256 of
    what `files` holds under that path (any bytes for a path it does not hold)."""
    directory = root / MODEL / "variants" / name
    directory.mkdir(parents=True)
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    manifest = Manifest(
        model=MODEL,
        variant=name,
        runtime="onnxruntime",
        runtime_version="1",
        target="cpu",
        precision="fp32",
        max_batch_size=0,
        inputs=[],
        outputs=[],
        artifacts=[ArtifactEntry(path=p, sha256=sha256(files.get(p, b""))) for p in listed],
        source_sha256="0" * 64,
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json())
    return directory


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "is empty"),
        ("/etc/passwd", "is absolute"),
        ("//model.onnx", "is absolute"),
        ("..", "'..'"),
        ("../other/model.onnx", "'..'"),
        ("weights/../../model.onnx", "'..'"),
        ("./model.onnx", "normal form"),
        ("weights//w.bin", "normal form"),
        ("weights/", "normal form"),
        ("weights\\w.bin", "backslash"),
        ("model\x00.onnx", "NUL"),
    ],
)
def test_paths_that_could_leave_the_folder_are_refused(path: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=why):
        confined_parts(path)


@pytest.mark.parametrize(
    ("path", "parts"),
    [("model.onnx", ("model.onnx",)), ("weights/w.bin", ("weights", "w.bin")), ("..x", ("..x",))],
)
def test_plain_relative_paths_are_taken(path: str, parts: tuple[str, ...]) -> None:
    assert confined_parts(path) == parts


@pytest.mark.parametrize("path", ["/tmp/model.onnx", "../ok/model.onnx", "a/../model.onnx"])
def test_a_manifest_naming_a_path_outside_its_folder_refuses_its_variant(
    tmp_path: Path, path: str
) -> None:
    directory = write_variant(tmp_path, "bad", {"model.onnx": b"m"}, [path])
    with pytest.raises(ManifestError, match="refused") as caught:
        ModelRepository(tmp_path).read_variant(MODEL, directory)
    message = str(caught.value)
    assert f"{MODEL}/bad" in message and repr(path) in message


def test_an_artifact_symlinked_out_of_its_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"elsewhere")
    directory = write_variant(tmp_path, "v", {"model.onnx": b"elsewhere"}, ["model.onnx"])
    (directory / "model.onnx").unlink()
    (directory / "model.onnx").symlink_to(outside)
    variant = ModelRepository(tmp_path).read_variant(MODEL, directory)
    # The hash matches what the link leads to: the link alone is the reason.
    with pytest.raises(ManifestError, match=r"m/v: artifact model.onnx refused: .*symbolic link"):
        variant.read_artifacts()


def test_a_symlink_inside_the_folder_is_refused_too(tmp_path: Path) -> None:
    directory = write_variant(
        tmp_path, "v", {"model.onnx": b"m", "real.bin": b"w"}, ["model.onnx", "w.bin"]
    )
    (directory / "w.bin").symlink_to("real.bin")
    variant = ModelRepository(tmp_path).read_variant(MODEL, directory)
    with pytest.raises(ManifestError, match=r"w.bin refused: it goes through a symbolic link"):
        variant.read_artifacts()


def test_a_symlinked_folder_on_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(b"w")
    directory = write_variant(tmp_path, "v", {"model.onnx": b"m"}, ["model.onnx"])
    (directory / "weights").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafePath, match="symbolic link \\('weights'\\)"):
        read_confined(directory, "weights/w.bin")
    (directory / "plain").write_bytes(b"")
    with pytest.raises(UnsafePath, match="'plain', which is not a folder"):
        read_confined(directory, "plain/w.bin")


def test_a_fifo_in_place_of_an_artifact_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = write_variant(tmp_path, "v", {}, ["model.onnx"])
    os.mkfifo(directory / "model.onnx")
    with pytest.raises(ManifestError, match="is not a regular file"):
        ModelRepository(tmp_path).read_variant(MODEL, directory).read_artifacts()


def test_a_symlinked_manifest_is_refused(tmp_path: Path) -> None:
    directory = write_variant(tmp_path, "v", {"model.onnx": b"m"}, ["model.onnx"])
    (directory / "manifest.json").rename(tmp_path / "manifest.json")
    (directory / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"m/v: manifest\.json refused: .*symbolic link"):
        ModelRepository(tmp_path).read_variant(MODEL, directory)


def test_verified_bytes_are_the_ones_read_and_a_mismatch_names_both_hashes(
    tmp_path: Path,
) -> None:
    files = {"model.onnx": b"model", "weights/w.bin": b"weights"}
    directory = write_variant(tmp_path, "v", files, list(files))
    variant = ModelRepository(tmp_path).read_variant(MODEL, directory)
    assert [(a.path, a.data) for a in variant.read_artifacts()] == list(files.items())
    (directory / "weights" / "w.bin").write_bytes(b"tampered")
    with pytest.raises(ManifestError) as caught:
        variant.read_artifacts()
    assert str(caught.value) == (
        f"m/v: artifact weights/w.bin has sha256 {sha256(b'tampered')}, "
        f"the manifest says {sha256(b'weights')}"
    )
    (directory / "weights" / "w.bin").unlink()
    with pytest.raises(ManifestError, match=r"m/v: artifact weights/w\.bin is missing"):
        variant.verify()


def test_a_bad_manifest_refuses_its_variant_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_variant(tmp_path, "a-good", {"model.onnx": b"m"}, ["model.onnx"])
    (write_variant(tmp_path, "b-json", {}, ["model.onnx"]) / "manifest.json").write_text("{")
    write_variant(tmp_path, "c-escapes", {}, ["../a-good/model.onnx"])
    unknown = write_variant(tmp_path, "d-unknown-key", {}, ["model.onnx"])
    manifest = json.loads((unknown / "manifest.json").read_text())
    (unknown / "manifest.json").write_text(json.dumps({**manifest, "extra": 1}))
    write_variant(tmp_path, "e-twice", {"model.onnx": b"m"}, ["model.onnx", "model.onnx"])
    (tmp_path / MODEL / "variants" / "f-empty").mkdir()
    repository = ModelRepository(tmp_path)
    scan = repository.scan(MODEL)
    assert [v.name for v in scan.variants] == ["a-good"]
    reasons = {r.name: r.reason for r in scan.refused}
    assert list(reasons) == ["b-json", "c-escapes", "d-unknown-key", "e-twice", "f-empty"]
    assert "invalid manifest.json" in reasons["b-json"]
    assert "'../a-good/model.onnx' refused: it has a '..' component" in reasons["c-escapes"]
    assert "extra" in reasons["d-unknown-key"]
    assert "listed twice" in reasons["e-twice"]
    assert reasons["f-empty"] == "m/f-empty: no manifest.json"
    with caplog.at_level(logging.WARNING, logger="switchyard.repository"):
        assert [v.name for v in repository.variants(MODEL)] == ["a-good"]
    refused_lines = [r.getMessage() for r in caplog.records]
    assert len(refused_lines) == 5
    assert refused_lines[1].startswith("model m: variant c-escapes refused: m/c-escapes:")


def test_a_private_copy_holds_the_bytes_for_this_user_alone_and_goes_away() -> None:
    with private_copy(b"library", suffix=".so") as path:
        assert path.read_bytes() == b"library" and path.suffix == ".so"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.exists() and not path.parent.exists()
