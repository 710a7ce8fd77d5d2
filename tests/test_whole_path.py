"""Hypothesis over the whole path, bytes in to routed lines out, on both decode paths.

Values at their extremes (any field as any JSON value, years 1 and 9999, durations up to 1e308, integers of any size, NaN
and infinities in MessagePack, nesting from 1 to 2,000 levels, every MessagePack type as a key
and as a value), in any chunking. Whatever comes in: nothing raises, every message is either
accepted or rejected with a reason (never `internal_error`), every routed line is JSON within
the nesting limit, every view renders, and for JSON lines the native and Python paths route the
same lines and report the same reasons.
"""

import json
import math
import struct

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sidecar.protocol import NATIVE_AVAILABLE

from tests.whole_path import WholePath, check_outcome

TRACES = ["0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210", "0123456789ABCDEF0123456789ABCDEF"]
SPANS = ["0123456789abcdef", "1111111111111111"]
EXTREME_TIMES = st.sampled_from(
    [
        "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z", "2026-12-02T07:00:00.000Z", "0001-01-01T00:30:00+01:00",
        "9999-12-31T23:30:00-01:00", "0000-01-01T00:00:00.000Z", "2026-02-29T00:00:00.000Z", "2024-02-29T23:59:59.999Z",
        "2026-13-01T00:00:00.000Z", "2026-12-02T24:00:00.000Z", "2026-12-31T23:59:60.000Z", -62135596800, 253402300799, 253402300800, 0, -1, 1e308, -1e308, 2**63, 1764658800123,
    ]
)
EXTREME_NUMBERS = st.one_of(
    st.integers(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 1.7976931348623157e308, 5e-324, 2**53 + 1, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), EXTREME_NUMBERS, st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=8)


@st.composite
def messages(draw) -> dict:
    kind = draw(st.sampled_from(["event", "metric", "progress", "resource", "span", "span"]))
    if kind == "event":
        data = {"level": draw(st.sampled_from(["info", "ERROR", "warn", "critical", "loud"])), "message": draw(st.text(max_size=10))}
    elif kind == "metric":
        data = {"name": draw(st.sampled_from(["rows", "rows_in", "x"])), "value": draw(EXTREME_NUMBERS), "tags": draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))}
    elif kind == "progress":
        data = {"job_id": draw(st.sampled_from(["job-1", "job-2", 7])), "percent": draw(st.one_of(EXTREME_NUMBERS, st.floats(0, 100))), "status": "running"}
    elif kind == "resource":
        data = {"cpu_percent": draw(EXTREME_NUMBERS), "memory_mb": draw(st.one_of(st.none(), EXTREME_NUMBERS))}
    else:
        data = {"name": "work", "phase": draw(st.sampled_from(["start", "end", "end"]))}
        if data["phase"] == "end":
            data["status"] = "ok"
            data["duration_ms"] = draw(st.one_of(st.floats(0, 1.7976931348623157e308), st.integers(0, 2**70), st.sampled_from([1e20, 6.4e13, 1e15, 1.7976931348623157e308])))
    message = {"source": draw(st.sampled_from(["a", "b", "svc-é"])), "type": kind, "timestamp": draw(EXTREME_TIMES), "data": data}
    if draw(st.booleans()):
        message["trace_id"] = draw(st.sampled_from(TRACES))
    if kind == "span" or draw(st.booleans()):
        message["span_id"] = draw(st.sampled_from(SPANS))
    if draw(st.booleans()):
        message["context"] = {"job_id": draw(st.sampled_from(["job-1", "job-2", 3]))}
    if draw(st.booleans()):
        data["extra"] = draw(JSON_VALUES)
    if draw(st.integers(0, 3)) == 0:
        # Any field, the type and the level too, as any JSON value: an object where a string goes
        # is unhashable, and must be a reason, not an internal_error.
        where = draw(st.sampled_from([message, data]))
        where[draw(st.sampled_from(sorted(where)))] = draw(JSON_VALUES)
    return message


def nest(depth: int) -> bytes:
    return b"[" * depth + b"0" + b"]" * depth


@st.composite
def json_lines(draw) -> bytes:
    """Lines as SDKs and hostile peers write them: compact, spaced with escapes, nested deep."""
    lines = []
    for message in draw(st.lists(messages(), min_size=1, max_size=12)):
        style = draw(st.sampled_from(["compact", "compact", "spaced"]))
        # The stdlib encoder, since orjson refuses integers beyond 64 bits, which JSON allows.
        line = json.dumps(message, ensure_ascii=style == "spaced", separators=(",", ":") if style == "compact" else (", ", " : ")).encode()
        depth = draw(st.one_of(st.just(0), st.integers(1, 70), st.integers(250, 260), st.integers(1020, 2000)))
        if depth:
            line = line[:-1] + b',"deep":' + nest(depth) + b"}"
        lines.append(line)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from([b"", b"   ", b"{", b"[1]", b'{"source":NaN}', b'{"a":1e400}', b"\xff\xfe"])))
    return b"\n".join(lines) + b"\n"


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole-path")
    return WholePath(workdir, native=False), WholePath(workdir, native=NATIVE_AVAILABLE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(data=json_lines(), cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_json_lines_take_the_whole_path_alike_on_both_decode_paths(paths, data, cuts):
    python, native = paths
    chunks = chunked(data, cuts)
    by_python = python.run(chunks)
    check_outcome(by_python)
    lines = [line for line in data.split(b"\n") if line.strip()]
    assert by_python.accepted + len(by_python.errors) == len(lines)
    assert by_python.violation is None
    by_native = native.run(chunks)
    check_outcome(by_native)
    normalised = {label: [orjson.loads(line) for line in lines] for label, lines in by_python.lines.items()}
    assert {label: [orjson.loads(line) for line in lines] for label, lines in by_native.lines.items()} == normalised
    assert [reason for reason, _ in by_native.errors] == [reason for reason, _ in by_python.errors]
    assert by_native.views == by_python.views


# ---------------------------------------------------------------- MessagePack, built by hand

def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def packed_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A map from packed keys and values, whatever their types (Python dicts cannot hold a map
    as a key, MessagePack can)."""
    header = bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + len(pairs).to_bytes(2, "big")
    return header + b"".join(key + value for key, value in pairs)


def packed_array(items: list[bytes]) -> bytes:
    return bytes([0x90 | len(items)]) + b"".join(items)


MP_SCALARS = st.one_of(
    st.integers(-(2**63), 2**64 - 1).map(packed),
    st.floats(allow_nan=True, allow_infinity=True).map(packed),
    st.floats(width=32).map(lambda f: b"\xca" + struct.pack(">f", f)),
    st.text(max_size=6).map(packed),
    st.binary(max_size=6).map(packed),
    # nil, false, true, invalid UTF-8, an ext, a timestamp, a timestamp of a wrong length, an empty ext
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3", b"\xa2\xff\xfe", b"\xd4\x05\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xd4\xff\x00", b"\xc7\x00\x05"]),
)
MP_VALUES = st.recursive(
    MP_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(packed_array), st.lists(st.tuples(inner, inner), max_size=3).map(packed_map)),
    max_leaves=8,
)


def packed_or_none(value) -> bytes | None:
    try:
        return packed(value)
    except (OverflowError, TypeError, ValueError):  # integers beyond 64 bits: JSON's, not MessagePack's
        return None


@st.composite
def msgpack_stream(draw) -> tuple[bytes, int]:
    """Messages whose envelope may be valid, each with a free-form value of any MessagePack type
    (keys of any type too) nested up to 2,000 levels; the stream and its message count."""
    parts = []
    count = draw(st.integers(1, 10))
    for _ in range(count):
        pairs = []
        for key, value in draw(messages()).items():
            if key == "data" and isinstance(value, dict):
                inner = [(packed(k), packed_or_none(v)) for k, v in value.items()]
                pairs.append((packed("data"), packed_map([(k, v) for k, v in inner if v is not None])))
            elif packed_or_none(value) is not None:
                pairs.append((packed(key), packed(value)))
        extra = draw(MP_VALUES)
        depth = draw(st.one_of(st.just(0), st.integers(60, 70), st.integers(1020, 2000)))
        if depth:
            extra = b"\xdc\x00\x01" + b"\x91" * (depth - 1) + extra
        pairs.append((draw(st.one_of(st.just(packed("extra")), MP_SCALARS)), extra))
        parts.append(packed_map(pairs))
    return b"".join(parts), count


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(stream=msgpack_stream(), cuts=st.lists(st.integers(0, 10**6), max_size=4), truncate=st.booleans())
def test_any_msgpack_value_costs_at_most_its_own_message(paths, stream, cuts, truncate):
    data, count = stream
    if truncate:
        data = data[:-1]
    outcome = paths[0].run(chunked(data, cuts))
    check_outcome(outcome)
    assert outcome.violation is None, outcome.errors[-1:]
    assert outcome.accepted + len(outcome.errors) == count
    for line in outcome.lines["everything"]:
        assert b"NaN" not in line and b"Infinity" not in line


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 10**6), max_size=3), first=st.sampled_from([b"{", b"\x81", b"\x85", b"\xde\x00\x01", b""]))
def test_arbitrary_bytes_never_raise_out_of_the_whole_path(paths, data, cuts, first):
    for path in paths:
        outcome = path.run(chunked(first + data, cuts))
        check_outcome(outcome)


def test_a_nan_duration_and_year_1_span_go_through_the_whole_path(paths):
    line = {"source": "a", "type": "span", "timestamp": "0001-01-01T00:00:00.000Z", "trace_id": TRACES[0], "span_id": SPANS[0],
            "data": {"name": "x", "phase": "end", "status": "ok", "duration_ms": 1}}
    outcome = paths[1].run([orjson.dumps(line) + b"\n"])
    check_outcome(outcome)
    assert outcome.accepted == 1 and any("a:" in view for view in outcome.views)
    nan = msgpack.packb({**line, "data": {**line["data"], "duration_ms": math.nan}})
    outcome = paths[0].run([nan])
    assert [reason for reason, _ in outcome.errors] == ["not_finite"]


# ---------------------------------------------------------------- the config loader

YAML_PIECES = st.sampled_from(
    [
        "svc:\n", "  - backend: files\n", "    filter: {types: [event]}\n", "    config: {path: '{source}.jsonl'}\n", "default:\n",
        "  - ", "[", "]", "{", "}", ": ", "- ", "&a ", "*a ", "!!python/object:os.system ", "<<: *a\n", "'", '"', "\t", "${HOME}",
        "? ", "---\n", "...\n", "%YAML 1.1\n", "|\n", ">\n", "  ", "\n", "enabled: maybe\n", "priority: 1e400\n", "\x00", "\ufeff",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(YAML_PIECES, st.text(max_size=5)), max_size=30), depth=st.one_of(st.just(0), st.integers(1, 3000)))
def test_no_drop_in_makes_the_loader_raise_anything_but_a_config_error(tmp_path_factory, pieces, depth):
    from sidecar.config import ConfigError, load_config

    workdir = tmp_path_factory.mktemp("config")
    routes = workdir / "routes.d"
    routes.mkdir()
    main = workdir / "sidecar.yaml"
    main.write_text("backends:\n  files: {type: filesystem, base_path: /tmp}\n")
    text = "".join(pieces)
    if depth:
        text += "deep: " + "[" * depth + "]" * depth + "\n"
    (routes / "50-fuzz.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(main, routes, {})
    except ConfigError as exc:
        assert all(str(problem).startswith(str(routes / "50-fuzz.yaml") + ":") for problem in exc.problems), exc.problems


@pytest.mark.parametrize(
    "text, line",
    [("? \n  - backend: files\n", 2), ("? - backend: files\n", 1), ("a: &x [1]\n? *x\n: 2\n", 2), ("{[1]: 2}\n", 1), ("svc:\n  {a: 1}: x\n", 2)],
)
def test_a_mapping_or_list_as_a_key_is_invalid_yaml_at_its_line(tmp_path, text, line):
    # Found by the test above: ruamel raises TypeError (unhashable) composing such a key.
    from sidecar.config import ConfigError, load_config

    (tmp_path / "routes.d").mkdir()
    (tmp_path / "sidecar.yaml").write_text("backends:\n  files: {type: filesystem, base_path: /tmp}\n")
    (tmp_path / "routes.d" / "50-key.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "sidecar.yaml", tmp_path / "routes.d", {})
    assert [str(p) for p in caught.value.problems] == [f"{tmp_path / 'routes.d' / '50-key.yaml'}:{line}: invalid YAML: a key must be a string or a number, not a mapping or a list"]


# ---------------------------------------------------------------- the second guard: a bug costs its chunk

GOOD = b'{"source":"a","type":"event","timestamp":"2026-12-02T07:00:00.000Z","trace_id":"%s","data":{"level":"info","message":"m"}}\n' % TRACES[0].encode()


def test_a_bug_met_while_decoding_a_chunk_costs_that_chunk_alone(paths, monkeypatch, caplog):
    from sidecar.protocol import StreamDecoder

    calls = []

    def buggy(self, complete, errors):
        calls.append(len(calls))
        if len(calls) == 1:
            raise KeyError("a bug")
        return original(self, complete, errors) if self.native else None  # None: the Python path

    original = StreamDecoder._decode_natively
    monkeypatch.setattr(StreamDecoder, "_decode_natively", buggy)
    monkeypatch.setattr(StreamDecoder, "_parse_as_array", lambda self, complete, messages, errors: buggy(self, complete, errors) and False)
    outcome = paths[1].run([GOOD * 3, GOOD * 2])
    assert [(reason, detail.split(":")[0]) for reason, detail in outcome.errors] == [("internal_error", "messages 1-3")]
    assert outcome.accepted == 2 and len(outcome.lines["everything"]) == 2
    assert outcome.violation is None


def test_a_bug_met_while_indexing_costs_the_view_not_the_messages(paths, monkeypatch):
    from sidecar.jobs import LiveIndex

    def broken(self, chunk):
        raise OverflowError("a bug in the index")

    monkeypatch.setattr(LiveIndex, "add_summaries", broken)
    outcome = paths[1].run([GOOD * 3])
    assert outcome.accepted == 3 and len(outcome.lines["everything"]) == 3
    assert outcome.counters["view_errors_total[]"] == 1
    assert outcome.errors == ()


def test_a_bug_met_while_enriching_costs_that_chunk_counted(paths, monkeypatch):
    from sidecar.correlator import Correlator

    monkeypatch.setattr(Correlator, "enrich", lambda self, received_at, messages: 1 / 0)
    outcome = paths[0].run([GOOD * 3])
    assert outcome.accepted == 3 and outcome.lines["everything"] == []
    assert outcome.counters["correlator_dropped_messages_total[('reason', 'internal_error')]"] == 3
