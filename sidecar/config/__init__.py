"""Configuration: the main file plus routes.d/ drop-ins, read into frozen attrs settings.

Every problem is reported with the `file:line` it comes from, and all problems of a load are
reported together, not just the first. Strings may use `${NAME}` or `${NAME:-default}` to take
values (secrets above all) from the environment; such a value remembers its template, and
everything that displays settings shows the template, never the value.

- `settings.py`: the settings classes, their defaults and checks, and what a loaded
  configuration is made of (SidecarConfig, BackendSpec, Rule, MessageFilter, SourceSpec);
- `yaml_reader.py`: reading YAML with line positions into settings classes, ConfigError;
- `loader.py`: `load_config`, one function per section, and the drop-in files.
"""

from sidecar.config.loader import DEFAULT_CONFIG, ROUTE_FILE_PATTERNS, load_config, route_files
from sidecar.config.settings import (
    BackendSpec,
    BatchSettings,
    CircuitBreakerSettings,
    DeliverySettings,
    HttpSettings,
    IndexSettings,
    MessageFilter,
    PipelineSettings,
    QueueSettings,
    ReloadSettings,
    RetrySettings,
    Rule,
    SecuritySettings,
    ShutdownSettings,
    SidecarConfig,
    SourceSpec,
    StorageSettings,
    UnavailableSettings,
)
from sidecar.config.yaml_reader import ConfigError, ConfigProblem, Interpolated, Where, display_value

__all__ = [
    "DEFAULT_CONFIG",
    "ROUTE_FILE_PATTERNS",
    "BackendSpec",
    "BatchSettings",
    "CircuitBreakerSettings",
    "ConfigError",
    "ConfigProblem",
    "DeliverySettings",
    "HttpSettings",
    "IndexSettings",
    "Interpolated",
    "MessageFilter",
    "PipelineSettings",
    "QueueSettings",
    "ReloadSettings",
    "RetrySettings",
    "Rule",
    "SecuritySettings",
    "ShutdownSettings",
    "SidecarConfig",
    "SourceSpec",
    "StorageSettings",
    "UnavailableSettings",
    "Where",
    "display_value",
    "load_config",
    "route_files",
]
