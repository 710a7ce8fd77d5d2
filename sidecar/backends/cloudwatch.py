"""CloudWatch Logs: each message one log event (its JSON line, or with `format: emf` a metric's
Embedded Metric Format document: sidecar.backends.emf), in a group and stream named from templates.

A batch is planned into requests within the service's limits (sidecar.backends.cloudwatch_requests);
events it would refuse are dropped and counted, an oversized one truncated and logged. A missing
group or stream is created on write. The plan and how many of its requests were accepted are the
attempt's state, so a retry resends only the rest and never duplicates events.
"""

import functools
import logging
import time

import attrs

from sidecar.backends import aws
from sidecar.backends.base import Attempt, Backend, PartialDelivery, Place
from sidecar.backends.cloudwatch_requests import (
    MAX_EVENT_BYTES, RETENTION_DAYS, LogNames, PutRequest, Sending, check_group, check_stream, error_code, plan_batch,
    refused_by_service, service_error, validate_template,
)
from sidecar.backends.emf import DEFAULT_NAMESPACE, NotPlaced, check_namespace, emf_document
from sidecar.units import ByteSize, Duration

log = logging.getLogger("sidecar.backends.cloudwatch")


@attrs.frozen
class CloudWatchSettings:
    region: str | None = None  # None: the usual chain (AWS_REGION, ~/.aws/config)
    log_group: str = attrs.field(default="/monitoring-sidecar", validator=validate_template(check_group, "log_group"))
    log_stream: str = attrs.field(default="{source}", validator=validate_template(check_stream, "log_stream"))
    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL_CLOUDWATCH_LOGS / AWS_ENDPOINT_URL
    # Set on groups this backend creates; None leaves them at "never expire".
    retention_days: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.in_(RETENTION_DAYS)))
    max_event_size: ByteSize = attrs.field(default=MAX_EVENT_BYTES, validator=[attrs.validators.ge(1024), attrs.validators.le(MAX_EVENT_BYTES)])
    connect_timeout: Duration = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    read_timeout: Duration = attrs.field(default=20.0, validator=attrs.validators.gt(0))
    format: str = attrs.field(default="json", validator=attrs.validators.in_(("json", "emf")))
    namespace: str = attrs.field(default=DEFAULT_NAMESPACE, validator=check_namespace)  # for format: emf


class CloudWatchBackend(Backend):
    type_name = "cloudwatch"
    Settings = CloudWatchSettings

    @staticmethod
    def place_of(settings: CloudWatchSettings, source: str, kind: str, moment) -> Place:
        group, stream = LogNames(settings.log_group, settings.log_stream)(source, kind, f"{moment:%Y-%m-%d}")
        at = "".join(f" {value}" for value in (settings.region, settings.endpoint_url) if value)
        return Place(f"CloudWatch Logs{at} {group}:{stream}", f"log group {group}, stream {stream}")

    def __init__(self, settings: CloudWatchSettings, *, label: str):
        super().__init__(settings, label=label)
        self._client = None
        self.names = LogNames(settings.log_group, settings.log_stream)
        self.truncated = 0
        self.render = functools.partial(emf_document, namespace=settings.namespace) if settings.format == "emf" else None
        self.not_placed = NotPlaced()

    async def open(self) -> None:
        if self._client is None:
            self._client = await self.run_blocking(aws.make_client, "logs", self.settings, service_error)

    async def probe(self) -> None:
        """DescribeLogGroups for one group: the service answers and the credentials are good."""
        await self.open()
        await self.run_blocking(aws.call, self._client.describe_log_groups, "DescribeLogGroups", service_error, limit=1)

    def statistics(self) -> dict:
        return {"truncated_events": self.truncated, **(self.not_placed.counts if self.render else {})}

    async def write_batch(self, attempt: Attempt) -> None:
        if attempt.state is None:
            plan = await self.run_blocking(
                plan_batch, self.names, attempt.source, attempt.batch, time.time_ns() // 1_000_000, self.render,
                max_event_size=self.settings.max_event_size, retention_days=self.settings.retention_days,
            )
            attempt.state = Sending(plan, dict(plan.rejected))
            if plan.truncated:
                self.truncated += len(plan.truncated)
                log.warning("backend %s: truncated %d event(s) from %s over %d bytes (%d truncated so far)",
                            self.label, len(plan.truncated), attempt.source, self.settings.max_event_size, self.truncated)
            for first in self.not_placed.add(plan.documents):  # logged once per kind, counted always
                log.warning("backend %s: %s", self.label, first)
        sending: Sending = attempt.state
        await self.run_blocking(self._send, sending)
        if sending.rejected:
            reasons = sorted(set(sending.rejected.values()))
            raise PartialDelivery(f"CloudWatch Logs refuses {len(sending.rejected)} event(s) ({', '.join(reasons)})", sending.rejected)

    def _send(self, sending: Sending) -> None:
        for request in sending.plan.requests[sending.accepted:]:
            self._put(request, sending.rejected)
            sending.accepted += 1

    def _put(self, request: PutRequest, rejected: dict[int, str]) -> None:
        import botocore.exceptions as bex

        events = [{"timestamp": e.timestamp, "message": e.message} for e in request.events]
        where = f"PutLogEvents {request.group} / {request.stream}"
        arguments = {"logGroupName": request.group, "logStreamName": request.stream, "logEvents": events}
        try:
            try:
                response = self._client.put_log_events(**arguments)
            except bex.ClientError as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
                self._create(request.group, request.stream)
                response = self._client.put_log_events(**arguments)
        except bex.ClientError as exc:
            if error_code(exc) != "InvalidParameterException":
                raise aws.classify(exc, where, service_error) from exc
            # The service refuses these events as they are: dropped and counted, not retried.
            log.error("backend %s: %s refused %d event(s): %s", self.label, where, len(events), exc)
            rejected.update((event.index, "invalid_parameter") for event in request.events)
            return
        except Exception as exc:
            classified = aws.classify(exc, where, service_error)
            if classified is None:
                raise
            raise classified from exc
        rejected.update(refused_by_service(request, response.get("rejectedLogEventsInfo") or {}))

    def _create(self, group: str, stream: str) -> None:
        client = self._client
        if self._create_missing(f"log group {group}", client.create_log_group, logGroupName=group) and self.settings.retention_days is not None:
            client.put_retention_policy(logGroupName=group, retentionInDays=self.settings.retention_days)
        self._create_missing(f"log stream {stream} in {group}", client.create_log_stream, logGroupName=group, logStreamName=stream)

    def _create_missing(self, what: str, method, **arguments) -> bool:
        """Whether it was created (not there already)."""
        import botocore.exceptions as bex

        try:
            method(**arguments)
        except bex.ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            return False
        log.info("backend %s: created %s", self.label, what)
        return True

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self.run_blocking(client.close)
