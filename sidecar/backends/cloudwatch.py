"""CloudWatch Logs: each message one log event, in a group and stream named from templates.

A batch is partitioned by (group, stream) and then cut into PutLogEvents requests that obey the
service's limits (`plan_requests`, a pure function): at most 10,000 events and 1,048,576 bytes
(each event's UTF-8 message plus 26 bytes) per request, events sorted by timestamp, one request
spanning less than 24 hours. Events older than 14 days (or than the group's retention) or more
than 2 hours in the future would be refused by the service: they are dropped and counted, not
retried. An event over 256 KiB is truncated, marked as such, and logged.

Groups and streams are created when a write finds them missing, so a deleted stream comes back.
boto3 calls run in a worker thread on one client per backend; a batch remembers which of its
requests were accepted, so a retry resends only the rest and never duplicates events.
"""

import datetime as dt
import hashlib
import logging
import string
from collections.abc import Iterable

import attrs
import orjson
import trio

from sidecar.batch import Batch
from sidecar.backends import aws
from sidecar.backends.base import Backend, PartialDelivery, RetryableError
from sidecar.naming import HOST, PLACEHOLDERS, template_fields
from sidecar.units import ByteSize, Duration

log = logging.getLogger("sidecar.backends.cloudwatch")

MAX_REQUEST_EVENTS = 10_000
MAX_REQUEST_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024  # message bytes + EVENT_OVERHEAD
MAX_REQUEST_SPAN_MS = 24 * 3600 * 1000
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_FUTURE_MS = 2 * 3600 * 1000
# Events this close to the age or future limit are dropped too: a request may be retried for a
# while after it is planned, and clocks differ a little.
TIME_MARGIN_MS = 60 * 1000
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
_GROUP_CHARS = _NAME_CHARS | frozenset("/#")

_CIRCUIT_ERRORS = {
    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException",
    "ExpiredToken", "IncompleteSignature", "MissingAuthenticationToken", "NotAuthorized", "InvalidSignatureException",
    "SignatureDoesNotMatch", "LimitExceededException", "KMSInvalidStateException",
}
_RETRY_ERRORS = {"ThrottlingException", "Throttling", "ServiceUnavailableException", "OperationAbortedException", "InternalFailure", "RequestTimeout"}


# ---------------------------------------------------------------- names from templates


def safe_name_value(value: str) -> str:
    """A wire-controlled value reduced to `[A-Za-z0-9._-]`, at most 200 characters (a long value
    keeps a hash of the whole, so distinct long sources stay distinct)."""
    cleaned = "".join(c if c in _NAME_CHARS else "_" for c in value) or "_"
    if len(cleaned) > 200:
        cleaned = cleaned[:191] + "-" + hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cleaned


def _check_group(name: str) -> str | None:
    if not 1 <= len(name) <= 512 or not set(name) <= _GROUP_CHARS:
        return "log group names are 1-512 characters of A-Z a-z 0-9 . _ - / #"
    if name.startswith("aws/"):
        return "log group names starting with aws/ are reserved by AWS"
    return None


def _check_stream(name: str) -> str | None:
    if not 1 <= len(name) <= 512 or ":" in name or "*" in name or not name.isprintable():
        return "log stream names are 1-512 printable characters without : or *"
    return None


def _validate_template(checker, what: str):
    def validate(_instance, _attribute, template: str) -> None:
        template_fields(template, what)
        sample = template.format(**{p: "x" for p in PLACEHOLDERS})
        problem = checker(sample)
        if problem:
            raise ValueError(f"{what} {template!r}: {problem}")

    return validate


def _render(template: str, values: dict[str, str], checker) -> str:
    name = template.format(**values)
    if len(name) > 512:
        name = name[:503] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    # The template was checked with plain values and the values are reduced to safe characters,
    # so only an empty result can fail here.
    return name if checker(name) is None else "_"


# ---------------------------------------------------------------- settings


@attrs.frozen
class CloudWatchSettings:
    region: str | None = None  # None: the usual chain (AWS_REGION, ~/.aws/config)
    log_group: str = attrs.field(default="/monitoring-sidecar", validator=_validate_template(_check_group, "log_group"))
    log_stream: str = attrs.field(default="{source}", validator=_validate_template(_check_stream, "log_stream"))
    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL_CLOUDWATCH_LOGS / AWS_ENDPOINT_URL
    # Set on groups this backend creates; None leaves them at "never expire".
    retention_days: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.in_(RETENTION_DAYS)))
    max_event_size: ByteSize = attrs.field(default=MAX_EVENT_BYTES, validator=[attrs.validators.ge(1024), attrs.validators.le(MAX_EVENT_BYTES)])
    connect_timeout: Duration = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    read_timeout: Duration = attrs.field(default=20.0, validator=attrs.validators.gt(0))


# ---------------------------------------------------------------- the batch builder (pure)


@attrs.frozen
class LogEvent:
    index: int  # position in the delivered batch
    timestamp: int  # ms since the epoch
    message: str
    size: int  # UTF-8 bytes of message


@attrs.frozen
class PutRequest:
    group: str
    stream: str
    events: tuple[LogEvent, ...]

    @property
    def payload_size(self) -> int:
        """The size the service counts against MAX_REQUEST_BYTES."""
        return sum(e.size for e in self.events) + EVENT_OVERHEAD * len(self.events)


@attrs.frozen
class RequestPlan:
    requests: tuple[PutRequest, ...]
    rejected: dict  # batch index -> reason, for events the service would refuse
    truncated: tuple[int, ...]  # batch indexes whose message was cut to fit


def truncate_message(message: str, limit: int) -> str:
    """`message` cut so that its UTF-8 bytes plus EVENT_OVERHEAD fit in `limit`, never inside a
    character, ending in a marker that says how long the original was."""
    encoded = message.encode("utf-8", "surrogatepass")
    marker = f"...[truncated by monitoring-sidecar: {len(encoded)} bytes]"
    keep = limit - EVENT_OVERHEAD - len(marker.encode())
    return encoded[:keep].decode("utf-8", "ignore") + marker


def plan_requests(entries: Iterable[tuple[int, str, str, int, str]], now_ms: int, *, max_event_size: int = MAX_EVENT_BYTES, retention_days: int | None = None) -> RequestPlan:
    """PutLogEvents requests for `entries` of (batch index, group, stream, timestamp ms, message).

    Requests come per (group, stream) in order of first appearance, and within one in timestamp
    order (ties keep batch order). Each obeys every limit in this module's docstring."""
    oldest = now_ms - MAX_AGE_MS + TIME_MARGIN_MS
    if retention_days is not None:
        oldest = max(oldest, now_ms - retention_days * 86_400_000 + TIME_MARGIN_MS)
    newest = now_ms + MAX_FUTURE_MS - TIME_MARGIN_MS
    rejected: dict[int, str] = {}
    truncated: list[int] = []
    partitions: dict[tuple[str, str], list[LogEvent]] = {}
    for index, group, stream, timestamp, message in entries:
        if timestamp < oldest:
            rejected[index] = "too_old"
            continue
        if timestamp > newest:
            rejected[index] = "too_far_in_future"
            continue
        size = len(message.encode("utf-8", "surrogatepass")) if not message.isascii() else len(message)
        if size + EVENT_OVERHEAD > max_event_size:
            message = truncate_message(message, max_event_size)
            size = len(message.encode("utf-8", "surrogatepass"))
            truncated.append(index)
        partitions.setdefault((group, stream), []).append(LogEvent(index, timestamp, message, size))
    requests = []
    for (group, stream), events in partitions.items():
        events.sort(key=lambda e: e.timestamp)  # stable: ties keep their batch order
        current: list[LogEvent] = []
        current_bytes = 0
        for event in events:
            cost = event.size + EVENT_OVERHEAD
            if current and (
                len(current) >= MAX_REQUEST_EVENTS
                or current_bytes + cost > MAX_REQUEST_BYTES
                or event.timestamp - current[0].timestamp >= MAX_REQUEST_SPAN_MS
            ):
                requests.append(PutRequest(group, stream, tuple(current)))
                current, current_bytes = [], 0
            current.append(event)
            current_bytes += cost
        if current:
            requests.append(PutRequest(group, stream, tuple(current)))
    return RequestPlan(tuple(requests), rejected, tuple(truncated))


# ---------------------------------------------------------------- the backend


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def timestamp_ms(text: str) -> int | None:
    """RFC 3339 (as the sidecar normalises it) to ms since the epoch; None when unreadable."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def _logs_error(code: str, status: int, text: str) -> Exception:
    if code in _CIRCUIT_ERRORS or status in (401, 403):
        return RetryableError(text, trip_circuit=True)
    # Throttling, 5xx and anything unexpected: retried with backoff (and the circuit opens
    # after repeated failures). Refused events are handled per request, not here.
    return RetryableError(text, trip_circuit=code not in _RETRY_ERRORS and status < 500)


def _classify(exc: Exception, what: str) -> Exception | None:
    return aws.classify(exc, what, _logs_error)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class CloudWatchBackend(Backend):
    type_name = "cloudwatch"
    Settings = CloudWatchSettings

    def __init__(self, settings: CloudWatchSettings, *, label: str):
        super().__init__(settings, label=label)
        self._client = None
        self._fields = template_fields(settings.log_group, "log_group") | template_fields(settings.log_stream, "log_stream")
        self._per_message = bool(self._fields & {"type", "date"})
        self._names: dict[tuple, tuple[str, str]] = {}
        self.truncated = 0
        # The batch being delivered, its plan, and how many of the plan's requests the service
        # has accepted: kept across retries of that batch, so a retry resends only the rest.
        self._pending_batch: Batch | None = None
        self._pending_plan: RequestPlan | None = None
        self._pending_rejected: dict[int, str] = {}
        self._accepted = 0

    def names_for(self, source: str, kind: str = "", date: str = "") -> tuple[str, str]:
        """(log group, log stream) for these wire values, sanitised."""
        key = (source, kind, date)
        names = self._names.get(key)
        if names is None:
            values = {"source": safe_name_value(source), "type": safe_name_value(kind), "date": safe_name_value(date), "host": safe_name_value(HOST)}
            names = (_render(self.settings.log_group, values, _check_group), _render(self.settings.log_stream, values, _check_stream))
            if len(self._names) > 10_000:
                self._names.clear()
            self._names[key] = names
        return names

    async def open(self) -> None:
        if self._client is None:
            self._client = await trio.to_thread.run_sync(self._make_client)

    async def probe(self) -> None:
        """DescribeLogGroups for one group: the service answers and the credentials are good."""
        await self.open()
        await trio.to_thread.run_sync(self._describe_one_group)

    def _describe_one_group(self) -> None:
        try:
            self._client.describe_log_groups(limit=1)
        except Exception as exc:
            classified = _classify(exc, "DescribeLogGroups")
            if classified is None:
                raise
            raise classified from exc

    def _make_client(self):
        return aws.make_client("logs", self.settings, _logs_error)

    def plan(self, source: str, batch: Batch, now_ms: int) -> RequestPlan:
        """Each event is a message's JSON line as it is, at its timestamp; the messages are
        parsed only for names that use their fields ({type}, {date})."""
        default_names = None if self._per_message else self.names_for(source)
        messages = batch.messages() if self._per_message else None
        fallback = None
        entries = []
        last_text, last_ms = None, 0
        for index, (line, text) in enumerate(zip(batch.lines, batch.timestamps)):
            if text != last_text:
                last_text, last_ms = text, timestamp_ms(text)
                if last_ms is None:
                    fallback = fallback or timestamp_ms(orjson.loads(line).get("received_at")) or now_ms
                    last_ms = fallback
            group, stream = default_names or self.names_for(source, messages[index].get("type", ""), (text or "")[:10])
            entries.append((index, group, stream, last_ms, line.decode()))
        return plan_requests(entries, now_ms, max_event_size=self.settings.max_event_size, retention_days=self.settings.retention_days)

    def statistics(self) -> dict:
        return {"truncated_events": self.truncated}

    async def write_batch(self, source: str, batch: Batch) -> None:
        if batch is not self._pending_batch:  # a retry gets the same Batch
            now_ms = (dt.datetime.now(dt.timezone.utc) - _EPOCH) // dt.timedelta(milliseconds=1)
            plan = await trio.to_thread.run_sync(self.plan, source, batch, now_ms)
            self._pending_batch, self._pending_plan, self._pending_rejected, self._accepted = batch, plan, dict(plan.rejected), 0
            if plan.truncated:
                self.truncated += len(plan.truncated)
                log.warning(
                    "backend %s: truncated %d event(s) from %s over %d bytes (%d truncated so far)",
                    self.label, len(plan.truncated), source, self.settings.max_event_size, self.truncated,
                )
        # Not abandoned on cancel: the client's timeouts bound each call, and an abandoned call
        # that succeeded later would duplicate its events when the batch is retried.
        await trio.to_thread.run_sync(self._send_pending)
        rejected = self._pending_rejected
        self._pending_batch, self._pending_plan, self._pending_rejected = None, None, {}
        if rejected:
            reasons = sorted(set(rejected.values()))
            raise PartialDelivery(f"CloudWatch Logs refuses {len(rejected)} event(s) ({', '.join(reasons)})", rejected)

    def _send_pending(self) -> None:
        requests = self._pending_plan.requests
        while self._accepted < len(requests):
            request = requests[self._accepted]
            self._put(request)
            self._accepted += 1

    def _put(self, request: PutRequest) -> None:
        import botocore.exceptions as bex

        events = [{"timestamp": e.timestamp, "message": e.message} for e in request.events]
        where = f"PutLogEvents {request.group} / {request.stream}"
        try:
            try:
                response = self._client.put_log_events(logGroupName=request.group, logStreamName=request.stream, logEvents=events)
            except bex.ClientError as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise
                self._create(request.group, request.stream)
                response = self._client.put_log_events(logGroupName=request.group, logStreamName=request.stream, logEvents=events)
        except bex.ClientError as exc:
            if _error_code(exc) == "InvalidParameterException":
                # The service refuses these events as they are: dropped and counted, not retried.
                log.error("backend %s: %s refused %d event(s): %s", self.label, where, len(events), exc)
                for event in request.events:
                    self._pending_rejected[event.index] = "invalid_parameter"
                return
            classified = _classify(exc, where)
            raise classified from exc
        except Exception as exc:
            classified = _classify(exc, where)
            if classified is None:
                raise
            raise classified from exc
        self._record_refused(request, response.get("rejectedLogEventsInfo") or {})

    def _record_refused(self, request: PutRequest, info: dict) -> None:
        """Events the service accepted the request but not stored (clock or retention edges)."""
        events = request.events
        if "tooNewLogEventStartIndex" in info:
            for event in events[info["tooNewLogEventStartIndex"]:]:
                self._pending_rejected[event.index] = "too_far_in_future"
        if "tooOldLogEventEndIndex" in info:
            for event in events[: info["tooOldLogEventEndIndex"] + 1]:
                self._pending_rejected[event.index] = "too_old"
        if "expiredLogEventEndIndex" in info:
            for event in events[: info["expiredLogEventEndIndex"] + 1]:
                self._pending_rejected[event.index] = "expired_by_retention"

    def _create(self, group: str, stream: str) -> None:
        import botocore.exceptions as bex

        client = self._client
        try:
            client.create_log_group(logGroupName=group)
            log.info("backend %s: created log group %s", self.label, group)
            if self.settings.retention_days is not None:
                client.put_retention_policy(logGroupName=group, retentionInDays=self.settings.retention_days)
        except bex.ClientError as exc:
            if _error_code(exc) != "ResourceAlreadyExistsException":
                raise
        try:
            client.create_log_stream(logGroupName=group, logStreamName=stream)
            log.info("backend %s: created log stream %s in %s", self.label, stream, group)
        except bex.ClientError as exc:
            if _error_code(exc) != "ResourceAlreadyExistsException":
                raise

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await trio.to_thread.run_sync(client.close)
