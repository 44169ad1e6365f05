"""`python -m backends.demo` records a build into an empty folder, and only there: one
over an earlier repository may leave other files among its own."""

from __future__ import annotations

from pathlib import Path

from backends.demo.models import BUILD_RECORD, is_fresh_build, main


def test_a_build_into_an_empty_folder_is_recorded_and_one_over_it_is_not(tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert main(["--repository", str(root), "digits"]) == 0
    assert is_fresh_build(root, ["digits"])

    extra = root / "digits" / "variants" / "tvm-llvm-avx2-fp32"
    extra.mkdir()
    (extra / "model.so").write_bytes(b"so")
    assert not is_fresh_build(root, ["digits"])
    assert main(["--repository", str(root), "digits"]) == 0  # over it: the extra file stays
    assert not (root / BUILD_RECORD).exists()
    assert not is_fresh_build(root, ["digits"])
