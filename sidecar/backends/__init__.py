"""Backend types by name. A new backend is a module here with one `Backend` subclass; adding
its name below is all the core needs to know of it."""

import importlib

from sidecar.backends.base import Attempt, Backend, PartialDelivery, PermanentError, RetryableError
from sidecar.suggestions import did_you_mean

# type name -> (module, class). A module missing from this build makes its type known but
# unavailable: the config loads, `check` says so by name, messages to it are counted as dropped.
BACKEND_TYPES = {
    "filesystem": ("sidecar.backends.filesystem", "FilesystemBackend"),
    "console": ("sidecar.backends.console", "ConsoleBackend"),
    "postgres": ("sidecar.backends.postgres", "PostgresBackend"),
    "s3": ("sidecar.backends.s3", "S3Backend"),
    "cloudwatch": ("sidecar.backends.cloudwatch", "CloudWatchBackend"),
    "otlp": ("sidecar.backends.otlp", "OtlpBackend"),
}
TYPE_ALIASES = {"timescaledb": "postgres", "file": "filesystem"}

__all__ = ["Attempt", "Backend", "PartialDelivery", "PermanentError", "RetryableError", "backend_class", "BackendTypeUnknown"]


class BackendTypeUnknown(ValueError):
    pass


def canonical_type(type_name: str) -> str:
    name = TYPE_ALIASES.get(type_name, type_name)
    if name not in BACKEND_TYPES:
        raise BackendTypeUnknown(f"unknown backend type {type_name!r} (known types: {', '.join(sorted(BACKEND_TYPES))}){did_you_mean(type_name, [*BACKEND_TYPES, *TYPE_ALIASES])}")
    return name


def backend_class(type_name: str) -> type[Backend] | None:
    """The class for a type, or None when the type is known but not available in this build."""
    module_name, class_name = BACKEND_TYPES[canonical_type(type_name)]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    return getattr(module, class_name)
