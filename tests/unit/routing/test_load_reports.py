"""Backend-reported load in the queue model (BackendState.record_report): the other
gateways' requests a report gives stand in the queue beside this gateway's own tickets,
so the wait the router predicts is the report's queue plus what this gateway sent since,
less what of its own was answered since; an older report never replaces a newer one;
a report leaves once its work would be done or REPORT_MAX_AGE_S after it came; and the
report's wire form (backends.protocol.load) reads back as written."""

from __future__ import annotations

import math

import pytest

from backends.protocol.load import (
    BUCKETS,
    DUE_EDGES_MS,
    PROBE_MODULUS,
    REPORT_FIELD_BYTES,
    REPORT_WIDTH,
    LoadReport,
    ReportError,
    caller_field,
    caller_group,
    parse_report,
    report_field,
    split_report,
)
from gateway.routing.fleet import OTHERS, REPORT_MAX_AGE_S, SHARED_WINDOW_S, BackendState
from gateway.routing.router import choose
from gateway.routing.sla import Policy
from protos import inference_pb2 as pb
from tests.unit.routing.builders import REQ, route

NONE_WAITING = ((0, 0),) * BUCKETS


def waiting(**by_edge_ms: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """A report's waiting buckets: `e10=(2, 8000)` puts 2 requests of 8 ms of work
    together in the bucket due within 10 ms (`later` for the last one)."""
    cells = list(NONE_WAITING)
    for key, cell in by_edge_ms.items():
        at = BUCKETS - 1 if key == "later" else DUE_EDGES_MS.index(float(key[1:]))
        cells[at] = cell
    return tuple(cells)


def report(
    seq: int,
    in_service: int = 0,
    rest_us: int = 0,
    queued: tuple[tuple[int, int], ...] = (),
    probes: int | None = None,
) -> LoadReport:
    return LoadReport(seq, 1, in_service, rest_us, queued or NONE_WAITING, probes=probes)


def one_slot() -> BackendState:
    return BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=1)


def test_a_report_adds_the_other_gateways_requests_to_this_ones_own() -> None:
    state = one_slot()
    own = state.admit(None, 10.0, 0.050, 0.0)
    # Another gateway's batch runs for 8 ms more; 2 of its requests (12 ms) are due
    # within 25 ms, one (5 ms) later than 250 ms.
    taken = state.record_report(
        report(1, in_service=1, rest_us=8000, queued=waiting(e25=(2, 12000), later=(1, 5000))),
        0.001,
    )
    assert taken
    assert state.in_flight == 1 + 1 + 2 + 1
    # Its slot is held (by this gateway's own request, as far as it knows); the batch
    # that runs for the others waits ahead of everything.
    assert state.serving == [own]
    assert state.due_before(0.001) == (1, 8.0)
    assert state.due_before(0.027) == (2, 20.0)
    assert state.due_before(math.inf) == (3, 25.0)
    # The wait of a request due in 30 ms: own request's end (10 ms from 0), then the
    # others' work due first (8 + 12 ms), shared by the one slot.
    assert state.wait_ms(10.0, 10.0, 30.0, 99.0, 0.001) == pytest.approx(9.0 + 20.0)
    # This gateway's own answer frees its slot for the others' running batch.
    nxt = state.finish(own, 0.010)
    assert nxt is not None and nxt.attempt is OTHERS and state.in_flight == 4


def test_own_sends_since_the_report_add_and_own_answers_since_leave() -> None:
    state = one_slot()
    state.record_report(report(1, queued=waiting(e50=(3, 30000))), 0.0)
    # The others' 3 requests take the free slot as one ticket (they are the queue).
    assert state.in_flight == 3
    mine = [state.admit(None, 10.0, 0.100, 0.001 * i) for i in range(2)]
    assert state.in_flight == 5
    assert all(t.started_s is None for t in mine)  # behind the others' work
    assert state.due_before(0.2) == (2, 20.0)
    state.finish(mine[0], 0.002)
    assert state.in_flight == 4 and state.due_before(0.2) == (1, 10.0)


def test_an_older_report_never_replaces_a_newer_one() -> None:
    state = one_slot()
    assert state.record_report(report(5, queued=waiting(e10=(4, 40000))), 0.000)
    assert not state.record_report(report(4), 0.001)  # overtaken on another stream
    assert not state.record_report(report(5), 0.001)  # the same one again
    assert state.in_flight == 4 and state.report_seq == 5
    # A newer one replaces it whole: the others' requests are those it gives.
    assert state.record_report(report(6, queued=waiting(e100=(1, 10000))), 0.002)
    assert state.in_flight == 1 and state.report_seq == 6
    # A worker that restarted counts from 1 again: taken once the standing report is
    # REPORT_MAX_AGE_S old.
    state.record_report(report(7, queued=waiting(e10=(2, 9000))), 0.010)
    assert not state.record_report(report(1), 0.010 + REPORT_MAX_AGE_S / 2)
    assert state.record_report(report(1), 0.011 + REPORT_MAX_AGE_S)
    assert state.in_flight == 0 and state.report_seq == 1


def test_a_report_leaves_once_its_work_would_be_done() -> None:
    state = one_slot()
    # 2 ms left of the others' batch and 18 ms of their waiting work: 20 ms on one slot.
    state.record_report(report(1, in_service=1, rest_us=2000, queued=waiting(e50=(2, 18000))), 0.0)
    assert state.report_until_s == pytest.approx(0.020)
    assert state.wait_ms(1.0, 1.0, 100.0, 99.0, 0.010) > 0.0
    # Past it, the gateway's own view is all: an empty backend waits nothing.
    assert state.wait_ms(1.0, 1.0, 100.0, 99.0, 0.021) == 0.0
    assert state.in_flight == 0 and state.serving == []
    # A long queue reported stands REPORT_MAX_AGE_S at most; the next admit drops it.
    state.record_report(report(2, queued=waiting(later=(50, 60_000_000))), 1.0)
    assert state.report_until_s == pytest.approx(1.0 + REPORT_MAX_AGE_S)
    mine = state.admit(None, 1.0, 2.0, 1.0 + REPORT_MAX_AGE_S)
    assert state.in_flight == 1 and state.serving == [mine]


def test_own_waiting_requests_take_the_slots_the_others_held_when_they_leave() -> None:
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=2)
    state.record_report(LoadReport(1, 2, 2, 5000, NONE_WAITING), 0.0)
    mine = state.admit(None, 4.0, 0.1, 0.0)
    assert mine.started_s is None  # both slots run the others' batches
    state.record_report(LoadReport(2, 2, 0, 0, NONE_WAITING), 0.003)
    assert mine.started_s == 0.003 and state.serving == [mine] and state.in_flight == 1
    # A backend that dies loses this gateway's requests only; its report goes too.
    state.record_report(LoadReport(3, 2, 1, 5000, NONE_WAITING), 0.004)
    assert state.clear() == [mine] and state.report_seq == -1


def test_with_the_others_load_the_router_sends_a_request_to_the_spare() -> None:
    cheap, dear = route("cheap", 0.04, p50=10.0, p99=12.0), route("dear", 2.0, p50=1.0, p99=2.0)
    policy = Policy(latency_ms=30.0)
    # This gateway's own view: one request of its own on the cheap backend, 12 ms of
    # wait behind it at most: feasible.
    cheap.state.admit(cheap, 10.0, 0.030, 0.0)
    assert choose(REQ, [cheap, dear], policy, 0.0).route is cheap
    # Another gateway has two requests waiting there, due within 25 ms: now the cheap
    # backend would miss the SLA.
    cheap.state.record_report(report(1, queued=waiting(e25=(2, 20000))), 0.0)
    assert choose(REQ, [cheap, dear], policy, 0.0).route is dear


def test_the_report_travels_at_the_end_of_an_answer_and_is_cut_off() -> None:
    sent = LoadReport(123, 4, 2, 1500, waiting(e5=(1, 900), later=(99_999, 99_999_999)))
    answer = pb.ModelInferResponse(model_name="digits", id="7")
    answer.parameters["switchyard_variant"].string_param = "ort-cpu-fp32"
    plain = answer.SerializeToString()
    wire = plain + report_field(sent)
    assert len(wire) - len(plain) == REPORT_FIELD_BYTES
    # A protobuf reader sees one more response parameter; the gateway cuts it off.
    parsed = pb.ModelInferResponse.FromString(wire)
    assert parsed.parameters["switchyard_load"].string_param.startswith("123 4 2 1500 1:900")
    assert split_report(wire) == (plain, sent)
    assert split_report(plain) == (plain, None)  # a foreign server's answer
    with pytest.raises(ReportError):
        split_report(wire[:-8] + b"x" * 8)
    # The caller's name, appended to a request, reads as a request parameter.
    request = pb.ModelInferRequest.FromString(
        pb.ModelInferRequest(model_name="digits").SerializeToString() + caller_field("gw-1")
    )
    assert request.parameters["switchyard_caller"].string_param == "gw-1"


def test_a_report_to_a_caller_in_a_group_ends_with_the_requests_from_outside_it() -> None:
    """A caller that names a group (`GROUP/ID`) gets one more figure, the requests of
    callers outside its group; a report without it (a caller with no group, or a worker
    that knows none) reads as before, with no figure (None)."""
    assert caller_group("g1/abc") == "g1" and caller_group("abc") is None
    grouped = LoadReport(5, 1, 1, 800, waiting(later=(2, 1600)), foreign=0)
    wire = report_field(grouped)
    assert len(wire) == REPORT_FIELD_BYTES
    assert split_report(b"answer" + wire) == (b"answer", grouped)
    plain = LoadReport(5, 1, 1, 800, waiting(later=(2, 1600)))
    assert split_report(b"answer" + report_field(plain))[1] == plain
    assert plain.foreign is None
    biggest = LoadReport(10**12 - 1, 99_999, 99_999, 99_999_999, waiting(), foreign=10**6)
    assert parse_report(report_field(biggest)[-REPORT_WIDTH:]).foreign == 99_999
    with pytest.raises(ReportError):
        parse_report((grouped.text().rstrip()[:-1] + "-1").ljust(REPORT_WIDTH).encode())
    with pytest.raises(ReportError):  # a figure too many
        parse_report((grouped.text().rstrip() + " 3").ljust(REPORT_WIDTH).encode())


def widest_report(probes: int | None = None) -> LoadReport:
    """A report with every figure at or past its widest (the wait too long to write)."""
    return LoadReport(
        10**12 - 1,
        99_999,
        99_999,
        99_999_999,
        tuple((99_999, 99_999_999) for _ in range(BUCKETS)),
        foreign=99_999,
        queued_us=10**9,
        probes=probes,
    )


def test_a_report_ends_with_the_answers_own_wait_in_the_queue() -> None:
    """The answer's own wait at the worker travels as the report's last figure (`q` and
    microseconds), with or without the group's figure; a report without it (a worker
    before it) reads as None; the widest report still fits the fixed width."""
    for foreign in (None, 3):
        report = LoadReport(7, 2, 1, 900, waiting(later=(1, 800)), foreign, queued_us=1250)
        assert report.text().rstrip().endswith(" q1250")
        assert split_report(b"answer" + report_field(report)) == (b"answer", report)
    widest = widest_report()
    assert len(widest.text()) == REPORT_WIDTH
    assert parse_report(report_field(widest)[-REPORT_WIDTH:]).queued_us == 99_999_999
    assert parse_report(LoadReport(1, 1, 0, 0, waiting()).text().encode()).queued_us is None
    for bad in ("q-5", "qx", "q"):
        with pytest.raises(ReportError):
            text = LoadReport(1, 1, 0, 0, waiting()).text().rstrip() + f" {bad}"
            parse_report(text.ljust(REPORT_WIDTH).encode())


def test_a_report_tells_the_probes_answered_and_its_tagged_figures_read_in_any_order() -> None:
    """The probe count (`p`) goes before the wait, wraps at PROBE_MODULUS, and the widest
    report with it still fits the fixed width; tagged figures read in any order, and a tag
    this gateway does not know is skipped (a later worker's figure)."""
    report = LoadReport(7, 2, 1, 900, waiting(later=(1, 800)), 3, queued_us=1250, probes=42)
    assert report.text().rstrip().endswith(" 3 p42 q1250")
    assert split_report(b"answer" + report_field(report)) == (b"answer", report)
    widest = widest_report(probes=PROBE_MODULUS - 1)
    assert len(widest.text()) == REPORT_WIDTH
    read = parse_report(widest.text().encode())
    assert (read.probes, read.queued_us, read.foreign) == (PROBE_MODULUS - 1, 99_999_999, 99_999)
    wrapped = LoadReport(1, 1, 0, 0, waiting(), probes=PROBE_MODULUS + 5)
    assert parse_report(wrapped.text().encode()).probes == 5
    plain = LoadReport(1, 1, 0, 0, waiting()).text().rstrip()
    for tail, queued, probes in (
        (" q10 p2", 10, 2),
        (" p2 q10", 10, 2),
        (" z77 p2", None, 2),  # unknown tag: skipped
        (" p2", None, 2),
    ):
        read = parse_report((plain + tail).ljust(REPORT_WIDTH).encode())
        assert (read.queued_us, read.probes) == (queued, probes), tail
    for bad in (" p-1", " p", " px"):
        with pytest.raises(ReportError):
            parse_report((plain + bad).ljust(REPORT_WIDTH).encode())


def test_only_requests_from_outside_the_group_make_a_backend_shared_outside_it() -> None:
    """Reports that show only the group's other processes' requests make the backend
    shared (its queue holds them) but not shared outside the group; one showing a
    request from outside it, or one that does not tell (no group figure), make it
    both, for SHARED_WINDOW_S."""
    state = BackendState("b", "addr", "cpu", 1.0)
    siblings = LoadReport(1, 1, 0, 0, waiting(later=(2, 1600)), foreign=0)
    assert state.record_report(siblings, 10.0)
    assert state.shared(10.0) and not state.shared_outside_group(10.0)
    outside = LoadReport(2, 1, 0, 0, waiting(later=(2, 1600)), foreign=1)
    assert state.record_report(outside, 10.5)
    assert state.shared_outside_group(10.5)
    assert not state.shared_outside_group(10.5 + SHARED_WINDOW_S)
    untold = LoadReport(3, 1, 0, 0, waiting(later=(1, 800)))
    assert state.record_report(untold, 20.0)
    assert state.shared(20.0) and state.shared_outside_group(20.0)


def test_a_slot_given_as_reported_requests_leave_or_stand_times_nothing() -> None:
    """A waiting request of this gateway's that takes its slot as a report's tickets
    leave (or while they stand) got it at no time this gateway knows: the backend may
    have served any gateway's request first. Its answer measures no route (timed
    False); one that took a slot its own predecessor freed, no report standing, does."""
    state = one_slot()
    own = state.admit(None, 10.0, 0.050, 0.0)
    state.record_report(report(1, in_service=1, rest_us=8000), 0.001)
    behind = state.admit(None, 10.0, 0.060, 0.002)
    assert behind.started_s is None
    # The next report holds nothing of the others': theirs leave, and `behind` waits on.
    state.record_report(report(2), 0.005)
    assert behind.started_s is None
    # Its predecessor answers while nothing of the others stands: a slot it can time.
    assert state.finish(own, 0.010) is behind
    assert behind.timed and behind.started_s == 0.010

    state = one_slot()
    first = state.admit(None, 10.0, 0.050, 0.0)
    state.record_report(report(1, queued=waiting(e25=(1, 9000))), 0.001)
    waits = state.admit(None, 10.0, 0.008, 0.002)  # due before the others' request
    # An answer frees the slot while the others' request stands in the model.
    assert state.finish(first, 0.010) is waits
    assert not waits.timed

    state = one_slot()
    state.record_report(report(1, in_service=1, rest_us=20000), 0.0)
    queued = state.admit(None, 10.0, 0.060, 0.001)
    assert queued.started_s is None
    # The report's tickets leave (a newer report without them): `queued` gets the slot.
    state.record_report(report(2), 0.004)
    assert queued.started_s == 0.004 and not queued.timed
