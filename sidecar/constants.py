"""The protocol's constants, in one place for every Python module and for the native hot path.

native/src/constants.rs holds the Rust copies of the ones the native code uses;
`sidecar._native.constants()` exports them and tests/test_native.py checks they equal these.
"""

MESSAGE_TYPES = frozenset({"event", "metric", "progress", "resource", "span"})
LEVELS = ("debug", "info", "warning", "error", "critical")
# An event level is read case-insensitively, and these spellings as the level they name.
LEVEL_ALIASES = {"warn": "warning", "fatal": "critical", "crit": "critical", "err": "error"}
# Levels that make the batcher flush at once instead of waiting for its size or time threshold.
URGENT_LEVELS = frozenset({"error", "critical"})
# Levels the live view counts as errors (a source with one makes its job "failed").
ERROR_LEVELS = frozenset({"error", "critical"})
MAX_SOURCE_LENGTH = 200
TRACE_ID_LENGTH = 32  # lowercase hex digits
SPAN_ID_LENGTH = 16
# Epoch numbers at or above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
EPOCH_MS_THRESHOLD = 1e11
# The latest events the live view keeps per source of a job or trace.
KEY_EVENTS_PER_SOURCE = 8

# Limits the native code is given with each call, not copies of its own.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
# Levels of nesting a message may have, itself being level 1 (`tcp.max_depth`). orjson writes at
# most 254 levels, and every backend encodes JSON: the highest limit an operator can set.
DEFAULT_MAX_DEPTH = 64
MAX_DEPTH_LIMIT = 254
