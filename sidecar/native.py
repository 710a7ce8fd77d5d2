"""The one seam to the Rust hot path (`sidecar._native`, see native/), and what stands in for
each part when it is not built: the Python path (sidecar.ingest decides, per chunk), zlib's
CRC-32, the Python aggregate windows (sidecar.aggregate decides, per step)."""

try:
    from sidecar._native import AGGREGATE_MAX_GROUP_BYTES, AggregateWindows, constants, crc32, decode
except ImportError:  # built without a Rust toolchain: the Python path does everything
    from zlib import crc32

    constants = decode = AggregateWindows = AGGREGATE_MAX_GROUP_BYTES = None

AVAILABLE = decode is not None


def use_native(enabled: bool) -> bool:
    """Whether a part takes the native path: `pipeline.native` on and the extension built."""
    return enabled and AVAILABLE


__all__ = ["AGGREGATE_MAX_GROUP_BYTES", "AVAILABLE", "AggregateWindows", "constants", "crc32", "decode", "use_native"]
