"""S3 (and S3-compatible stores): one newline-delimited JSON object per batch, optionally gzipped.

Keys are `{prefix}{source}/YYYY/MM/DD/HH/<time>-<unique>.jsonl[.gz]`, partitioned by the hour the
batch's first message was received; `<unique>` is random, so keys never collide across restarts
or sidecars. Objects stay large because the machinery batches slowly for this type (20,000
messages, 8 MiB of lines or 60 s by default, see `delivery_defaults`); a batch whose encoding
still exceeds `max_object_size` (a `batch.max_bytes` set higher) is split into several objects.

boto3 is blocking: every call runs in a worker thread with one client per backend instance. A
batch keeps its keys until it is delivered, so a retry after a timeout overwrites the object the
timed-out attempt may have written instead of adding a second copy.
"""

import datetime as dt
import gzip
import logging
import re
import uuid
from typing import Literal

import attrs
import orjson
import trio

from sidecar.batch import Batch
from sidecar.backends import aws
from sidecar.backends.base import Backend, PartialDelivery, PermanentError, RetryableError
from sidecar.naming import safe_component
from sidecar.units import ByteSize, Duration

log = logging.getLogger("sidecar.backends.s3")

# Errors that no retry will fix until an operator acts: open the circuit at once.
_CONFIGURATION_ERRORS = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "NoSuchBucket", "InvalidBucketName", "PermanentRedirect",
    "AuthorizationHeaderMalformed", "AccountProblem", "InvalidBucketState", "KMS.AccessDeniedException",
}
_RECEIVED_AT = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z")


def _check_prefix(_instance, _attribute, prefix: str) -> None:
    if prefix.startswith("/") or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"prefix {prefix!r} must be relative, without . or .. segments")
    if not all(c.isascii() and c.isprintable() for c in prefix) or any(c in prefix for c in "\\{}"):
        raise ValueError(f"prefix {prefix!r} may hold printable ASCII only, without \\ {{ }}")


@attrs.frozen
class S3Settings:
    # Empty only on a backend definition whose rules all name their own bucket (as in the seed).
    bucket: str = ""
    region: str | None = None  # None: the usual chain (AWS_REGION, ~/.aws/config)
    prefix: str = attrs.field(default="", validator=_check_prefix)
    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    gzip: bool = False
    gzip_level: int = attrs.field(default=6, validator=[attrs.validators.ge(1), attrs.validators.le(9)])
    # An encoded batch larger than this (before compression) is written as several objects.
    max_object_size: ByteSize = attrs.field(default=8 * 1024 * 1024, validator=attrs.validators.ge(1024))
    storage_class: str | None = None
    connect_timeout: Duration = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    read_timeout: Duration = attrs.field(default=20.0, validator=attrs.validators.gt(0))


def _s3_error(code: str, status: int, text: str) -> Exception:
    if code in _CONFIGURATION_ERRORS or status in (401, 403):
        return RetryableError(text, trip_circuit=True)
    if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "RequestTimeTooSkewed"):
        return RetryableError(text)
    return PermanentError(text, reason=f"s3_{code}")


def _classify(exc: Exception, what: str) -> Exception | None:
    return aws.classify(exc, what, _s3_error)


def object_key(prefix: str, source: str, received_at: str, *, unique: str, gzipped: bool) -> str:
    """`{prefix}{source}/YYYY/MM/DD/HH/<time>-<unique>.jsonl[.gz]`; `source` comes from the wire
    and is reduced to one safe component, so it can neither add levels nor climb out of prefix."""
    match = _RECEIVED_AT.fullmatch(received_at or "")
    if match is None:
        now = dt.datetime.now(dt.timezone.utc)
        parts = (f"{now:%Y}", f"{now:%m}", f"{now:%d}", f"{now:%H}", f"{now:%M}", f"{now:%S}", f"{now.microsecond // 1000:03d}")
    else:
        parts = match.groups()
    year, month, day, hour, minute, second, millis = parts
    stamp = f"{year}{month}{day}T{hour}{minute}{second}{millis}Z"
    suffix = ".jsonl.gz" if gzipped else ".jsonl"
    return f"{prefix}{safe_component(source)}/{year}/{month}/{day}/{hour}/{stamp}-{unique}{suffix}"


def split_lines(lines: list[bytes], limit: int) -> list[tuple[int, int]]:
    """Ranges [start, end) of newline-terminated lines packed into payloads of at most `limit`
    bytes, in order; a single longer line is a payload of its own."""
    ranges: list[tuple[int, int]] = []
    start = 0
    size = 0
    for index, line in enumerate(lines):
        if index > start and size + len(line) > limit:
            ranges.append((start, index))
            start, size = index, 0
        size += len(line)
    if start < len(lines):
        ranges.append((start, len(lines)))
    return ranges


class S3Backend(Backend):
    type_name = "s3"
    Settings = S3Settings
    # Objects of up to 8 MiB: a batch is cut at 20,000 messages, 8 MiB of lines, or 60 s.
    delivery_defaults = {"batch": {"max_messages": 20_000, "timeout": 60.0, "max_bytes": 8 * 1024 * 1024}}

    def __init__(self, settings: S3Settings, *, label: str):
        super().__init__(settings, label=label)
        self._client = None
        # The batch being delivered and its planned objects [key, body, done, start, end] (a
        # range of the batch), kept across retries of that batch: a retry never writes twice.
        self._pending_batch: Batch | None = None
        self._pending_objects: list[list] = []

    async def open(self) -> None:
        if not self.settings.bucket:
            return  # reported per batch, so the messages are counted
        if self._client is None:
            # Building a client reads botocore's service models: seconds of CPU, off the loop.
            self._client = await trio.to_thread.run_sync(self._make_client)

    async def probe(self) -> None:
        """HeadBucket on the backend's bucket: the service answers and the bucket is there."""
        await self.open()
        if self.settings.bucket:
            await trio.to_thread.run_sync(self._head_bucket)

    def _head_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except Exception as exc:
            classified = _classify(exc, f"HeadBucket s3://{self.settings.bucket}")
            if classified is None:
                raise
            raise classified from exc

    def _make_client(self):
        return aws.make_client("s3", self.settings, _s3_error, s3={"addressing_style": self.settings.addressing_style})

    async def write_batch(self, source: str, batch: Batch) -> None:
        if not self.settings.bucket:
            raise PermanentError(f"no bucket configured for source {source!r} (set bucket on the backend or in the rule's config)", reason="no_bucket")
        if batch is not self._pending_batch:
            self._pending_batch = batch
            self._pending_objects = await trio.to_thread.run_sync(self._plan, source, batch)
        # Not abandoned on cancel: the client's own timeouts bound the wait, and an attempt never
        # races the retry that follows it.
        try:
            await trio.to_thread.run_sync(self._put_pending)
        except PermanentError as exc:
            written = [p for p in self._pending_objects if p[2]]
            unwritten = [p for p in self._pending_objects if not p[2]]
            self._pending_batch = None
            self._pending_objects = []
            if not written:
                raise
            # Some objects of a split batch are stored already: only the rest is dropped.
            rejected = {index: exc.reason for p in unwritten for index in range(p[3], p[4])}
            raise PartialDelivery(str(exc), rejected) from exc
        self._pending_batch = None
        self._pending_objects = []

    def _plan(self, source: str, batch: Batch) -> list[list]:
        settings = self.settings
        lines = [line + b"\n" for line in batch.lines]
        received_at = orjson.loads(batch.lines[0]).get("received_at", "") if len(batch) else ""
        planned = []
        for start, end in split_lines(lines, settings.max_object_size):
            payload = b"".join(lines[start:end])
            if settings.gzip:
                payload = gzip.compress(payload, compresslevel=settings.gzip_level, mtime=0)
            key = object_key(settings.prefix, source, received_at, unique=uuid.uuid4().hex, gzipped=settings.gzip)
            planned.append([key, payload, False, start, end])
        return planned

    def _put_pending(self) -> None:
        settings = self.settings
        extra = {"ContentType": "application/x-ndjson"}
        if settings.gzip:
            extra["ContentEncoding"] = "gzip"
        if settings.storage_class:
            extra["StorageClass"] = settings.storage_class
        for planned in self._pending_objects:
            key, body, done, _start, _end = planned
            if done:
                continue
            try:
                self._client.put_object(Bucket=settings.bucket, Key=key, Body=body, **extra)
            except Exception as exc:
                classified = _classify(exc, f"PutObject s3://{settings.bucket}/{key}")
                if classified is None:
                    raise
                raise classified from exc
            planned[2] = True

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await trio.to_thread.run_sync(client.close)
