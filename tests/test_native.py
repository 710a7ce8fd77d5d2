"""The native hot path (sidecar._native) against the Python path, its reference.

The native decoder takes a line when it is valid protocol v1 as it stands or after the rewrites
it does itself (timestamps, level aliases), and then its chunk (sidecar.ingest.NativeChunk) must
give, per source, the same enriched lines as the Python decoder's chunk (PythonChunk), both
enriched through the ingest interface as the correlator enriches them, the same trace-to-job
memory, and the same live index. Any other line it must decline (name in `Decoded.declined`),
leaving it to the Python path, which explains errors and normalises.
Compared as JSON values in key order: a line is written as received, so its spelling (spaces,
escapes, `1E2`) may differ from orjson's.
"""

import zlib
import datetime as dt
import json

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar import constants, native
from sidecar.correlator import Correlator
from sidecar.ingest import NATIVE_AVAILABLE, TraceJobs, decode_natively, native_chunk
from sidecar.jobs import LiveIndex
from sidecar.message import DEFAULT_MAX_DEPTH, MessageError, normalise_timestamp
from sidecar.metrics import Counters
from sidecar.protocol import StreamDecoder

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="sidecar._native is not built (no Rust toolchain at install)")

RECEIVED = "2026-11-27T08:00:00.000Z"
HOST = 'host "one"\t'  # escaped in every line
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"


def canonical_event(source="svc", seq=0, **extra):
    message = {"source": source, "type": "event", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"level": "info", "message": f"m{seq}"}}
    message.update(extra)
    return message


def encode(messages, style="compact") -> bytes:
    """JSON lines as an SDK might write them: compact UTF-8, or spaced with \\u escapes (the
    stdlib encoder, since orjson refuses integers beyond 64 bits, which JSON allows)."""
    if style == "compact":
        return "\n".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in messages).encode() + b"\n"
    return "\n".join(json.dumps(m, ensure_ascii=True, separators=(", ", " : ")) for m in messages).encode() + b"\n"


def normalised(line: bytes) -> bytes:
    return orjson.dumps(orjson.loads(line))


class Side:
    """One path's state across chunks: its correlator (trace -> job memory) and live index."""

    def __init__(self, native: bool, trace_cache_size: int = 3):
        self.native = native
        self.index = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
        self.correlator = Correlator(None, Counters(), self.index, trace_cache_size=trace_cache_size, host=HOST)
        self.native_chunks = 0

    def feed(self, data: bytes) -> tuple[dict, list]:
        """Per source, the normalised lines; and the decode errors."""
        decoder = StreamDecoder(native=self.native)
        chunk, errors = decoder.receive_data(data)
        self.native_chunks += chunk.path == "native"
        # What Correlator.process does before it routes, without its guards: a bug here fails the test.
        enriched = self.correlator.enrich(RECEIVED, chunk)
        self.index.add_summaries(enriched.cells)
        batches = enriched.batches
        lines = {b.source: [normalised(line) for line in b.lines] for b in batches}
        timestamps = {b.source: b.timestamps for b in batches}
        # Per source: urgent, and whether an aggregate is among them (the native decoder says).
        flags = {b.source: (b.urgent, b.may_hold_aggregates()) for b in batches}
        return (lines, timestamps, flags), [(e.reason, e.detail) for e in errors]

    def views(self) -> dict:
        return {
            "jobs": {key: self.index.job(key) for key in self.index.jobs},
            "traces": {key: self.index.trace(key) for key in self.index.traces},
            "recent": self.index.recent_jobs(),
            "trace_jobs": list(self.correlator.trace_jobs.items()),
        }


# ---------------------------------------------------------------- generated traffic

texts = st.text(max_size=12)
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False, width=64))
canonical_stamps = st.sampled_from(["2025-10-20T10:30:45.123Z", "2025-10-20T10:30:45.124Z", "2025-10-20T10:30:44.999Z"])
odd_stamps = st.sampled_from(["2025-10-20T12:30:45+02:00", 1760956245.5, 1760956245123, None, "yesterday", "2025-10-20T10:30:45.123z"])


@st.composite
def data_for(draw, kind: str, canonical: bool):
    if kind == "event":
        levels = ["debug", "info", "warning", "error", "critical"] + ([] if canonical else ["WARN", "fatal", "loud", None])
        data = {"level": draw(st.sampled_from(levels)), "message": draw(texts)}
    elif kind == "metric":
        data = {"name": draw(st.sampled_from(["rows", "queue.depth", "é"] + ([] if canonical else ["", 5]))), "value": draw(numbers)}
        if draw(st.booleans()):
            data["unit"] = draw(st.sampled_from(["ms", None] + ([] if canonical else [3])))
        if draw(st.booleans()):
            data["tags"] = draw(st.dictionaries(st.sampled_from(["q", "host"]), texts if canonical else st.one_of(texts, st.integers()), max_size=2))
    elif kind == "progress":
        data = {
            "job_id": draw(st.sampled_from(["job-1", "job-2", "jöb"] + ([] if canonical else [7, ""]))),
            "percent": draw(st.floats(0, 100) if canonical else st.one_of(st.floats(-5, 105), st.integers(-5, 105))),
            "status": draw(st.sampled_from(["running", "done"])),
        }
    elif kind == "resource":
        data = draw(st.dictionaries(st.sampled_from(["cpu_percent", "rss_mb"]), st.one_of(st.none(), numbers) if canonical else st.one_of(numbers, texts), max_size=2))
    else:
        data = {"name": draw(st.sampled_from(["load", "parse"])), "phase": draw(st.sampled_from(["start", "end"] + ([] if canonical else ["middle"])))}
        if data["phase"] == "end":
            data["status"] = draw(st.sampled_from(["ok", "error"]))
            data["duration_ms"] = draw(st.floats(0, 1e6) if canonical else st.floats(-10, 10))
    return data


@st.composite
def messages(draw):
    canonical = draw(st.integers(0, 9)) < 7
    kind = draw(st.sampled_from(["event", "metric", "progress", "resource", "span"]))
    message = {"source": draw(st.sampled_from(["svc", "file-receiver", "db loader"] + ([] if canonical else ["ü", "", "x" * 201, 3])))}
    message["type"] = kind
    stamp = draw(canonical_stamps if canonical else st.one_of(canonical_stamps, odd_stamps))
    if stamp is not None or not canonical:
        if draw(st.integers(0, 4)):
            message["timestamp"] = stamp
    trace = draw(st.sampled_from([None, TRACE, OTHER_TRACE] + ([] if canonical else [TRACE.upper(), "12"])))
    if trace is not None:
        message["trace_id"] = trace
    if kind == "span" or draw(st.booleans()):
        message["span_id"] = draw(st.sampled_from(["00f067aa0ba902b7", "b7ad6b7169203331"] + ([] if canonical else ["00F067AA0BA902B7"])))
    if draw(st.booleans()):
        context = {}
        job = draw(st.sampled_from([None, "job-1", "job-2", 'j"b\u00e9'] + ([] if canonical else [7, ""])))
        if job is not None:
            context["job_id"] = job
        if draw(st.booleans()):
            context["seq"] = draw(st.integers(0, 10))
        message["context"] = context
    message["data"] = draw(data_for(kind, canonical))
    if draw(st.integers(0, 5)) == 0:
        message["attributes"] = draw(st.dictionaries(texts, st.one_of(numbers, texts, st.lists(st.booleans(), max_size=2)), max_size=2))
    if not canonical and draw(st.integers(0, 5)) == 0:
        message[draw(st.sampled_from(["received_at", "host", "trace_id", "context"]))] = None
    return message


chunks = st.lists(st.tuples(st.lists(messages(), min_size=1, max_size=6), st.sampled_from(["compact", "spaced"])), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks)
def test_native_path_gives_the_python_paths_lines_correlation_and_index(sequence):
    python, native = Side(native=False), Side(native=True)
    for batch, style in sequence:
        data = encode(batch, style)
        expected, expected_errors = python.feed(data)
        got, errors = native.feed(data)
        assert got == expected
        assert errors == expected_errors
    assert native.views() == python.views()
    event("chunks on the native path: " + ("2+" if native.native_chunks >= 2 else str(native.native_chunks)))


def test_generated_traffic_does_reach_the_native_path():
    # Guards the test above against a decoder that declines everything.
    side = Side(native=True)
    side.feed(encode([canonical_event(seq=i, trace_id=TRACE, context={"job_id": "job-1"}) for i in range(5)]))
    side.feed(encode([canonical_event(seq=5)], "spaced"))
    assert side.native_chunks == 2


# ---------------------------------------------------------------- what it declines

DECLINED = {
    "a level that is no alias": canonical_event(data={"level": "LOUD", "message": "m"}),
    "an upper-case trace id": canonical_event(trace_id=TRACE.upper()),
    "epoch milliseconds past 9999": canonical_event(timestamp=253402300800000),
    "an epoch integer from 2**53 on": canonical_event(timestamp=2**53),
    "a timestamp without an offset": canonical_event(timestamp="2025-10-20T12:30:45.123"),
    "a timestamp with a space for T": canonical_event(timestamp="2025-10-20 12:30:45.123Z"),
    "a timestamp an offset moves past 9999": canonical_event(timestamp="9999-12-31T23:30:00.000-01:00"),
    "a day that does not exist": canonical_event(timestamp="2023-02-29T00:00:00Z"),
    "a null optional key": canonical_event(trace_id=None),
    "an integer job id": canonical_event(context={"job_id": 7}),
    "an empty job id": canonical_event(context={"job_id": ""}),
    "received_at from the client": canonical_event(received_at="2025-01-01T00:00:00.000Z"),
    "a non-ASCII source": canonical_event(source="ü"),
    "an unknown type": canonical_event(type="log"),
    "a span without span_id": {"source": "s", "type": "span", "data": {"name": "n", "phase": "start"}},
}

DECLINED_BYTES = {
    "a duplicate key": b'{"source":"a","source":"b","type":"event","data":{"level":"info","message":"m"}}',
    "a duplicate data key": b'{"source":"a","type":"event","data":{"level":"info","level":"loud","message":"m"}}',
    "an escaped key": b'{"sour\\u0063e":"a","type":"event","data":{"level":"info","message":"m"}}',
    "a float orjson cannot read": b'{"source":"a","type":"event","data":{"level":"info","message":"m","x":1e400}}',
    "a \\u escape with a sign": b'{"source":"a","type":"event","data":{"level":"info","message":"\\u+12a"}}',
    "a lone surrogate": b'{"source":"a","type":"event","data":{"level":"info","message":"\\ud800"}}',
    "a blank line": b'{"source":"a","type":"event","data":{"level":"info","message":"m"}}\n',
    "two values on a line": b'{"source":"a","type":"event","data":{"level":"info","message":"m"}} {}',
    "invalid JSON": b'{"source":"a","type":"event","data":{"level":"info","message":"m"}',
    "a control byte in a string": b'{"source":"a","type":"event","data":{"level":"info","message":"a\tb"}}',
    "invalid UTF-8": b'{"source":"a","type":"event","data":{"level":"info","message":"\xff"}}',
    "nesting deeper than 128": b'{"source":"a","type":"event","data":{"level":"info","message":"m","x":' + b"[" * 200 + b"]" * 200 + b"}}",
}


def declined_lines(data: bytes, limit: int = 1 << 20):
    """The line numbers the native decoder declines in `data` (None: it took the chunk)."""
    declined = decode_natively(data, limit, DEFAULT_MAX_DEPTH).declined
    return [number for number, _start, _end in declined] if declined else None


NORMALISED = {
    "a level alias": (canonical_event(data={"level": "WARN", "message": "m"}), "level", "warning"),
    "a level in capitals": (canonical_event(data={"level": "Error", "message": "m"}), "level", "error"),
    "an offset": (canonical_event(timestamp="2025-10-20T12:30:45.123+02:00"), "timestamp", "2025-10-20T10:30:45.123Z"),
    "microseconds": (canonical_event(timestamp="2025-10-20T10:30:45.123987Z"), "timestamp", "2025-10-20T10:30:45.123Z"),
    "no fraction": (canonical_event(timestamp="2025-10-20T10:30:45Z"), "timestamp", "2025-10-20T10:30:45.000Z"),
    "epoch seconds": (canonical_event(timestamp=1760956245), "timestamp", "2025-10-20T10:30:45.000Z"),
    "epoch seconds with a fraction": (canonical_event(timestamp=1760956245.5), "timestamp", "2025-10-20T10:30:45.500Z"),
    "epoch milliseconds": (canonical_event(timestamp=1760956245123), "timestamp", "2025-10-20T10:30:45.123Z"),
    "negative epoch seconds": (canonical_event(timestamp=-1.25), "timestamp", "1969-12-31T23:59:58.750Z"),
    "an offset across a leap day": (canonical_event(timestamp="2024-03-01T00:30:00.5+01:00"), "timestamp", "2024-02-29T23:30:00.500Z"),
    "a negative offset across a year": (canonical_event(timestamp="2025-12-31T23:00:00.999-01:30"), "timestamp", "2026-01-01T00:30:00.999Z"),
}


@pytest.mark.parametrize("case", sorted(NORMALISED))
def test_the_common_forms_python_normalises_are_normalised_natively_alike(case):
    message, field, expected = NORMALISED[case]
    side, reference = Side(native=True), Side(native=False)
    got, _ = side.feed(encode([message]))
    assert side.native_chunks == 1
    assert got == reference.feed(encode([message]))[0]
    written = orjson.loads(got[0]["svc"][0])
    assert (written["data"] if field == "level" else written)[field] == expected


@st.composite
def rfc3339_texts(draw):
    moment = draw(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59, 999999)))
    fraction = draw(st.sampled_from(["", ".", ".5", ".12", ".123", ".1234", ".123456789"])) if draw(st.booleans()) else f".{moment.microsecond:06d}"
    minutes = draw(st.integers(-(24 * 60 - 1), 24 * 60 - 1))
    zone = "Z" if draw(st.booleans()) else f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + fraction + draw(st.sampled_from([zone, zone, "z", "+05", ""]))


epoch_numbers = st.one_of(
    st.integers(-(2**54), 2**54),
    st.integers(10**11, 253402300799999),
    st.floats(-1e15, 1e15),
    st.floats(1e11, 2.6e14),
    st.decimals(-1e12, 1e12, places=7, allow_nan=False, allow_infinity=False).map(float),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(rfc3339_texts(), epoch_numbers))
def test_a_timestamp_normalised_natively_is_pythons(text):
    side = Side(native=True)
    (lines, timestamps, _urgent), errors = side.feed(encode([canonical_event(timestamp=text)]))
    try:
        expected = normalise_timestamp(text)
    except MessageError:
        assert errors and not lines
    else:
        assert orjson.loads(lines["svc"][0])["timestamp"] == expected == timestamps["svc"][0]


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_messages_python_would_normalise_or_reject_are_declined(case):
    good = orjson.dumps(canonical_event())
    assert declined_lines(b"\n".join([good, orjson.dumps(DECLINED[case]), good])) == [1]


@pytest.mark.parametrize("case", sorted(DECLINED_BYTES))
def test_lines_python_would_treat_differently_are_declined(case):
    good = orjson.dumps(canonical_event())
    assert declined_lines(good + b"\n" + DECLINED_BYTES[case]) == ([2] if case == "a blank line" else [1])


json_fragments = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\u00e9", b"\\ud800", b"1e999", b"-0.5", b"null", b"\n", b" ", b"\xff", b"\x00",
                                  b'"source"', b'"type"', b'"event"', b'"data"', b'"level"', b'"info"', b'"message"', b'"context"', b'"job_id"'])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(json_fragments, max_size=60).map(b"".join)))
def test_arbitrary_bytes_are_declined_or_accepted_never_raised(data):
    decoded = decode_natively(data, 1 << 20, DEFAULT_MAX_DEPTH)
    assert all(0 <= start <= end <= len(data) for _number, start, end in decoded.declined)
    chunk = native_chunk(decoded, [])  # every declined line left out
    assert chunk is not None
    chunk.enrich(RECEIVED, HOST, TraceJobs(10))


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=3), st.data())
def test_a_valid_line_cut_anywhere_is_declined_or_equal_to_python(batch, data):
    # Truncations and single-byte changes of generated lines: whatever the native decoder
    # accepts must be what the Python path makes of the same bytes.
    line = bytearray(encode(batch)[:-1])
    position = data.draw(st.integers(1, len(line) - 1))  # the first byte says JSON lines
    if data.draw(st.booleans()):
        del line[position:]
    else:
        line[position] = data.draw(st.sampled_from(b'{}[]":,\\ 0e-.nx'))
    if line:
        got, _ = Side(native=True).feed(bytes(line) + b"\n")
        expected, _ = Side(native=False).feed(bytes(line) + b"\n")
        assert got == expected


def test_a_line_over_the_size_limit_is_declined():
    line = orjson.dumps(canonical_event(data={"level": "info", "message": "x" * 200}))
    assert declined_lines(line, len(line)) is None
    assert declined_lines(line, len(line) - 1) == [0]


def test_a_few_odd_lines_are_mended_and_the_chunk_stays_native():
    # Declined lines are decoded by Python one by one: a valid one comes back normalised, an
    # invalid one is dropped with its error (numbered as the Python path numbers it).
    side, reference = Side(native=True), Side(native=False)
    batch = [canonical_event(seq=0), DECLINED["an upper-case trace id"], canonical_event(seq=2), canonical_event(seq=3)]
    data = encode(batch)[:-1] + b"\n\n{broken\n" + encode([canonical_event(seq=4)])
    got, errors = side.feed(data)
    assert (got, errors) == reference.feed(data)
    assert side.native_chunks == 1
    assert errors == [("invalid_json", errors[0][1])] and errors[0][1].startswith("message 5: ")
    assert [orjson.loads(line).get("trace_id") for line in got[0]["svc"]] == [None, TRACE, None, None, None]


def test_mostly_odd_chunks_take_the_python_path():
    side = Side(native=True)
    side.feed(encode([DECLINED["a level that is no alias"], DECLINED["an upper-case trace id"], canonical_event()]))
    assert side.native_chunks == 0


# ---------------------------------------------------------------- splicing

@pytest.mark.parametrize("context", [None, {}, {"seq": 1}], ids=["no context", "empty context", "a context"])
def test_a_trace_gives_its_job_to_a_later_message_in_every_context_shape(context):
    side, reference = Side(native=True), Side(native=False)
    first = canonical_event(seq=0, trace_id=TRACE, context={"job_id": "job-9"})
    later = canonical_event(seq=1, trace_id=TRACE)
    if context is not None:
        later["context"] = context
    for chunk in ([first], [later]):
        got, _ = side.feed(encode(chunk))
        expected, _ = reference.feed(encode(chunk))
        assert got == expected
    assert orjson.loads(got[0]["svc"][0])["context"]["job_id"] == "job-9"
    assert side.native_chunks == 2


def test_a_message_without_timestamp_gets_the_receive_time_and_lines_keep_key_order():
    side = Side(native=True)
    message = canonical_event()
    del message["timestamp"]
    (lines, timestamps, _urgent), _ = side.feed(encode([message]))
    assert list(orjson.loads(lines["svc"][0])) == ["source", "type", "data", "received_at", "host", "timestamp"]
    assert timestamps["svc"] == [RECEIVED]


def test_error_events_mark_their_source_urgent():
    side = Side(native=True)
    (_lines, _timestamps, flags), _ = side.feed(encode([canonical_event("a"), canonical_event("b", data={"level": "error", "message": "x"})]))
    assert flags == {"a": (False, False), "b": (True, False)}


@pytest.mark.parametrize("native", [True, False])
def test_a_batch_knows_whether_an_aggregate_is_among_its_messages_on_both_paths(native):
    side = Side(native=native)
    point = {"source": "p", "type": "metric", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"name": "rows", "value": 1}}
    aggregate = {**point, "source": "a", "data": {**point["data"], "aggregation": {"count": 1}}}
    quoted = {**point, "source": "q", "data": {**point["data"], "tags": {"k": "\"aggregation\""}}}
    (lines, _timestamps, flags), errors = side.feed(encode([point, aggregate, point, quoted]))
    assert not errors and side.native_chunks == native
    assert {source: aggregates for source, (_urgent, aggregates) in flags.items()} == {"p": False, "a": True, "q": False}


def test_the_native_copies_of_the_constants_are_sidecar_constants():
    exported = native.constants()
    assert sorted(exported) == sorted(
        ["MESSAGE_TYPES", "LEVELS", "LEVEL_ALIASES", "URGENT_LEVELS", "ERROR_LEVELS", "MAX_SOURCE_LENGTH", "TRACE_ID_LENGTH", "SPAN_ID_LENGTH", "EPOCH_MS_THRESHOLD", "KEY_EVENTS_PER_SOURCE"]
    )
    for name, value in exported.items():
        assert value == getattr(constants, name), name


@given(st.binary(max_size=4096), st.integers(0, 4096))
def test_the_native_crc32_is_zlibs_so_a_disk_log_reads_the_same_with_either_build(data, split):
    from sidecar._native import crc32

    split = min(split, len(data))
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[split:], crc32(data[:split])) == zlib.crc32(data)
