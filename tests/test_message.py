"""Validation and timestamp normalisation of single messages."""

import datetime as dt
import re

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.message import MessageError, job_id_of, normalise_timestamp, validate_message

UTC = dt.timezone.utc
# Epoch numbers >= 1e11 are read as ms: 1e11 ms is 1973-03-03, so ms test values start after it.
moments = st.datetimes(min_value=dt.datetime(1974, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(UTC))


def canonical(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@given(moments, st.integers(-14 * 60, 14 * 60))
def test_rfc3339_with_any_offset_normalises_to_utc_milliseconds(moment, offset_minutes):
    local = moment.astimezone(dt.timezone(dt.timedelta(minutes=offset_minutes)))
    assert normalise_timestamp(local.isoformat()) == canonical(moment)


@given(moments)
def test_epoch_seconds_and_milliseconds_normalise_alike(moment):
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    millis = round(moment.timestamp() * 1000)
    assert normalise_timestamp(millis) == canonical(moment)
    assert normalise_timestamp(millis / 1000) == canonical(dt.datetime.fromtimestamp(millis / 1000, UTC))


def test_timestamp_forms():
    assert normalise_timestamp("2025-10-20T10:30:45.123Z") == "2025-10-20T10:30:45.123Z"
    assert normalise_timestamp("2025-10-20T12:30:45+02:00") == "2025-10-20T10:30:45.000Z"
    assert normalise_timestamp("2025-10-20T10:30:45.123456Z") == "2025-10-20T10:30:45.123Z"
    assert normalise_timestamp(1760956245) == "2025-10-20T10:30:45.000Z"
    assert normalise_timestamp(1760956245123) == "2025-10-20T10:30:45.123Z"
    assert normalise_timestamp(msgpack.Timestamp(1760956245, 123_000_000)) == "2025-10-20T10:30:45.123Z"
    for bad in ("2025-10-20T10:30:45", "tomorrow", True, [1], 10**30):
        with pytest.raises(MessageError) as caught:
            normalise_timestamp(bad)
        assert caught.value.reason == "invalid_timestamp"


CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
any_moment = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59, 999999))
any_offset = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)))


@given(st.one_of(
    st.builds(lambda moment, zone: moment.replace(tzinfo=zone).isoformat(), any_moment, any_offset),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.builds(msgpack.Timestamp, st.integers(-(2**63), 2**63 - 1), st.integers(0, 999_999_999)),
    st.text(max_size=40),
))
def test_any_timestamp_is_canonical_or_a_message_error(value):
    # Whatever a client sends, from the year 1 at +23:59 to a 2**63 s MessagePack timestamp:
    # the canonical form or MessageError, never an exception that would end the connection.
    try:
        canonical_form = normalise_timestamp(value)
    except MessageError as exc:
        assert exc.reason == "invalid_timestamp"
    else:
        assert CANONICAL.fullmatch(canonical_form), canonical_form


@pytest.mark.parametrize("value", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", msgpack.Timestamp(2**62, 0), msgpack.Timestamp(-(2**40), 0)])
def test_a_timestamp_out_of_range_in_utc_is_invalid(value):
    # Each raised OverflowError before, out of the decoder and the connection's task.
    with pytest.raises(MessageError) as caught:
        normalise_timestamp(value)
    assert caught.value.reason == "invalid_timestamp"


def test_early_years_keep_four_digits():
    assert normalise_timestamp("0005-03-01T00:00:00+00:00") == "0005-03-01T00:00:00.000Z"


def message(kind, data, **extra):
    return {"source": "svc", "type": kind, "data": data, **extra}


@pytest.mark.parametrize(
    "kind, data",
    [
        ("event", {"level": "info", "message": "m"}),
        ("metric", {"name": "rows", "value": 10, "unit": "count", "tags": {"db": "main"}}),
        ("metric", {"name": "file_valid", "value": 1}),
        ("progress", {"job_id": "job-1", "percent": 50, "status": "running"}),
        ("resource", {"cpu_percent": 12.5, "memory_mb": 200, "disk_io_mb": None}),
        ("span", {"name": "load", "phase": "start"}),
        ("span", {"name": "load", "phase": "end", "status": "success", "duration_ms": 12.5}),
    ],
)
def test_every_type_validates(kind, data):
    validate_message(message(kind, data, span_id="0123456789abcdef"))


@pytest.mark.parametrize(
    "kind, data, reason, field",
    [
        ("event", {"level": "loud", "message": "m"}, "invalid_field", "data.level"),
        ("event", {"level": "info"}, "missing_field", "data.message"),
        ("metric", {"name": "x", "value": True}, "invalid_field", "data.value"),
        ("metric", {"name": "x", "value": 1, "tags": {"a": 1}}, "invalid_field", "data.tags"),
        ("progress", {"job_id": "j", "percent": 101, "status": "s"}, "invalid_field", "data.percent"),
        ("resource", {"cpu_percent": "high"}, "invalid_field", "data.cpu_percent"),
        ("span", {"name": "x", "phase": "middle"}, "invalid_field", "data.phase"),
        ("span", {"name": "x", "phase": "end", "status": "ok", "duration_ms": -1}, "invalid_field", "data.duration_ms"),
    ],
)
def test_invalid_data_names_the_field(kind, data, reason, field):
    with pytest.raises(MessageError) as caught:
        validate_message(message(kind, data, span_id="0123456789abcdef"))
    assert caught.value.reason == reason
    assert field in caught.value.detail


def test_normalisation_in_place():
    m = message("event", {"level": "WARN", "message": "m"}, trace_id="0123456789ABCDEF0123456789ABCDEF", timestamp=1760956245, context={"job_id": 12345}, span_id=None)
    validate_message(m)
    assert m["data"]["level"] == "warning"
    assert m["trace_id"] == "0123456789abcdef0123456789abcdef"
    assert m["timestamp"] == "2025-10-20T10:30:45.000Z"
    assert m["context"]["job_id"] == "12345"
    assert "span_id" not in m


def test_source_must_be_printable_and_bounded():
    for bad in ("", "a\nb", "x" * 201, 7):
        with pytest.raises(MessageError):
            validate_message({"source": bad, "type": "event", "data": {"level": "info", "message": "m"}})


def test_span_messages_need_a_span_id():
    with pytest.raises(MessageError, match="span_id is required"):
        validate_message(message("span", {"name": "x", "phase": "start"}))


def test_job_of_a_message():
    assert job_id_of({"type": "event", "context": {"job_id": "j1"}}) == "j1"
    assert job_id_of({"type": "progress", "data": {"job_id": "j2"}}) == "j2"
    assert job_id_of({"type": "metric", "data": {}}) is None
