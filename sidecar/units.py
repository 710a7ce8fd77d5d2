"""Units of settings: durations and byte sizes, as annotations a settings class uses and the
parsers the config reader applies to them. No imports from the rest of the sidecar, so that a
backend's settings can name them without importing the config loader.
"""

import re
from typing import Annotated

Duration = Annotated[float, "duration"]
ByteSize = Annotated[int, "bytesize"]
# A YAML mapping of strings (e.g. HTTP headers), kept as (key, value) pairs in order: hashable,
# as settings must be.
StringPairs = Annotated[tuple[tuple[str, str], ...], "mapping"]

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_BYTESIZE = re.compile(r"\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*")
_BYTE_UNITS = {None: 1, "B": 1, "KB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}
_SECONDS = {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value) -> float:
    """Seconds from a number or text like `500ms`, `5s`, `2m`, `1h`; ValueError otherwise."""
    if is_number(value):
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"must be a duration in seconds or like 500ms, 5s, 2m, got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_bytesize(value) -> int:
    """Bytes from an integer or text like `64KiB`, `8MiB`, `1GB`; ValueError otherwise."""
    if is_int(value):
        return int(value)
    match = _BYTESIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"must be a size in bytes or like 64KiB, 8MiB, got {value!r}")
    return int(match.group(1)) * _BYTE_UNITS[match.group(2)]
