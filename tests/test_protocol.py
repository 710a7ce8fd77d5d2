"""The sans-IO decoder: any chunking gives the same messages; no input raises out of it."""

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol import ProtocolViolation, StreamDecoder, StreamFormat

SOURCES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Zs")), min_size=1, max_size=20)

event_messages = st.fixed_dictionaries(
    {
        "source": SOURCES,
        "type": st.just("event"),
        "timestamp": st.just("2025-10-20T10:30:45.123Z"),
        "data": st.fixed_dictionaries({"level": st.sampled_from(["debug", "info", "warning", "error", "critical"]), "message": st.text(max_size=50)}),
    }
)
metric_messages = st.fixed_dictionaries(
    {
        "source": SOURCES,
        "type": st.just("metric"),
        "data": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=10), "value": st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)}),
    }
)
valid_messages = st.lists(event_messages | metric_messages, min_size=1, max_size=20)


def cuts(total: int):
    return st.lists(st.integers(0, total), max_size=12).map(lambda xs: sorted(set(xs)))


def feed(decoder: StreamDecoder, data: bytes, positions: list[int]):
    messages, errors = [], []
    start = 0
    for end in [*positions, len(data)]:
        got, bad = decoder.receive_data(data[start:end])
        messages.extend(got)
        errors.extend(bad)
        start = end
    got, bad = decoder.receive_eof()
    return messages + got, errors + bad


@given(valid_messages, st.data())
def test_json_lines_any_chunking_gives_the_same_messages(messages, data):
    stream = b"".join(orjson.dumps(m) + b"\n" for m in messages)
    positions = data.draw(cuts(len(stream)))
    decoded, errors = feed(StreamDecoder(), stream, positions)
    assert errors == []
    assert [m["source"] for m in decoded] == [m["source"] for m in messages]
    assert [m["data"] for m in decoded] == [m["data"] for m in messages]


@given(valid_messages, st.data())
def test_msgpack_any_chunking_gives_the_same_messages(messages, data):
    stream = b"".join(msgpack.packb(m) for m in messages)
    positions = data.draw(cuts(len(stream)))
    decoder = StreamDecoder()
    decoded, errors = feed(decoder, stream, positions)
    assert decoder.format is StreamFormat.MSGPACK
    assert errors == []
    assert [m["data"] for m in decoded] == [m["data"] for m in messages]


@given(st.binary(max_size=400), st.data())
@settings(max_examples=300)
def test_arbitrary_bytes_never_raise_anything_but_a_protocol_violation(blob, data):
    decoder = StreamDecoder(max_message_size=128)
    positions = data.draw(cuts(len(blob)))
    try:
        messages, errors = feed(decoder, blob, positions)
    except ProtocolViolation as violation:
        assert violation.reason in {"unknown_format", "invalid_msgpack", "too_large"}
    else:
        for message in messages:
            orjson.dumps(message)  # whatever got through is representable


@given(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=10), valid_messages)
def test_bad_json_lines_are_counted_and_good_ones_all_arrive(bad_lines, good):
    lines = [orjson.dumps(m) for m in good]
    mixed = []
    for i, line in enumerate(lines):
        mixed.append(line)
        if i < len(bad_lines):
            mixed.append(b"{" + bad_lines[i])  # starts like JSON, is not valid protocol
    decoded, errors = feed(StreamDecoder(), b"\n".join(mixed) + b"\n", [])
    assert [m["data"] for m in decoded] == [m["data"] for m in good]
    assert len(errors) == min(len(bad_lines), len(lines))


def test_errors_name_the_reason_and_the_field():
    decoder = StreamDecoder()
    lines = [
        b'{"source": "a", "type": "metric", "data": {"name": "x", "value": "12"}}',
        b'{"source": "a", "type": "gauge", "data": {}}',
        b'{"type": "event", "data": {"level": "info", "message": "m"}}',
        b'{"source": "a", "type": "event", "timestamp": "yesterday", "data": {"level": "info", "message": "m"}}',
        b'{"source": "a", "type": "event", "trace_id": "xyz", "data": {"level": "info", "message": "m"}}',
        b"[1, 2]",
        b'{"source": "a"',
    ]
    messages, errors = decoder.receive_data(b"\n".join(lines) + b"\n")
    assert messages == []
    assert [e.reason for e in errors] == ["invalid_field", "unknown_type", "missing_field", "invalid_timestamp", "invalid_field", "not_an_object", "invalid_json"]
    assert "data.value must be a number" in errors[0].detail
    assert errors[0].detail.startswith("message 1:")
    assert "trace_id must be 32 lowercase hex" in errors[4].detail


def test_oversize_json_line_is_skipped_to_its_newline_and_the_stream_goes_on():
    decoder = StreamDecoder(max_message_size=100)
    good = b'{"source": "a", "type": "event", "data": {"level": "info", "message": "ok"}}\n'
    huge = b'{"source": "a", "data": "' + b"x" * 500
    out = []
    errs = []
    for chunk in (good, huge[:150], huge[150:], b'"}\n' + good):
        m, e = decoder.receive_data(chunk)
        out += m
        errs += e
    assert len(out) == 2
    assert [e.reason for e in errs] == ["too_large"]


def test_crlf_line_endings_and_a_last_line_without_newline_are_accepted():
    decoder = StreamDecoder()
    line = b'{"source": "a", "type": "event", "data": {"level": "info", "message": "ok"}}'
    messages, errors = decoder.receive_data(line + b"\r\n" + line)
    assert len(messages) == 1 and errors == []
    messages, errors = decoder.receive_eof()
    assert len(messages) == 1 and errors == []


def test_unknown_format_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation) as caught:
        StreamDecoder().receive_data(b"GET / HTTP/1.1\r\n")
    assert caught.value.reason == "unknown_format"
    assert "0x47" in caught.value.detail


@pytest.mark.parametrize("start, named", [
    (msgpack.packb(["app.log", 1700000000, {"message": "hi"}]), "Fluent forward ([tag, time, record] or [tag, entries]): configure a source of type forward"),
    (msgpack.packb(["app.log", [[1700000000, {"message": "hi"}]]]), "a source of type forward (default port 24224)"),
    (b"<13>1 2026-12-03T10:00:00Z host app - - - hello", "syslog"),
    (b"<34>Dec  3 10:00:00 host app: hello", "syslog"),
    (b"POST /v1/traces HTTP/1.1\r\n", "OTLP/HTTP goes to a source of `type: otlp`"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "gRPC (an OTLP/gRPC exporter?), which is not a source type: send OTLP/HTTP"),
    (bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]), "TLS"),
    (b"hello", "neither '{' (JSON lines) nor a MessagePack map"),
])
def test_a_foreign_protocol_is_named_in_the_refusal(start, named):
    with pytest.raises(ProtocolViolation) as caught:
        StreamDecoder().receive_data(start)
    assert caught.value.reason == "unknown_format"
    assert named in caught.value.detail and "JSON lines or MessagePack maps" in caught.value.detail


def test_broken_msgpack_framing_keeps_what_came_before_and_then_stops():
    decoder = StreamDecoder()
    good = msgpack.packb({"source": "a", "type": "event", "data": {"level": "info", "message": "ok"}})
    with pytest.raises(ProtocolViolation) as caught:
        decoder.receive_data(good + b"\xc1")
    assert caught.value.reason == "invalid_msgpack"
    assert len(caught.value.messages) == 1
    with pytest.raises(ProtocolViolation):
        decoder.receive_data(good)


def test_oversize_msgpack_closes_the_stream():
    decoder = StreamDecoder(max_message_size=1000)
    big = msgpack.packb({"source": "a", "type": "event", "data": {"level": "info", "message": "x" * 5000}})
    with pytest.raises(ProtocolViolation) as caught:
        for i in range(0, len(big), 700):
            decoder.receive_data(big[i : i + 700])
    assert caught.value.reason == "too_large"


def test_msgpack_values_json_cannot_hold_are_rejected_per_message():
    decoder = StreamDecoder()
    bad = msgpack.packb({"source": "a", "type": "event", "data": {"level": "info", "message": "m"}, "context": {"blob": b"\x00\x01"}})
    good = msgpack.packb({"source": "a", "type": "event", "data": {"level": "info", "message": "m"}})
    messages, errors = decoder.receive_data(bad + good)
    assert len(messages) == 1
    assert [e.reason for e in errors] == ["invalid_field"]


@given(st.lists(st.sampled_from([b'{"a": 1}, {"b": 2}', b"1, 2", b"[1], [2]", b'{"x": 1} {"y": 2}', b"  ", b""]), min_size=1, max_size=4), valid_messages)
def test_a_line_holding_several_values_is_one_invalid_line_not_several_messages(odd_lines, good):
    """The chunk-as-array fast path must agree with line-by-line parsing."""
    lines = [orjson.dumps(m) for m in good] + odd_lines + [orjson.dumps(good[0])]
    stream = b"\n".join(lines) + b"\n"
    decoded, errors = feed(StreamDecoder(), stream, [])
    assert [m["data"] for m in decoded] == [m["data"] for m in good] + [good[0]["data"]]
    expected_errors = sum(1 for line in odd_lines if line.strip() and not line.startswith(b"{"))
    expected_errors += sum(1 for line in odd_lines if line.startswith(b"{"))
    assert len(errors) == expected_errors
    assert all(e.reason == "invalid_json" for e in errors)
