"""Backend-reported load (after ORCA's per-request load reports): every successful answer
of a Switchyard worker carries its queue as it stood when the answer left, less the
asking gateway's own requests, so that each of several gateways sharing a backend adds
the others' load to its own exact view of what it sent.

The gateway names itself in each request with the `switchyard_caller` request parameter
(an id of its own, a few bytes). The worker answers with the `switchyard_load` response
parameter: a string of fixed width, appended as the last field of the serialized
ModelInferResponse (a stream's answer ends with its `infer_response`, so it is the last
field there too). The gateway finds it by comparing the bytes just before that fixed
width with a constant header, reads it, and cuts it off before the answer goes on to its
caller: nothing else of the answer is parsed. A v2 server that sends none (KServe,
Triton) leaves the gateway with its own view.

The report: a sequence number (so that an older report, overtaken on another stream,
never replaces a newer one), the worker's slots (inference threads), the batches
running that hold other callers' requests and about how long until the first of them
ends, and the other callers' waiting requests by how soon each is due (the buckets of
DUE_EDGES_MS), each bucket's count and expected work.

A caller may name a group it belongs to, `GROUP/ID` (the processes of one `switchyard
serve --processes N`): its report then holds one more figure, the requests in it
(waiting or in service) of callers outside that group, so that the group's processes
can tell one another from other gateways. A caller without a group gets the report
without it, as a worker that knows no groups sends to everyone.

The report ends with how long the answer's own request waited in the worker's queue for
its run to start (`q` and microseconds), so that the caller can tell the service its
answer took from the wait (behind other gateways' requests, which it does not see
as it sends): its latency, less that wait and the network, is a clean sample of the
backend's service time. A worker before this figure sends none; a gateway before it
reads such a report as malformed (it logs that and keeps its own view): upgrade the
gateways first.

Before that wait it holds how many latency probes (requests that asked to go after those
waiting, `switchyard_after_waiting`) the worker has answered (`p` and the count, modulo
PROBE_MODULUS), so that the caller can tell, of the reports sent to others between two of
its own, the other gateways' requests from the gateways' probes: periodic and few, they
count apart. Tagged figures are read in any order after the plain ones, and a tag the
gateway does not know is skipped, so later figures need no lockstep upgrade.

Plain bytes and values: no grpc, no generated code, nothing from the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.protocol.streams import length_delimited

CALLER_PARAMETER = "switchyard_caller"
"""The request parameter naming the gateway that sent a request (an id of its own)."""

LOAD_PARAMETER = "switchyard_load"
"""The response parameter holding the worker's load report."""

DUE_EDGES_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0)
"""The buckets of waiting work by deadline: due within each edge (ms from the report),
and after the last (or not due at all)."""

BUCKETS = len(DUE_EDGES_MS) + 1

REPORT_WIDTH = 160
"""The report string's length in bytes (padded with spaces): a fixed width, so the
gateway finds it at a known distance from the answer's end."""

MAX_COUNT = 99_999
MAX_US = 99_999_999
SEQ_MODULUS = 10**12

_INFER_PARAMETER_STRING = 3  # InferParameter.string_param
_MAP_KEY, _MAP_VALUE = 1, 2
_RESPONSE_PARAMETERS = 4  # ModelInferResponse.parameters


QUEUED_TAG = "q"
"""Marks the report's figure of the answer's own wait (`q1250`: 1.25 ms)."""

PROBES_TAG = "p"
"""Marks the report's count of the latency probes the worker has answered (`p17`)."""

PROBE_MODULUS = 10**4
"""The probe count wraps here (the widest report then still fits REPORT_WIDTH); a gateway
takes the difference of two reports' counts modulo it."""

GROUP_SEPARATOR = "/"
"""Between a caller's group and its own id (`GROUP/ID`)."""


def caller_group(caller: str) -> str | None:
    """The group a caller id names (`GROUP/ID`: GROUP), None when it names none."""
    group, separator, _ = caller.partition(GROUP_SEPARATOR)
    return group if separator else None


class ReportError(ValueError):
    """A load report that does not read as one."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's queue as one caller's answer reported it, that caller's own requests
    left out."""

    seq: int
    """Rises by one with each report the worker sends (modulo SEQ_MODULUS)."""
    slots: int
    """The worker's inference threads."""
    in_service: int
    """Batches running that hold other callers' requests (each takes a slot)."""
    rest_us: int
    """About how long until the first of those batches ends (its recent mean execution
    time less how long it has run); 0 when none runs."""
    waiting: tuple[tuple[int, int], ...]
    """Per bucket of DUE_EDGES_MS: (other callers' requests waiting, due within that
    edge, their expected work in us)."""
    foreign: int | None = None
    """Requests (waiting or in service) of callers outside the asking caller's group;
    None when the caller names no group (or the worker knows none)."""
    queued_us: int | None = None
    """How long the answer's own request waited in the worker's queue before its run
    began; None when the worker does not say."""
    probes: int | None = None
    """Latency probes (`switchyard_after_waiting` requests) the worker has answered, this
    answer's own included, modulo PROBE_MODULUS; None when the worker does not say."""

    @property
    def waiting_requests(self) -> int:
        return sum(count for count, _ in self.waiting)

    @property
    def waiting_us(self) -> int:
        return sum(work for _, work in self.waiting)

    def text(self) -> str:
        """The report as the fixed-width string the worker sends."""
        cells = " ".join(f"{min(c, MAX_COUNT)}:{min(w, MAX_US)}" for c, w in self.waiting)
        text = (
            f"{self.seq % SEQ_MODULUS} {min(self.slots, MAX_COUNT)}"
            f" {min(self.in_service, MAX_COUNT)} {min(self.rest_us, MAX_US)} {cells}"
        )
        if self.foreign is not None:
            text += f" {min(self.foreign, MAX_COUNT)}"
        if self.probes is not None:
            text += f" {PROBES_TAG}{self.probes % PROBE_MODULUS}"
        if self.queued_us is not None:
            text += f" {QUEUED_TAG}{min(self.queued_us, MAX_US)}"
        return text.ljust(REPORT_WIDTH)


def _parameter_prefix(name: str, width: int) -> bytes:
    """The bytes of a response `parameters` entry `name` -> string_param of `width`
    bytes, up to where the string's bytes begin."""
    key = length_delimited(_MAP_KEY, name.encode())
    # The string_param field's own key and length; its `width` bytes follow.
    string_head = length_delimited(_INFER_PARAMETER_STRING, b" " * width)[:-width]
    value_len = len(string_head) + width
    value_head = length_delimited(_MAP_VALUE, b" " * value_len)[:-value_len]
    entry_len = len(key) + len(value_head) + value_len
    entry_head = length_delimited(_RESPONSE_PARAMETERS, b" " * entry_len)[:-entry_len]
    return entry_head + key + value_head + string_head


REPORT_HEADER = _parameter_prefix(LOAD_PARAMETER, REPORT_WIDTH)
"""What precedes the report's string in an answer: the parameters entry's field key,
length, name and value header (constant, as the width is)."""
REPORT_FIELD_BYTES = len(REPORT_HEADER) + REPORT_WIDTH
"""The whole field's length: what the gateway cuts off an answer's end."""


def report_field(report: LoadReport) -> bytes:
    """The report as a `switchyard_load` response parameter, to append to a serialized
    ModelInferResponse (protobuf merges a map entry appended after the rest)."""
    return REPORT_HEADER + report.text().encode("ascii")


def caller_field(caller: str) -> bytes:
    """The `switchyard_caller` request parameter, to append to a serialized
    ModelInferRequest (the field numbers of `parameters` and string_param are the
    same in requests and responses)."""
    value = length_delimited(_INFER_PARAMETER_STRING, caller.encode())
    entry = length_delimited(_MAP_KEY, CALLER_PARAMETER.encode()) + length_delimited(
        _MAP_VALUE, value
    )
    return length_delimited(_RESPONSE_PARAMETERS, entry)


def split_report(answer: bytes) -> tuple[bytes, LoadReport | None]:
    """A serialized ModelInferResponse without the load report at its end, and the
    report (None, and the answer unchanged, when it ends with none). ReportError when
    the field is there but its string does not read as a report."""
    size = REPORT_FIELD_BYTES
    if len(answer) < size or answer[-size:-REPORT_WIDTH] != REPORT_HEADER:
        return answer, None
    return answer[:-size], parse_report(answer[-REPORT_WIDTH:])


def parse_report(text: bytes) -> LoadReport:
    """A report's string, read. ReportError when it is not one."""
    parts = text.split()
    tags: dict[bytes, int] = {}
    while parts and parts[-1][:1].isalpha():  # tagged figures, after the plain ones
        tagged = parts.pop()
        try:
            tags.setdefault(tagged[:1], int(tagged[1:]))
        except ValueError as exc:
            raise ReportError(f"load report's figure {tagged!r} does not read: {exc}") from exc
    if len(parts) not in (4 + BUCKETS, 5 + BUCKETS):
        raise ReportError(
            f"load report has {len(parts)} plain figures, not {4 + BUCKETS} (or {5 + BUCKETS})"
        )
    try:
        seq, slots, in_service, rest_us = (int(p) for p in parts[:4])
        waiting = []
        for cell in parts[4 : 4 + BUCKETS]:
            count, _, work = cell.partition(b":")
            waiting.append((int(count), int(work)))
        foreign = int(parts[4 + BUCKETS]) if len(parts) > 4 + BUCKETS else None
    except ValueError as exc:
        raise ReportError(f"load report does not read: {exc}") from exc
    queued, probes = tags.get(_QUEUED_BYTE), tags.get(_PROBES_BYTE)
    figures = (seq, slots, in_service, rest_us, *(v for pair in waiting for v in pair))
    if min(figures) < 0 or min(foreign or 0, queued or 0, probes or 0) < 0:
        raise ReportError("load report holds a negative figure")
    return LoadReport(seq, slots, in_service, rest_us, tuple(waiting), foreign, queued, probes)


_QUEUED_BYTE = QUEUED_TAG.encode()
_PROBES_BYTE = PROBES_TAG.encode()
