"""CloudWatch Logs without I/O: what its error codes mean, and requests planned ahead: names from templates, and a batch's events
cut into PutLogEvents requests that obey the service's limits (`plan_requests`): at most 10,000
events and 1,048,576 bytes (each event's UTF-8 message plus 26 bytes) per request, events
sorted by timestamp, one request spanning less than 24 hours. Events older than 14 days (or
than the group's retention) or more than 2 hours in the future would be refused by the
service: they are planned as rejected. An event over the size limit is truncated and marked."""

import hashlib
import string
from collections.abc import Iterable

import attrs

from sidecar.backends.base import RetryableError
from sidecar.batch import Batch
from sidecar.bounded import ForgetfulCache
from sidecar.message import epoch_ms
from sidecar.naming import HOST, LOG_GROUP, LOG_STREAM, PLACEHOLDERS, escaped, template_fields

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

_GROUP_CHARS = frozenset(string.ascii_letters + string.digits + "._-/#")

# ---------------------------------------------------------------- errors

_CIRCUIT_ERRORS = {
    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException",
    "ExpiredToken", "IncompleteSignature", "MissingAuthenticationToken", "NotAuthorized", "InvalidSignatureException",
    "SignatureDoesNotMatch", "LimitExceededException", "KMSInvalidStateException",
}
_RETRY_ERRORS = {"ThrottlingException", "Throttling", "ServiceUnavailableException", "OperationAbortedException", "InternalFailure", "RequestTimeout"}


def service_error(code: str, status: int, text: str) -> Exception:
    """What a service error code means to the delivery machinery."""
    if code in _CIRCUIT_ERRORS or status in (401, 403):
        return RetryableError(text, trip_circuit=True)
    # Throttling, 5xx and anything unexpected: retried with backoff (and the circuit opens
    # after repeated failures). Refused events are handled per request, not here.
    return RetryableError(text, trip_circuit=code not in _RETRY_ERRORS and status < 500)


def error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


# ---------------------------------------------------------------- names from templates


def check_group(name: str) -> str | None:
    if not 1 <= len(name) <= 512 or not set(name) <= _GROUP_CHARS:
        return "log group names are 1-512 characters of A-Z a-z 0-9 . _ - / #"
    if name.startswith("aws/"):
        return "log group names starting with aws/ are reserved by AWS"
    return None


def check_stream(name: str) -> str | None:
    if not 1 <= len(name) <= 512 or ":" in name or "*" in name or not name.isprintable():
        return "log stream names are 1-512 printable characters without : or *"
    return None


def validate_template(checker, what: str):
    def validate(_instance, _attribute, template: str) -> None:
        template_fields(template, what)
        sample = template.format(**{p: "x" for p in PLACEHOLDERS})
        problem = checker(sample)
        if problem:
            raise ValueError(f"{what} {template!r}: {problem}")

    return validate


def render_name(template: str, values: dict[str, str], checker) -> str:
    name = template.format(**values)
    if len(name) > 512:
        name = name[:503] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    # The template was checked with plain values and the values are escaped into characters
    # the name allows, so only an empty result can fail here.
    return name if checker(name) is None else "_"


# ---------------------------------------------------------------- settings


# ---------------------------------------------------------------- requests


class LogNames:
    """(log group, log stream) for a message's wire values, from the two templates, each value
    escaped into the characters its name allows (sidecar.naming), so distinct sources get
    distinct streams; remembered for the last 10,000 distinct values."""

    def __init__(self, group_template: str, stream_template: str):
        self.group_template = group_template
        self.stream_template = stream_template
        self.per_message = bool((template_fields(group_template, "log_group") | template_fields(stream_template, "log_stream")) & {"type", "date"})
        self._known = ForgetfulCache()

    def __call__(self, source: str, kind: str = "", date: str = "") -> tuple[str, str]:
        key = (source, kind, date)
        names = self._known.get(key)
        if names is None:
            wire = {"source": source, "type": kind, "date": date, "host": HOST}
            group = {field: escaped(value, LOG_GROUP) for field, value in wire.items()}
            stream = {field: escaped(value, LOG_STREAM) for field, value in wire.items()}
            names = (render_name(self.group_template, group, check_group), render_name(self.stream_template, stream, check_stream))
            self._known.remember(key, names)
        return names


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
    # EmfDocuments (without their text) of the events rendered with tags or statistics that
    # could not all be dimensions or metrics
    documents: tuple = ()


@attrs.define
class Sending:
    """A batch's plan, how many of its requests the service has accepted, and the events it
    refuses (an attempt's state)."""

    plan: RequestPlan
    rejected: dict[int, str]
    accepted: int = 0


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


def plan_batch(names: LogNames, source: str, batch: Batch, now_ms: int, render=None, **limits) -> RequestPlan:
    """A batch's requests: each event is a message's JSON line as it is, at its timestamp (or
    the batch's received_at, or now, when unreadable); the messages are parsed only for names
    that use their fields ({type}, {date}) or for `render`: (message, timestamp ms) -> an
    EmfDocument to send instead of the line, or None to keep it. `limits`: plan_requests' keywords."""
    default_names = None if names.per_message else names(source)
    messages = batch.messages() if names.per_message or render else None
    documents = []
    fallback = None
    entries = []
    last_text, last_ms = None, 0
    for index, (line, text) in enumerate(zip(batch.lines, batch.timestamps)):
        if text != last_text:
            last_text, last_ms = text, epoch_ms(text)
            if last_ms is None:
                fallback = fallback or epoch_ms(batch.received_at) or now_ms
                last_ms = fallback
        group, stream = default_names or names(source, messages[index].get("type", ""), (text or "")[:10])
        document = render(messages[index], last_ms) if render else None
        if document is not None and (document.not_dimensions or document.left_out or document.not_metrics):
            documents.append(attrs.evolve(document, text=""))  # what was not placed; the text is in the event
        entries.append((index, group, stream, last_ms, line.decode() if document is None else document.text))
    return attrs.evolve(plan_requests(entries, now_ms, **limits), documents=tuple(documents))


def refused_by_service(request: PutRequest, info: dict) -> dict[int, str]:
    """Events of an accepted request that the service did not store (clock or retention edges),
    from its `rejectedLogEventsInfo`: batch index -> reason."""
    rejected: dict[int, str] = {}
    events = request.events
    if "tooNewLogEventStartIndex" in info:
        for event in events[info["tooNewLogEventStartIndex"]:]:
            rejected[event.index] = "too_far_in_future"
    if "tooOldLogEventEndIndex" in info:
        for event in events[: info["tooOldLogEventEndIndex"] + 1]:
            rejected[event.index] = "too_old"
    if "expiredLogEventEndIndex" in info:
        for event in events[: info["expiredLogEventEndIndex"] + 1]:
            rejected[event.index] = "expired_by_retention"
    return rejected
