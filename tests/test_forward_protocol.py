"""The forward protocol's decoder without I/O: every mode, the mapping to the envelope, the
handshake, the limits; property tests over chunking, round trips and arbitrary bytes."""

import datetime as dt
import gzip
import hashlib
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.forward_protocol import (
    EnvelopeMapping,
    ForwardConnection,
    ForwardViolation,
    GzipError,
    SharedKeyAuth,
    gunzip,
    level_of,
)

MAPPING = EnvelopeMapping(fallback_source="fluent")


def event_time(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


def expected_timestamp(seconds: int, nanoseconds: int = 0) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanoseconds // 1_000_000:03d}Z"


def packed(entries) -> bytes:
    return b"".join(msgpack.packb(entry, use_bin_type=True) for entry in entries)


def str_packed_frame(tag: str, payload: bytes, option: dict | None = None) -> bytes:
    """PackedForward with the payload as a MessagePack str, as Fluentd's out_forward sends it
    (the bytes are not UTF-8: no packer writes that, so the header is written here)."""
    header = b"\xdb" + struct.pack(">I", len(payload))
    items = 3 if option is not None else 2
    return bytes([0x90 | items]) + msgpack.packb(tag) + header + payload + (msgpack.packb(option) if option is not None else b"")


def decode(stream: bytes, connection: ForwardConnection | None = None, pieces=None):
    """(messages, error reasons with counts, acks) of a whole stream, fed as `pieces`."""
    connection = connection or ForwardConnection(MAPPING)
    messages, errors, acks = [], [], []
    for piece in pieces or [stream]:
        received = connection.receive_data(piece)
        while True:
            messages += received.messages
            errors += [(e.reason, e.count, e.detail) for e in received.errors]
            acks += [msgpack.unpackb(a) for a in received.acks]
            if not connection.pending:
                break
            received = connection.receive_more()
    end = connection.receive_eof()
    errors += [(e.reason, e.count, e.detail) for e in end.errors]
    return messages, errors, acks


# -- the four modes ------------------------------------------------------------------------


def test_message_mode_with_event_time_and_an_ack():
    frame = msgpack.packb(["app.web", event_time(1700000000, 123_456_789), {"log": "hello", "level": "WARN", "pid": 7}, {"chunk": "p8n9gmxTQVC8/nh2wlKKeQ=="}])
    messages, errors, acks = decode(frame)
    assert messages == [{"source": "app.web", "type": "event", "timestamp": "2023-11-14T22:13:20.123Z", "data": {"level": "warning", "message": "hello", "pid": 7}}]
    assert errors == [] and acks == [{"ack": "p8n9gmxTQVC8/nh2wlKKeQ=="}]


def test_forward_mode_integer_and_float_times():
    frame = msgpack.packb(["app", [[1700000000, {"message": "a"}], [1700000001.25, {"message": "b"}]]])
    messages, errors, acks = decode(frame)
    assert [(m["timestamp"], m["data"]["message"]) for m in messages] == [("2023-11-14T22:13:20.000Z", "a"), ("2023-11-14T22:13:21.250Z", "b")]
    assert errors == [] and acks == []


def test_packed_forward_as_bin_and_as_str():
    entries = [[1700000000 + i, {"log": f"line {i}"}] for i in range(3)]
    as_bin = msgpack.packb(["p", packed(entries), {"size": 3, "chunk": "c1"}], use_bin_type=True)
    as_str = str_packed_frame("p", packed(entries), {"chunk": "c2"})
    messages, errors, acks = decode(as_bin + as_str)
    assert [m["data"]["message"] for m in messages] == ["line 0", "line 1", "line 2"] * 2
    assert errors == [] and acks == [{"ack": "c1"}, {"ack": "c2"}]


def test_compressed_packed_forward_of_several_gzip_members():
    entries = [[event_time(1700000000, i * 1_000_000), {"log": f"z{i}"}] for i in range(10)]
    payload = gzip.compress(packed(entries[:4])) + gzip.compress(packed(entries[4:]))
    frame = msgpack.packb(["gz", payload, {"compressed": "gzip", "size": 10, "chunk": "z"}], use_bin_type=True)
    messages, errors, acks = decode(frame)
    assert [m["data"]["message"] for m in messages] == [f"z{i}" for i in range(10)]
    assert messages[9]["timestamp"] == "2023-11-14T22:13:20.009Z"
    assert errors == [] and acks == [{"ack": "z"}]


def test_heartbeats_and_fluent_bits_metadata_time():
    frame = msgpack.packb(["fb", [[[1700000000, {"otlp": {}}], {"log": "with metadata"}]]])
    messages, errors, _ = decode(b"\xc0" + frame + b"\xc0")
    assert [m["data"]["message"] for m in messages] == ["with metadata"] and errors == []


# -- invalid entries cost themselves alone -------------------------------------------------


def test_invalid_entries_are_counted_by_reason_and_the_rest_arrive():
    entries = [
        [1700000000, {"log": "ok 1"}],
        [1700000000, "not a map"],
        ["yesterday", {"log": "bad time"}],
        [msgpack.ExtType(5, b"12345678"), {"log": "other ext"}],
        [1700000000, {"log": "ok 2", "raw": b"\xff\xfe"}],
        [1700000000],
        [1700000000, {"type": "metric", "data": {"name": "m"}}],  # an envelope without its value
        [1700000000, {"log": "ok 3", "nan": float("nan")}],
        [1700000000, {"log": "ok 4"}],
    ]
    frame = msgpack.packb(["t", entries, {"chunk": "k"}], use_bin_type=True)
    messages, errors, acks = decode(frame)
    assert [m["data"]["message"] for m in messages] == ["ok 1", "ok 4"]
    assert [reason for reason, _count, _detail in errors] == ["not_an_object", "invalid_timestamp", "invalid_timestamp", "invalid_utf8", "invalid_entry", "missing_field", "not_finite"]
    assert acks == [{"ack": "k"}]


def test_an_entry_the_unpacker_cannot_build_costs_only_itself():
    good = msgpack.packb([1700000000, {"log": "good"}])
    bad_utf8 = b"\x92" + msgpack.packb(1700000000) + b"\x81\xa3log\xa2\xff\xfe"
    array_key = b"\x92" + msgpack.packb(1700000000) + b"\x81\x91\x01\xa1x"
    forward = b"\x92" + msgpack.packb("t") + b"\x94" + good + bad_utf8 + array_key + good
    packed_forward = msgpack.packb(["t", good + bad_utf8 + array_key + good], use_bin_type=True)
    for frame in (forward, packed_forward):
        messages, errors, _ = decode(frame)
        assert [m["data"]["message"] for m in messages] == ["good", "good"]
        assert [reason for reason, _c, _d in errors] == ["invalid_utf8", "invalid_key"]


def test_a_packed_payload_that_breaks_costs_the_rest_of_it_not_the_connection():
    good = msgpack.packb([1700000000, {"log": "good"}])
    cut = msgpack.packb(["t", good + good[:-3]], use_bin_type=True)
    broken = msgpack.packb(["t", good + b"\xc1" + good], use_bin_type=True)
    messages, errors, _ = decode(cut + broken + msgpack.packb(["t", [[1, {"log": "after"}]]]))
    assert [m["data"]["message"] for m in messages] == ["good", "good", "after"]
    assert [reason for reason, _c, _d in errors] == ["truncated", "invalid_msgpack"]


def test_an_entry_nested_past_the_unpackers_stack_costs_itself_in_a_packed_payload():
    good = msgpack.packb([1700000000, {"log": "good"}])
    deep = b"\x92\x01" + b"\x91" * 1100 + b"\x01"
    messages, errors, _ = decode(msgpack.packb(["t", good + deep + good + good], use_bin_type=True))
    assert [m["data"]["message"] for m in messages] == ["good"] * 3
    assert [reason for reason, _c, _d in errors] == ["too_deep"]


def test_size_says_how_many_entries_are_lost():
    good = msgpack.packb([1700000000, {"log": "good"}])
    frame = msgpack.packb(["t", good + good, {"size": 5}], use_bin_type=True)
    _messages, errors, _ = decode(frame)
    assert [(reason, count) for reason, count, _d in errors] == [("missing_entries", 3)]


def test_bad_gzip_and_a_zip_bomb_cost_their_entries_and_the_connection_goes_on():
    bomb = gzip.compress(b"\x00" * 10_000_000)
    assert len(bomb) < 20_000
    connection = ForwardConnection(MAPPING, max_decompressed_size=1024 * 1024)
    frames = (
        msgpack.packb(["t", bomb, {"compressed": "gzip", "size": 7}], use_bin_type=True)
        + msgpack.packb(["t", b"not gzip at all", {"compressed": "gzip"}], use_bin_type=True)
        + msgpack.packb(["t", gzip.compress(packed([[1, {"log": "x"}]]))[:-4], {"compressed": "gzip"}], use_bin_type=True)
        + msgpack.packb(["t", 1, {"log": "still here"}])
    )
    messages, errors, _ = decode(frames, connection)
    assert [m["data"]["message"] for m in messages] == ["still here"]
    assert [(reason, count) for reason, count, _d in errors] == [("too_large", 7), ("invalid_gzip", 1), ("invalid_gzip", 1)]


def test_a_read_of_many_compressed_frames_comes_in_bounded_chunks():
    entries = [[1700000000, {"log": "x" * 1000}] for _ in range(100)]
    frame = msgpack.packb(["t", gzip.compress(packed(entries)), {"compressed": "gzip", "chunk": "c"}], use_bin_type=True)
    assert len(frame) < 2000  # 100 KB of entries each
    connection = ForwardConnection(MAPPING, chunk_size=256 * 1024)
    received = connection.receive_data(frame * 50)
    sizes = [len(received.messages)]
    acks = len(received.acks)
    while connection.pending:
        received = connection.receive_more()
        sizes.append(len(received.messages))
        acks += len(received.acks)
    assert sum(sizes) == 5000 and max(sizes) <= 300 and acks == 50  # three frames at most each


def test_gunzip_stops_at_its_limit():
    data = gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 1000)
    assert gunzip(data, 2000) == b"a" * 1000 + b"b" * 1000
    with pytest.raises(GzipError) as caught:
        gunzip(data, 1999)
    assert caught.value.reason == "too_large"


# -- broken frames close the connection ----------------------------------------------------


@pytest.mark.parametrize("stream, reason", [
    (b'{"source": "x"}\n', "unknown_format"),
    (b'["app", 1700000000, {"log": "json"}]', "unknown_format"),
    (msgpack.packb({"source": "x", "type": "event"}), "unknown_format"),
    (msgpack.packb(["t", [[1, {}]]]) + msgpack.packb(42), "not_an_array"),
    (msgpack.packb(["t"]), "invalid_frame"),
    (msgpack.packb(["t", 1, {}, {}, {}]), "invalid_frame"),
    (msgpack.packb(["t", 1]), "invalid_frame"),
    (msgpack.packb([7, [[1, {}]]]), "invalid_tag"),
    (msgpack.packb(["t", None, {}]), "unknown_mode"),
    (msgpack.packb(["t", {"a": 1}]), "unknown_mode"),
    (msgpack.packb(["t", [[1, {}]], "gzip"]), "invalid_option"),
    (msgpack.packb(["t", [[1, {}]]]) + b"\xc1", "invalid_msgpack"),
    (b"\x91" * 1100 + b"\x01", "too_deep"),
])
def test_a_broken_frame_is_a_violation_with_a_reason(stream, reason):
    connection = ForwardConnection(MAPPING)
    with pytest.raises(ForwardViolation) as caught:
        connection.receive_data(stream)
    assert caught.value.reason == reason
    with pytest.raises(ForwardViolation):
        connection.receive_data(msgpack.packb(["t", 1, {}]))  # and it stays broken


def test_a_frame_over_the_limit_closes_even_before_it_is_complete():
    connection = ForwardConnection(MAPPING, max_frame_size=1000)
    big = msgpack.packb(["t", [[1, {"log": "x" * 2000}]]])
    with pytest.raises(ForwardViolation) as caught:
        connection.receive_data(big[:1500])
    assert caught.value.reason == "too_large"


def test_frames_before_a_break_are_kept_in_the_violation():
    good = msgpack.packb(["t", 1, {"log": "before"}])
    with pytest.raises(ForwardViolation) as caught:
        ForwardConnection(MAPPING).receive_data(good + msgpack.packb(["t", None, {}]))
    assert [m["data"]["message"] for m in caught.value.messages] == ["before"]


def test_a_frame_cut_off_by_the_end_of_the_stream_is_truncated():
    frame = msgpack.packb(["t", [[1, {"log": "x"}]]])
    _messages, errors, _ = decode(frame[:-2])
    assert [reason for reason, _c, _d in errors] == ["truncated"]


# -- the mapping ---------------------------------------------------------------------------


def map_one(record: dict, tag: str = "app", mapping: EnvelopeMapping = MAPPING, time=1700000000) -> dict:
    messages, errors, _ = decode(msgpack.packb([tag, time, record], use_bin_type=True), ForwardConnection(mapping))
    assert not errors, errors
    return messages[0]


def test_an_envelope_record_is_taken_as_it_is():
    record = {"type": "metric", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"name": "queue_depth", "value": 3}, "trace_id": "A" * 32}
    assert map_one(record) == {"source": "app", "type": "metric", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"name": "queue_depth", "value": 3}, "trace_id": "a" * 32}
    own_source = map_one({"source": "billing", "type": "event", "data": {"level": "error", "message": "m"}})
    assert own_source["source"] == "billing" and own_source["timestamp"] == "2023-11-14T22:13:20.000Z"


def test_a_record_that_only_names_a_type_is_an_event():
    message = map_one({"type": "access", "log": "GET /"})
    assert message["type"] == "event" and message["data"] == {"level": "info", "message": "GET /", "type": "access"}


def test_docker_records_with_a_tag_prefix():
    mapping = EnvelopeMapping(fallback_source="fluent", tag_prefix="docker.")
    record = {"container_id": "abc", "container_name": "/web", "source": "stdout", "log": "started"}
    assert map_one(record, "docker.web", mapping) == {
        "source": "web", "type": "event", "timestamp": "2023-11-14T22:13:20.000Z",
        "data": {"level": "info", "message": "started", "container_id": "abc", "container_name": "/web", "source": "stdout"},
    }


def test_source_from_a_record_key_and_extra_into_context():
    mapping = EnvelopeMapping(fallback_source="fluent", source_from="service", extra_into="context", message_keys=("msg",))
    message = map_one({"service": "billing", "msg": "paid", "severity": "err", "job_id": 12}, "ignored", mapping)
    assert message == {"source": "billing", "type": "event", "timestamp": "2023-11-14T22:13:20.000Z", "data": {"level": "error", "message": "paid"}, "context": {"job_id": "12"}}
    assert map_one({"msg": "no service key"}, "the.tag", mapping)["source"] == "the.tag"


def test_sources_are_made_valid():
    assert map_one({"log": "x"}, "bad\x00tag\n")["source"] == "bad_tag_"
    assert map_one({"log": "x"}, "t" * 500)["source"] == "t" * 200
    assert map_one({"log": "x"}, "docker.", EnvelopeMapping(fallback_source="fluent", tag_prefix="docker."))["source"] == "fluent"


def test_message_and_level_keys():
    assert map_one({"message": {"nested": 1}})["data"] == {"level": "info", "message": '{"nested":1}'}
    assert map_one({"cpu": 3.5})["data"] == {"level": "info", "message": '{"cpu":3.5}', "cpu": 3.5}
    assert map_one({"log": "a", "message": "b", "level": "loud"})["data"] == {"level": "info", "message": "a", "_message": "b", "_level": "loud"}
    assert map_one({"log": "a", "severity": 3})["data"] == {"level": "error", "message": "a"}
    assert map_one({"log": "a", "bytes": b"text"})["data"]["bytes"] == "text"


@pytest.mark.parametrize("given, level", [("WARN", "warning"), ("Information", "info"), ("fatal", "critical"), ("emerg", "critical"), ("trace", "debug"), (0, "critical"), (4, "warning"), (7, "debug"), (8, None), (True, None), ("loud", None)])
def test_level_of(given, level):
    assert level_of(given) == level


# -- the handshake -------------------------------------------------------------------------


NONCE, AUTH_SALT, SALT = b"n" * 16, b"a" * 16, b"s" * 16


def ping(key: bytes, username: bytes = b"", password: bytes = b"", hostname: bytes = b"client.example") -> bytes:
    digest = hashlib.sha512(SALT + hostname + NONCE + key).hexdigest()
    password_digest = hashlib.sha512(AUTH_SALT + username + password).hexdigest() if username else ""
    return msgpack.packb(["PING", hostname.decode(), SALT, digest, username.decode(), password_digest], use_bin_type=True)


def handshaking(users: dict | None = None) -> ForwardConnection:
    return ForwardConnection(MAPPING, auth=SharedKeyAuth(b"secret", "sidecar.example", users or {}), nonce=NONCE, auth_salt=AUTH_SALT)


def test_the_handshake_with_the_right_key():
    connection = handshaking()
    assert msgpack.unpackb(connection.greeting()) == ["HELO", {"nonce": NONCE, "auth": b"", "keepalive": True}]
    received = connection.receive_data(ping(b"secret") + msgpack.packb(["t", 1, {"log": "after"}]))
    assert msgpack.unpackb(received.reply) == ["PONG", True, "", "sidecar.example", hashlib.sha512(SALT + b"sidecar.example" + NONCE + b"secret").hexdigest()]
    assert [m["data"]["message"] for m in received.messages] == ["after"]


def test_a_wrong_key_gets_pong_false_and_nothing_is_decoded():
    with pytest.raises(ForwardViolation) as caught:
        handshaking().receive_data(ping(b"wrong") + msgpack.packb(["t", 1, {"log": "never"}]))
    assert caught.value.reason == "auth_failed" and not caught.value.messages
    assert msgpack.unpackb(caught.value.reply) == ["PONG", False, "shared_key mismatch", "sidecar.example", ""]
    assert "secret" not in caught.value.detail


def test_users_need_their_password():
    users = {"alice": b"pw"}
    assert msgpack.unpackb(handshaking(users).receive_data(ping(b"secret", b"alice", b"pw")).reply)[:3] == ["PONG", True, ""]
    assert msgpack.unpackb(handshaking(users).greeting())[1]["auth"] == AUTH_SALT
    for username, password in ((b"alice", b"wrong"), (b"bob", b"pw"), (b"", b"")):
        with pytest.raises(ForwardViolation) as caught:
            handshaking(users).receive_data(ping(b"secret", username, password))
        assert msgpack.unpackb(caught.value.reply)[1:3] == [False, "username/password mismatch"]


def test_before_the_handshake_a_client_cannot_make_the_server_hold_much():
    connection = handshaking()
    with pytest.raises(ForwardViolation) as caught:
        connection.receive_data(msgpack.packb(["PING", "x" * 100_000])[:70_000])
    assert caught.value.reason == "too_large" and "before the handshake" in caught.value.detail


def test_events_before_the_handshake_are_refused():
    with pytest.raises(ForwardViolation) as caught:
        handshaking().receive_data(msgpack.packb(["t", 1, {"log": "too early"}]))
    assert caught.value.reason == "auth_required" and not caught.value.messages


# -- properties ----------------------------------------------------------------------------

keys = st.text(st.characters(codec="utf-8", categories=("L", "N")), min_size=1, max_size=8).filter(lambda k: k not in ("log", "message", "level", "severity", "type"))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
records = st.dictionaries(keys, scalars, max_size=4)
times = st.one_of(
    st.integers(0, 4_000_000_000).map(lambda s: (s, s, 0)),
    st.tuples(st.integers(0, 4_000_000_000), st.integers(0, 999_999_999)).map(lambda t: (event_time(*t), t[0], t[1])),
)
entries = st.lists(st.tuples(times, st.text(max_size=30), records), min_size=1, max_size=6)
MODES = ("message", "forward", "packed", "packed_str", "compressed")


def encode_frame(tag: str, mode: str, batch, chunk: str | None) -> bytes:
    option = {"chunk": chunk} if chunk else {}
    wire = [[time, {"log": text, **record}] for (time, _s, _n), text, record in batch]
    if mode == "message":
        return b"".join(msgpack.packb([tag, entry[0], entry[1], option] if option else [tag, *entry], use_bin_type=True) for entry in wire)
    if mode == "forward":
        return msgpack.packb([tag, wire, option] if option else [tag, wire], use_bin_type=True)
    if mode == "packed":
        return msgpack.packb([tag, packed(wire), {**option, "size": len(wire)}], use_bin_type=True)
    if mode == "packed_str":
        return str_packed_frame(tag, packed(wire), option or None)
    members = b"".join(gzip.compress(packed([entry])) for entry in wire)  # a member per entry
    return msgpack.packb([tag, members, {**option, "compressed": "gzip"}], use_bin_type=True)


frames = st.lists(st.tuples(st.sampled_from(["app", "docker.web", "a.b.c"]), st.sampled_from(MODES), entries, st.sampled_from([None, "c0", "c1"])), min_size=1, max_size=5)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_every_mode_round_trips(given_frames):
    stream = b"".join(encode_frame(tag, mode, batch, chunk) for tag, mode, batch, chunk in given_frames)
    messages, errors, acks = decode(stream)
    expected = []
    for tag, mode, batch, chunk in given_frames:
        for (_time, seconds, nanoseconds), text, record in batch:
            expected.append({"source": tag, "type": "event", "timestamp": expected_timestamp(seconds, nanoseconds), "data": {"level": "info", "message": text, **record}})
    assert errors == []
    assert messages == expected
    expected_acks = []
    for _tag, mode, batch, chunk in given_frames:
        if chunk:
            expected_acks += [{"ack": chunk}] * (len(batch) if mode == "message" else 1)
    assert acks == expected_acks


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.lists(st.integers(0, 10_000), max_size=12), st.booleans(), st.sampled_from([1, 200, 1 << 20]))
def test_any_split_of_the_stream_gives_the_same_result(given_frames, cuts, damaged, chunk_size):
    stream = b"".join(encode_frame(tag, mode, batch, chunk) for tag, mode, batch, chunk in given_frames)
    if damaged:  # an invalid entry in the middle, and a cut-off frame at the end
        stream += msgpack.packb(["t", [[1, "x"], [2, {"log": "y"}]]]) + msgpack.packb(["t", [[3, {"log": "z"}]]])[:-1]
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    assert decode(stream, ForwardConnection(MAPPING, chunk_size=chunk_size), pieces) == decode(stream)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5), st.booleans(), st.booleans())
def test_arbitrary_bytes_never_raise_anything_but_a_violation(data, cuts, with_auth, after_ping):
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    connection = handshaking() if with_auth else ForwardConnection(MAPPING, max_frame_size=256, chunk_size=64)
    if with_auth and after_ping:
        connection.receive_data(ping(b"secret"))
    try:
        for a, b in zip([0, *points], [*points, len(data)]):
            connection.receive_data(data[a:b])
            while connection.pending:
                connection.receive_more()
        connection.receive_eof()
    except ForwardViolation:
        pass


@settings(max_examples=200)
@given(st.lists(st.one_of(st.tuples(times, records).map(lambda t: [t[0][0], t[1]]), st.binary(max_size=20), st.integers(-(2**63), 2**64 - 1), st.lists(st.integers(-(2**63), 2**63), max_size=3)), max_size=8))
def test_a_forward_frame_of_anything_never_closes_the_connection(entries_):
    messages, errors, _ = decode(msgpack.packb(["t", entries_], use_bin_type=True) + msgpack.packb(["t", 1, {"log": "next"}]))
    assert messages[-1]["data"]["message"] == "next"
    assert len(messages) - 1 + sum(count for _r, count, _d in errors) == len(entries_)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_a_damaged_stream_never_raises_anything_but_a_violation(given_frames, flips):
    stream = bytearray(b"".join(encode_frame(tag, mode, batch, chunk) for tag, mode, batch, chunk in given_frames))
    for at, value in flips:
        stream[at % len(stream)] = value
    try:
        decode(bytes(stream))
    except ForwardViolation:
        pass
