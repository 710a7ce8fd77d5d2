"""S3 (and S3-compatible stores): one newline-delimited JSON object per batch, optionally gzipped.

Keys (`s3_layout.object_key`) are partitioned by the hour the batch's first message was received
and end in a random part, so they never collide across restarts or sidecars. Objects stay large because the machinery batches slowly for this type (20,000
messages, 8 MiB of lines or 60 s by default, see `delivery_defaults`); a batch whose encoding
still exceeds `max_object_size` (a `batch.max_bytes` set higher) is split into several objects.

boto3 is blocking: every call runs in a worker thread (`run_blocking`) with one client per
backend instance. A batch's planned objects are its attempt's state: a retry writes only those
not yet stored, under the same keys, so an object a timed-out try may have written is
overwritten, not stored twice.
"""

import gzip
import uuid
from typing import Literal

import attrs

from sidecar.batch import Batch
from sidecar.backends import aws
from sidecar.backends.base import Attempt, Backend, PartialDelivery, PermanentError, Place, RetryableError
from sidecar.backends.s3_layout import check_prefix, object_key, source_prefix, split_lines
from sidecar.message import format_timestamp
from sidecar.units import ByteSize, Duration

# Errors that no retry will fix until an operator acts: open the circuit at once.
_CONFIGURATION_ERRORS = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "NoSuchBucket", "InvalidBucketName", "PermanentRedirect",
    "AuthorizationHeaderMalformed", "AccountProblem", "InvalidBucketState", "KMS.AccessDeniedException",
}


@attrs.frozen
class S3Settings:
    # Empty only on a backend definition whose rules all name their own bucket (as in the seed).
    bucket: str = ""
    region: str | None = None  # None: the usual chain (AWS_REGION, ~/.aws/config)
    prefix: str = attrs.field(default="", validator=check_prefix)
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


@attrs.define
class PlannedObject:
    key: str
    body: bytes
    start: int  # the batch's messages [start, end) it holds
    end: int
    stored: bool = False


def object_place(settings: S3Settings, source: str, _kind: str, moment) -> Place:
    at = f" at {settings.endpoint_url}" if settings.endpoint_url else ""
    key = object_key(settings.prefix, source, format_timestamp(moment), unique="<uuid>", gzipped=settings.gzip)
    return Place(f"s3://{settings.bucket}/{source_prefix(settings.prefix, source)}{at}", f"s3://{settings.bucket}/{key}")


class S3Backend(Backend):
    type_name = "s3"
    Settings = S3Settings
    place_of = staticmethod(object_place)
    # Objects of up to 8 MiB: a batch is cut at 20,000 messages, 8 MiB of lines, or 60 s.
    delivery_defaults = {"batch": {"max_messages": 20_000, "timeout": 60.0, "max_bytes": 8 * 1024 * 1024}}

    def __init__(self, settings: S3Settings, *, label: str):
        super().__init__(settings, label=label)
        self._client = None

    async def open(self) -> None:
        if not self.settings.bucket:
            return  # reported per batch, so the messages are counted
        if self._client is None:
            # Building a client reads botocore's service models: seconds of CPU, off the loop.
            self._client = await self.run_blocking(aws.make_client, "s3", self.settings, _s3_error, s3={"addressing_style": self.settings.addressing_style})

    async def probe(self) -> None:
        """HeadBucket on the backend's bucket: the service answers and the bucket is there."""
        await self.open()
        if self.settings.bucket:
            await self.run_blocking(aws.call, self._client.head_bucket, f"HeadBucket s3://{self.settings.bucket}", _s3_error, Bucket=self.settings.bucket)

    async def write_batch(self, attempt: Attempt) -> None:
        if not self.settings.bucket:
            raise PermanentError(f"no bucket configured for source {attempt.source!r} (set bucket on the backend or in the rule's config)", reason="no_bucket")
        if attempt.state is None:
            attempt.state = await self.run_blocking(self._plan, attempt.source, attempt.batch)
        planned: list[PlannedObject] = attempt.state
        try:
            await self.run_blocking(self._put, planned)
        except PermanentError as exc:
            if not any(p.stored for p in planned):
                raise
            # Some objects of a split batch are stored already: only the rest is dropped.
            rejected = {index: exc.reason for p in planned if not p.stored for index in range(p.start, p.end)}
            raise PartialDelivery(str(exc), rejected) from exc

    def _plan(self, source: str, batch: Batch) -> list[PlannedObject]:
        settings = self.settings
        lines = [line + b"\n" for line in batch.lines]
        planned = []
        for start, end in split_lines(lines, settings.max_object_size):
            payload = b"".join(lines[start:end])
            if settings.gzip:
                payload = gzip.compress(payload, compresslevel=settings.gzip_level, mtime=0)
            key = object_key(settings.prefix, source, batch.received_at, unique=uuid.uuid4().hex, gzipped=settings.gzip)
            planned.append(PlannedObject(key, payload, start, end))
        return planned

    def _put(self, planned: list[PlannedObject]) -> None:
        settings = self.settings
        extra = {"ContentType": "application/x-ndjson"}
        if settings.gzip:
            extra["ContentEncoding"] = "gzip"
        if settings.storage_class:
            extra["StorageClass"] = settings.storage_class
        for item in planned:
            if not item.stored:
                aws.call(self._client.put_object, f"PutObject s3://{settings.bucket}/{item.key}", _s3_error, Bucket=settings.bucket, Key=item.key, Body=item.body, **extra)
                item.stored = True

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self.run_blocking(client.close)
