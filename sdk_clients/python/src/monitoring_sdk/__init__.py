"""Python SDK for the monitoring sidecar: thin, non-blocking, standard library only."""

from monitoring_sdk.client import MonitoringClient, init

__all__ = ["MonitoringClient", "init"]
__version__ = "0.1.0"
