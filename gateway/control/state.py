"""What the control plane keeps across a restart: the changes made through the admin
API (prices, SLA policies, drains, the routing rule) and when the price schedule
started, behind one small interface (`StateStore`), so that a store shared by several
gateways (gateway.control.shared_state) stands in for the file. A shared store also
carries what only matters while several gateways run: the price schedule's latest
prices, the backends' ejections (`SharedEjection`) and their carbon figures set through
the admin API or a carbon feed (`CarbonFigures`). The carbon figures have a format of
their own (`encode_carbon`), kept beside the state rather than in it, so that a gateway
of a version that does not know them reads and writes the state as before and leaves
them alone.

The file (`FileStateStore`) is JSON, written aside, synced and renamed
(`backends.files.write_atomically`): a reader, or a gateway starting after a crash,
sees the old state or the whole new one. A file that cannot be read or does not
validate is logged and moved aside as `NAME.corrupt`; the gateway then starts from
the fleet file alone. The carbon figures set through the admin API go in a file of
their own beside it (`NAME.carbon`, `encode_carbon`'s format; none while there are no
figures), which a gateway of an older version never reads, nor moves aside, nor
writes; that file, when not valid, is moved aside as `NAME.carbon.corrupt` and the
rest of the state stands.

Imports pydantic and the fleet file's settings: no grpc, no protobuf, no clock (the
times in the state are the callers').
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.files import write_text_atomically
from backends.protocol.errors import Unavailable
from gateway.config import GatewaySettings, PoliciesSettings

log = logging.getLogger("switchyard.control")

T = TypeVar("T")

STATE_FILE_NAME = "state.json"
"""The state file's name beside `gateway.admin_token_file` when `gateway.state_file`
is not set."""
CARBON_FILE_SUFFIX = ".carbon"
"""The carbon figures' file is the state file's name with this added."""

FORMAT_VERSION = 1
CARBON_FORMAT_VERSION = 1
"""The carbon figures' own format (`encode_carbon`), beside the state's."""


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A backend's price set through the admin API."""

    usd_per_hour: float
    fleet_usd_per_hour: float
    """The fleet file's price for the backend when this one was set: a fleet file
    that says otherwise at start was edited since, and its price wins."""
    set_at_s: float
    """When it was set (seconds since the epoch): a price schedule step that came
    due later replaces it."""


@dataclass(frozen=True, slots=True)
class PoliciesOverride:
    """SLA policies set through the admin API."""

    policies: PoliciesSettings
    fleet_policies: PoliciesSettings
    """The fleet file's policies when these were set: a fleet file whose policies
    differ at start was edited since, and its policies win."""


@dataclass(frozen=True, slots=True)
class SharedEjection:
    """A backend ejected by one gateway's passive outlier detection, for every gateway
    sharing the store: each keeps it out of its routes until `until_s`."""

    until_s: float
    """When it ends (seconds since the epoch: the gateways' monotonic clocks differ)."""
    at_s: float
    """When it was made (seconds since the epoch)."""
    count: int
    """Its place in the backend's run of ejections without a clean spell (1: the
    first): the next ejection, by whichever gateway, lasts longer."""
    by: str
    """The gateway that made it (host:pid:token)."""
    why: str
    """What ejected it (the failures and the last error)."""


@dataclass(frozen=True, slots=True)
class CarbonFigures:
    """A backend's carbon figures set through one gateway's admin API or by the carbon
    feed it polls, in force on every gateway sharing the store."""

    g_per_kwh: float | None
    """Carbon intensity of its power (gCO2eq/kWh); None: unknown."""
    power_w: float | None
    """Power draw while busy (W); None: unknown."""
    fleet: tuple[float | None, float | None] | None = None
    """The fleet file's figures for the backend (intensity, power draw) when these were
    set through the admin API with a local store: a fleet file that says otherwise at
    start was edited since, and its figures win. None: not known (a shared store's
    figures, whose format has no room for them)."""


def later_ejection(a: SharedEjection, b: SharedEjection) -> SharedEjection:
    """Of two ejections of one backend, the one further in its run, else the one that
    ends later."""
    return max(a, b, key=lambda e: (e.count, e.until_s, e.at_s))


@dataclass(frozen=True, slots=True)
class ControlState:
    """The control plane's changes that outlive the process."""

    prices: Mapping[str, PriceOverride] = field(default_factory=dict)
    policies: PoliciesOverride | None = None
    drained: frozenset[str] = frozenset()
    routing: str | None = None
    """The routing rule chosen through the admin API; None: the default."""
    schedule_start_s: float | None = None
    """When the price schedule's offset 0 was (seconds since the epoch)."""
    scheduled: Mapping[str, float] = field(default_factory=dict)
    """The price schedule's last price per backend (USD per hour), kept only in a
    shared store: one gateway plays the schedule, every gateway applies its prices."""
    ejections: Mapping[str, SharedEjection] = field(default_factory=dict)
    """Each backend's latest ejection by any gateway, kept only in a shared store (not
    an admin change: a file does not keep it), until a gateway sees the backend answer
    after it ended (a clean spell, which ends the run)."""
    carbon: Mapping[str, CarbonFigures] = field(default_factory=dict)
    """Carbon figures per backend: a shared store's from the admin API or a carbon
    feed; a state file's from the admin API only (a feed is polled afresh at start, and
    its figures go stale without it). A backend with none has the fleet file's."""

    def with_price(self, backend: str, price: PriceOverride | None) -> ControlState:
        prices = {k: v for k, v in self.prices.items() if k != backend}
        if price is not None:
            prices[backend] = price
        return replace(self, prices=prices)

    def with_scheduled(self, backend: str, usd_per_hour: float | None) -> ControlState:
        scheduled = {k: v for k, v in self.scheduled.items() if k != backend}
        if usd_per_hour is not None:
            scheduled[backend] = usd_per_hour
        return replace(self, scheduled=scheduled)

    def with_ejection(self, backend: str, ejection: SharedEjection | None) -> ControlState:
        ejections = {k: v for k, v in self.ejections.items() if k != backend}
        if ejection is not None:
            ejections[backend] = ejection
        return replace(self, ejections=ejections)

    def with_carbon(self, backend: str, figures: CarbonFigures | None) -> ControlState:
        carbon = {k: v for k, v in self.carbon.items() if k != backend}
        if figures is not None:
            carbon[backend] = figures
        return replace(self, carbon=carbon)

    def with_drained(self, backend: str, drained: bool) -> ControlState:
        names = self.drained | {backend} if drained else self.drained - {backend}
        return replace(self, drained=frozenset(names))

    def without_backends(self, names: frozenset[str]) -> ControlState:
        """The state with nothing left of the backends `names`."""
        return replace(
            self,
            prices={k: v for k, v in self.prices.items() if k not in names},
            drained=self.drained - names,
            scheduled={k: v for k, v in self.scheduled.items() if k not in names},
            ejections={k: v for k, v in self.ejections.items() if k not in names},
            carbon={k: v for k, v in self.carbon.items() if k not in names},
        )

    def backends(self) -> frozenset[str]:
        """Every backend the state speaks of."""
        return (
            frozenset(self.prices)
            | self.drained
            | frozenset(self.scheduled)
            | frozenset(self.ejections)
            | frozenset(self.carbon)
        )


def _merge_map(stored: Mapping[str, Any], base: Mapping[str, Any], mine: Mapping[str, Any]) -> Any:
    merged = dict(stored)
    for key in base.keys() | mine.keys():
        if key not in mine:
            merged.pop(key, None)
        elif base.get(key) != mine[key]:
            merged[key] = mine[key]
    return merged


def _merge_ejections(
    stored: Mapping[str, SharedEjection],
    base: Mapping[str, SharedEjection],
    mine: Mapping[str, SharedEjection],
) -> dict[str, SharedEjection]:
    """Ejections merge by meaning, not by the later write: one made here beside another
    gateway's of the same backend keeps the later of the two (`later_ejection`), and one
    removed here (its run ended) goes only if nobody ejected the backend again since."""
    merged = dict(stored)
    for key in base.keys() | mine.keys():
        theirs, known = stored.get(key), base.get(key)
        if key not in mine:
            if theirs == known:
                merged.pop(key, None)
        elif known != mine[key]:
            if theirs is None or theirs == known:
                merged[key] = mine[key]
            else:
                merged[key] = later_ejection(theirs, mine[key])
    return merged


def merge_state(stored: ControlState, base: ControlState, mine: ControlState) -> ControlState:
    """`mine`'s changes from `base` made on `stored`: one backend's price, one drain,
    one ejection, one backend's carbon figures, the policies, the routing rule or the
    schedule's start, each on its own, so that a change made here never undoes another
    gateway's change of something else (for the same value, the later write wins; for
    ejections, see `_merge_ejections`)."""
    merged = stored
    if mine.prices != base.prices:
        merged = replace(merged, prices=_merge_map(merged.prices, base.prices, mine.prices))
    if mine.scheduled != base.scheduled:
        merged = replace(
            merged, scheduled=_merge_map(merged.scheduled, base.scheduled, mine.scheduled)
        )
    if mine.drained != base.drained:
        drained = (merged.drained | (mine.drained - base.drained)) - (base.drained - mine.drained)
        merged = replace(merged, drained=frozenset(drained))
    if mine.ejections != base.ejections:
        merged = replace(
            merged, ejections=_merge_ejections(merged.ejections, base.ejections, mine.ejections)
        )
    if mine.carbon != base.carbon:
        merged = replace(merged, carbon=_merge_map(merged.carbon, base.carbon, mine.carbon))
    if mine.policies != base.policies:
        merged = replace(merged, policies=mine.policies)
    if mine.routing != base.routing:
        merged = replace(merged, routing=mine.routing)
    if mine.schedule_start_s != base.schedule_start_s:
        merged = replace(merged, schedule_start_s=mine.schedule_start_s)
    return merged


class StateError(Exception):
    """The stored state cannot be read or is not valid."""


class StateStore(Protocol):
    """Where the control plane's state is kept between runs."""

    @property
    def where(self) -> str:
        """The store, in words, for logs and errors."""
        ...

    def load(self) -> ControlState:
        """The stored state; an empty one when nothing was stored yet. A store that
        cannot be read or holds what is not a state is logged, set aside where it
        can be, and an empty state comes back."""
        ...

    def save(self, state: ControlState) -> None:
        """Replaces the stored state, whole; Unavailable saying why when it cannot. A
        shared store takes the changes from the state last loaded or saved and writes
        them (`flush`) without undoing other gateways' changes."""
        ...

    @property
    def shared(self) -> bool:
        """Several gateways share this store (so each needs the schedule's prices)."""
        ...

    async def flush(self) -> str | None:
        """Waits until every state saved so far is stored: None once it is, else why it
        is not yet (a shared store that cannot be reached: it is written when the store
        is back). A local store stores in `save`."""
        ...


# ---- the file's format: pydantic at the edge --------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _PriceRecord(_Strict):
    usd_per_hour: float = Field(ge=0)
    fleet_usd_per_hour: float = Field(ge=0)
    set_at_s: float


class _PoliciesRecord(_Strict):
    policies: PoliciesSettings
    fleet_policies: PoliciesSettings


class _EjectionRecord(_Strict):
    until_s: float
    at_s: float
    count: int = Field(ge=1)
    by: str
    why: str


class _StateRecord(_Strict):
    version: int = FORMAT_VERSION
    prices: dict[str, _PriceRecord] = {}
    policies: _PoliciesRecord | None = None
    drained: list[str] = []
    routing: str | None = None
    schedule_start_s: float | None = None
    scheduled: dict[str, Annotated[float, Field(ge=0)]] = {}
    ejections: dict[str, _EjectionRecord] = {}


class _FleetCarbonRecord(_Strict):
    g_per_kwh: float | None = Field(ge=0)
    power_w: float | None = Field(ge=0)


class _CarbonFiguresRecord(_Strict):
    g_per_kwh: float | None = Field(ge=0)
    power_w: float | None = Field(ge=0)
    fleet: _FleetCarbonRecord | None = None
    """Only in a state file's carbon figures (never in a shared store's, which older
    gateways read)."""


class _CarbonRecord(_Strict):
    version: int = CARBON_FORMAT_VERSION
    backends: dict[str, _CarbonFiguresRecord] = {}


def _policies_data(settings: PoliciesSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude_none=True)


def encode_state(state: ControlState) -> str:
    """The state as the file's JSON, without its carbon figures (`encode_carbon`)."""
    record: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "prices": {
            name: {
                "usd_per_hour": p.usd_per_hour,
                "fleet_usd_per_hour": p.fleet_usd_per_hour,
                "set_at_s": p.set_at_s,
            }
            for name, p in sorted(state.prices.items())
        },
        "policies": None
        if state.policies is None
        else {
            "policies": _policies_data(state.policies.policies),
            "fleet_policies": _policies_data(state.policies.fleet_policies),
        },
        "drained": sorted(state.drained),
        "routing": state.routing,
        "schedule_start_s": state.schedule_start_s,
    }
    if state.scheduled:
        record["scheduled"] = dict(sorted(state.scheduled.items()))
    if state.ejections:
        record["ejections"] = {
            name: {"until_s": e.until_s, "at_s": e.at_s, "count": e.count, "by": e.by, "why": e.why}
            for name, e in sorted(state.ejections.items())
        }
    return json.dumps(record, indent=1, allow_nan=False) + "\n"


def decode_state(text: str, source: str) -> ControlState:
    """The state from the file's JSON; StateError naming `source` and what is wrong."""
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError(f"{source}: expected a JSON object at the top level")
    if data.get("version") != FORMAT_VERSION:
        raise StateError(
            f"{source}: format version {data.get('version')!r}, expected {FORMAT_VERSION}"
        )
    try:
        record = _StateRecord.model_validate(data)
    except ValidationError as exc:
        raise StateError(f"{source}: {exc}") from exc
    return ControlState(
        prices={
            name: PriceOverride(p.usd_per_hour, p.fleet_usd_per_hour, p.set_at_s)
            for name, p in record.prices.items()
        },
        policies=None
        if record.policies is None
        else PoliciesOverride(record.policies.policies, record.policies.fleet_policies),
        drained=frozenset(record.drained),
        routing=record.routing,
        schedule_start_s=record.schedule_start_s,
        scheduled=dict(record.scheduled),
        ejections={
            name: SharedEjection(e.until_s, e.at_s, e.count, e.by, e.why)
            for name, e in record.ejections.items()
        },
    )


def _carbon_data(figures: CarbonFigures) -> dict[str, Any]:
    data: dict[str, Any] = {"g_per_kwh": figures.g_per_kwh, "power_w": figures.power_w}
    if figures.fleet is not None:
        data["fleet"] = {"g_per_kwh": figures.fleet[0], "power_w": figures.fleet[1]}
    return data


def encode_carbon(state: ControlState) -> str:
    """The state's carbon figures as JSON (not in `encode_state`: a store keeps them
    beside the state)."""
    record = {
        "version": CARBON_FORMAT_VERSION,
        "backends": {name: _carbon_data(c) for name, c in sorted(state.carbon.items())},
    }
    return json.dumps(record, allow_nan=False)


def decode_carbon(text: str | None, source: str) -> dict[str, CarbonFigures]:
    """Carbon figures from `encode_carbon`'s JSON; none when `text` is None (a store
    written only by gateways that do not know them); StateError naming `source` and
    what is wrong."""
    if text is None:
        return {}
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{source}: carbon figures are not valid JSON: {exc}") from exc
    found = data.get("version") if isinstance(data, dict) else None
    if found != CARBON_FORMAT_VERSION:
        raise StateError(
            f"{source}: carbon figures of format version {found!r}, "
            f"expected {CARBON_FORMAT_VERSION}"
        )
    try:
        record = _CarbonRecord.model_validate(data)
    except ValidationError as exc:
        raise StateError(f"{source}: carbon figures: {exc}") from exc
    return {
        name: CarbonFigures(
            c.g_per_kwh,
            c.power_w,
            None if c.fleet is None else (c.fleet.g_per_kwh, c.fleet.power_w),
        )
        for name, c in record.backends.items()
    }


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number the state may hold")


class FileStateStore:
    """The state in one JSON file, and its carbon figures in another beside it
    (`carbon_path`), written only while there are some."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.carbon_path = path.with_name(path.name + CARBON_FILE_SUFFIX)

    @property
    def where(self) -> str:
        return f"state file {self.path}"

    def load(self) -> ControlState:
        state = self._load_state()
        carbon = self._load_carbon()
        return replace(state, carbon=carbon) if carbon else state

    def _load_state(self) -> ControlState:
        state = _read_valid(
            self.path,
            decode_state,
            f"cannot read {self.where}, starting from the fleet file",
            "state file not valid, starting from the fleet file",
        )
        return ControlState() if state is None else state

    def _load_carbon(self) -> dict[str, CarbonFigures]:
        """The carbon figures' file (none when there is none); one that cannot be read
        or is not valid leaves the fleet file's figures in force (logged)."""
        carbon = _read_valid(
            self.carbon_path,
            decode_carbon,
            f"cannot read the carbon figures' file {self.carbon_path}, the fleet file's apply",
            "carbon figures' file not valid, the fleet file's figures apply",
        )
        return {} if carbon is None else carbon

    def save(self, state: ControlState) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, encode_state(state))
            if state.carbon:
                write_text_atomically(self.carbon_path, encode_carbon(state) + "\n")
            else:
                self.carbon_path.unlink(missing_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot save the gateway's {self.where}: {exc}") from exc

    @property
    def shared(self) -> bool:
        return False

    async def flush(self) -> str | None:
        return None


def _read_valid(
    path: Path, decode: Callable[[str, str], T], unreadable: str, invalid: str
) -> T | None:
    """`decode` of the text of the file at `path` (naming it as its source); None when
    there is none, when it cannot be read (logged: `unreadable`), or when it is not valid
    (logged: `invalid`, and moved aside)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("%s: %s", unreadable, exc)
        return None
    try:
        return decode(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        problem = f"{path}: not UTF-8 text: {exc}"
    except StateError as exc:
        problem = str(exc)
    log.error("%s; %s: %s", invalid, _set_aside(path), problem)
    return None


def _set_aside(path: Path) -> str:
    """Moves a file that is not valid aside as `NAME.corrupt`; what became of it."""
    aside = path.with_name(path.name + ".corrupt")
    try:
        path.replace(aside)
    except OSError as exc:
        return f"left in place (cannot move it aside: {exc})"
    return f"moved aside to {aside}"


class MemoryStateStore:
    """The state in this process only: forgotten at exit (no state file)."""

    def __init__(self, state: ControlState | None = None) -> None:
        self.state = state or ControlState()

    @property
    def where(self) -> str:
        return "memory (not kept across restarts)"

    def load(self) -> ControlState:
        return self.state

    def save(self, state: ControlState) -> None:
        self.state = state

    @property
    def shared(self) -> bool:
        return False

    async def flush(self) -> str | None:
        return None


def state_path(settings: GatewaySettings) -> Path | None:
    """Where the gateway keeps its state: `state_file`, else `state.json` beside
    `admin_token_file`, else nowhere (None)."""
    if settings.state_file is not None:
        return settings.state_file
    if settings.admin_token_file is not None:
        return settings.admin_token_file.parent / STATE_FILE_NAME
    return None


def state_store(settings: GatewaySettings) -> StateStore:
    """The local store the settings name: memory (`state: memory`), a file, else
    memory. A shared store (`state: redis://...`) is gateway.control.shared_state's."""
    if settings.state == "memory":
        return MemoryStateStore()
    path = state_path(settings)
    return MemoryStateStore() if path is None else FileStateStore(path)
