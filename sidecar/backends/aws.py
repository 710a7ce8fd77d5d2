"""What the S3 and CloudWatch Logs backends share: a boto3 client made one way, and boto3's
errors read one way. Each backend decides only what its service's error codes mean."""

from collections.abc import Callable

from sidecar import __version__
from sidecar.backends.base import RetryableError

# decides for a service error: (code, HTTP status, text) -> the machinery's error
ServiceErrorRule = Callable[[str, int, str], Exception]


def classify(exc: Exception, what: str, service_error: ServiceErrorRule) -> Exception | None:
    """A boto3/botocore failure as the machinery's errors; None for anything else (a bug),
    which then propagates as it is. Missing credentials or region trip the circuit: a person
    must fix them."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return service_error(code, status, f"{what}: {code}: {error.get('Message', '')}".rstrip(": "))
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.NoRegionError, bex.CredentialRetrievalError)):
        return RetryableError(f"{what}: {exc}", trip_circuit=True)
    if isinstance(exc, (bex.BotoCoreError, OSError)):
        return RetryableError(f"{what}: {exc}")
    return None


def call(method, where: str, service_error: ServiceErrorRule, **arguments):
    """A boto3 client call, its failure raised as the machinery's error (a bug as it is)."""
    try:
        return method(**arguments)
    except Exception as exc:
        classified = classify(exc, where, service_error)
        if classified is None:
            raise
        raise classified from exc


def make_client(service: str, settings, service_error: ServiceErrorRule, **config_options):
    """A client with the settings' region, endpoint and timeouts, and one attempt per call: the
    machinery does the retrying, with backoff and a circuit breaker. Blocking (it reads
    botocore's service models): call it from a worker thread."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"total_max_attempts": 1},
        user_agent_extra=f"monitoring-sidecar/{__version__}",
        **config_options,
    )
    try:
        return boto3.session.Session().client(service, region_name=settings.region, endpoint_url=settings.endpoint_url, config=config)
    except Exception as exc:
        classified = classify(exc, f"creating the {service} client", service_error)
        if classified is None:
            raise
        raise classified from exc
