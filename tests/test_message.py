"""Validation and timestamp normalisation of single messages."""

import datetime as dt

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
