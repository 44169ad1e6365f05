"""The state store: the file round-trips every kind of change (the carbon figures in
a file of their own beside it, which a reader of the state alone never sees), is
replaced whole, and a corrupt or unreadable one is logged and set aside, never
trusted."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from backends.files import write_atomically
from backends.protocol.errors import Unavailable
from gateway.config import GatewaySettings, PoliciesSettings, PolicySettings
from gateway.control.state import (
    CarbonFigures,
    ControlState,
    FileStateStore,
    PoliciesOverride,
    PriceOverride,
    decode_carbon,
    decode_state,
    encode_carbon,
    encode_state,
    state_path,
)

FULL = ControlState(
    prices={
        "cheap": PriceOverride(0.5, 0.04, 1_700_000_000.25),
        "dear": PriceOverride(0.0, 0.08, 1_700_000_100.0),
    },
    policies=PoliciesOverride(
        PoliciesSettings(
            default=PolicySettings(latency_ms=50, percentile=95, objective="carbon"),
            classes={"gold": PolicySettings(latency_ms=10, hedge=True)},
            models={"digits": PolicySettings(max_cost_usd_per_1m=2.5, retries=0)},
        ),
        PoliciesSettings(),
    ),
    drained=frozenset({"dear"}),
    routing="round-robin",
    schedule_start_s=1_699_999_000.5,
)


def test_every_kind_of_change_round_trips_through_the_file(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path / "state.json")
    assert store.load() == ControlState()
    store.save(FULL)
    assert store.load() == FULL
    assert FileStateStore(tmp_path / "state.json").load() == FULL
    store.save(ControlState())
    assert store.load() == ControlState()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_save_creates_the_folder_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "switchyard" / "state.json"
    FileStateStore(path).save(FULL)
    assert decode_state(path.read_text(), str(path)) == FULL
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    FileStateStore(path).save(FULL)
    before = path.read_bytes()

    def half(partial: Path) -> None:
        partial.write_text(encode_state(ControlState())[:10])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half)
    assert path.read_bytes() == before
    assert FileStateStore(path).load() == FULL


def test_a_store_that_cannot_be_written_is_unavailable_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    store = FileStateStore(blocker / "state.json")
    with pytest.raises(Unavailable, match=r"state file .*not-a-folder/state\.json"):
        store.save(FULL)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe\x00binary", "not UTF-8"),
        (b'{"version": 1, "prices": {', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"version": 7}', "format version 7"),
        (b'{"version": 1, "routing": 3, "bogus": true}', "bogus"),
        (
            b'{"version": 1, "prices": {"a": {"usd_per_hour": NaN, '
            b'"fleet_usd_per_hour": 1, "set_at_s": 0}}}',
            "NaN is not a number",
        ),
        (
            b'{"version": 1, "prices": {"a": {"usd_per_hour": 1e999, '
            b'"fleet_usd_per_hour": 1, "set_at_s": 0}}}',
            "finite number",
        ),
        (
            b'{"version": 1, "prices": {"a": {"usd_per_hour": -1, '
            b'"fleet_usd_per_hour": 1, "set_at_s": 0}}}',
            "greater than or equal to 0",
        ),
    ],
)
def test_a_corrupt_file_is_logged_moved_aside_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    caplog.set_level(logging.ERROR, logger="switchyard.control")
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = FileStateStore(path)
    assert store.load() == ControlState()
    assert not path.exists()
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    assert "state file not valid, starting from the fleet file" in caplog.text
    assert reason in caplog.text
    # The first change writes a fresh file; the corrupt one stays aside.
    store.save(FULL)
    assert store.load() == FULL
    assert (tmp_path / "state.json.corrupt").read_bytes() == content


def test_an_unreadable_file_is_logged_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="switchyard.control")
    path = tmp_path / "state.json"
    path.mkdir()  # reading it fails as an unreadable file would, whoever runs the test
    assert FileStateStore(path).load() == ControlState()
    assert path.is_dir()
    assert f"cannot read state file {path}, starting from the fleet file" in caplog.text


def test_the_state_file_defaults_to_beside_the_admin_token_file(tmp_path: Path) -> None:
    token = tmp_path / "secrets" / "admin-token"
    assert state_path(GatewaySettings()) is None
    assert state_path(GatewaySettings(admin_token_file=token)) == token.parent / "state.json"
    chosen = tmp_path / "elsewhere.json"
    assert state_path(GatewaySettings(admin_token_file=token, state_file=chosen)) == chosen


def test_the_file_is_synced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partial file, then the folder, are fsynced: what the rename publishes is on
    disk."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    FileStateStore(tmp_path / "state.json").save(FULL)
    assert synced == [str(tmp_path / ".state.json.partial"), str(tmp_path)]


CARBON = replace(
    FULL,
    carbon={
        "cheap": CarbonFigures(120.5, 40.0, (300.0, 40.0)),
        "dear": CarbonFigures(0.0, None, (None, None)),
    },
)


def test_carbon_figures_round_trip_through_a_file_beside_the_state(tmp_path: Path) -> None:
    """The state file holds what a reader without carbon figures (the state's record,
    `decode_state`, as of the version before them) reads whole; the figures and the
    fleet file's of their time come back from `NAME.carbon`, which goes with the last
    of them."""
    path = tmp_path / "state.json"
    store = FileStateStore(path)
    store.save(CARBON)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.carbon"]
    assert decode_state(path.read_text(), str(path)) == FULL
    assert "carbon" not in json.loads(path.read_text())
    assert FileStateStore(path).load() == CARBON

    store.save(replace(CARBON, carbon={"dear": CARBON.carbon["dear"]}))
    assert FileStateStore(path).load().carbon == {"dear": CarbonFigures(0.0, None, (None, None))}
    store.save(FULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert FileStateStore(path).load() == FULL


def test_a_state_file_of_the_version_before_carbon_figures_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(
        '{"version": 1, "prices": {"cheap": {"usd_per_hour": 0.5, '
        '"fleet_usd_per_hour": 0.04, "set_at_s": 1700000000.25}}, "policies": null, '
        '"drained": ["dear"], "routing": null, "schedule_start_s": null}\n'
    )
    assert FileStateStore(path).load() == ControlState(
        prices={"cheap": PriceOverride(0.5, 0.04, 1_700_000_000.25)},
        drained=frozenset({"dear"}),
    )


def test_carbon_figures_alone_are_kept_without_a_state_file(tmp_path: Path) -> None:
    """Figures whose state file is gone (deleted by hand) still load."""
    path = tmp_path / "state.json"
    only = ControlState(carbon={"cheap": CarbonFigures(80.0, 30.0, (None, None))})
    FileStateStore(path).save(only)
    path.unlink()
    assert FileStateStore(path).load() == only


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"version": 1, "backends": {', "carbon figures are not valid JSON"),
        (b'{"version": 2, "backends": {}}', "carbon figures of format version 2"),
        (
            b'{"version": 1, "backends": {"cheap": {"g_per_kwh": -3, "power_w": 1}}}',
            "greater than or equal to 0",
        ),
        (
            b'{"version": 1, "backends": {"cheap": {"g_per_kwh": 3, "power_w": 1, '
            b'"fleet": {"g_per_kwh": 1}}}}',
            "power_w",
        ),
    ],
)
def test_a_corrupt_carbon_file_is_set_aside_and_the_rest_of_the_state_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    caplog.set_level(logging.ERROR, logger="switchyard.control")
    path = tmp_path / "state.json"
    FileStateStore(path).save(FULL)
    (tmp_path / "state.json.carbon").write_bytes(content)
    assert FileStateStore(path).load() == FULL
    assert (tmp_path / "state.json.carbon.corrupt").read_bytes() == content
    assert not (tmp_path / "state.json.carbon").exists()
    assert "carbon figures' file not valid, the fleet file's figures apply" in caplog.text
    assert reason in caplog.text


def test_the_shared_stores_carbon_format_is_unchanged_without_fleet_figures() -> None:
    """A shared store's figures carry no fleet file's figures, so what an older gateway
    reads there has only the fields it knows; a file's carry them."""
    shared = ControlState(carbon={"cheap": CarbonFigures(120.5, 40.0)})
    assert json.loads(encode_carbon(shared)) == {
        "version": 1,
        "backends": {"cheap": {"g_per_kwh": 120.5, "power_w": 40.0}},
    }
    assert decode_carbon(encode_carbon(shared), "store") == shared.carbon
    assert decode_carbon(encode_carbon(CARBON), "file") == CARBON.carbon
    assert decode_carbon(None, "store") == {}
