"""monitoring-sidecar: receive telemetry from thin SDKs over local TCP and route it to backends."""

__version__ = "0.1.0"
