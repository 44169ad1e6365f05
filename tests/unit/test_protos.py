"""The committed protobuf code matches a fresh generation from protos/*.proto."""

from protos.generate import stale_files


def test_generated_code_is_up_to_date() -> None:
    assert stale_files() == [], "run `make protos` and commit the result"
