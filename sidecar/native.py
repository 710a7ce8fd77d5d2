"""The one seam to the Rust hot path (`sidecar._native`, see native/), and what stands in for
each part when it is not built: the Python path (sidecar.ingest decides, per chunk), zlib's
CRC-32."""

try:
    from sidecar._native import constants, crc32, decode
except ImportError:  # built without a Rust toolchain: the Python path does everything
    from zlib import crc32

    constants = decode = None

AVAILABLE = decode is not None

__all__ = ["AVAILABLE", "constants", "crc32", "decode"]
