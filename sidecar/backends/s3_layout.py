"""Where a batch goes in S3 (pure): object keys, and batches cut into objects of a size.

Keys are `{prefix}{source}/YYYY/MM/DD/HH/<time>-<unique>.jsonl[.gz]`, by the hour the batch's
first message was received; the source comes from the wire and is escaped into one level
(sidecar.naming: `a/b` is `a%2Fb`, distinct sources get distinct keys). A prefix
that names the source itself, with a `{source}` field (`raw/{source}/v1/`) or as its last
segment (the seed's `prefix: config-service/` under the config-service rule), has no second
source level added.
"""

import datetime as dt
import re

from sidecar.naming import S3_KEY, escaped

_RECEIVED_AT = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z")


def check_prefix(_instance, _attribute, prefix: str) -> None:
    if prefix.startswith("/") or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"prefix {prefix!r} must be relative, without . or .. segments")
    if not all(c.isascii() and c.isprintable() for c in prefix) or "\\" in prefix or any(c in prefix.replace("{source}", "") for c in "{}"):
        raise ValueError(f"prefix {prefix!r} may hold printable ASCII only, without \\, and no {{ }} but the field {{source}}")


def source_prefix(prefix: str, source: str) -> str:
    """The part of a key before the hour levels: `prefix` with the source in it, or followed by it."""
    component = escaped(source, S3_KEY)
    if "{source}" in prefix:
        return prefix.replace("{source}", component)
    if prefix.endswith("/") and prefix[:-1].rpartition("/")[2] == component:
        return prefix
    return f"{prefix}{component}/"


def object_key(prefix: str, source: str, received_at: str, *, unique: str, gzipped: bool) -> str:
    """`{prefix}{source}/YYYY/MM/DD/HH/<time>-<unique>.jsonl[.gz]`; `source` comes from the wire
    and is escaped into one level, so it can neither add levels nor climb out of prefix."""
    match = _RECEIVED_AT.fullmatch(received_at or "")
    if match is None:
        now = dt.datetime.now(dt.timezone.utc)
        parts = (f"{now:%Y}", f"{now:%m}", f"{now:%d}", f"{now:%H}", f"{now:%M}", f"{now:%S}", f"{now.microsecond // 1000:03d}")
    else:
        parts = match.groups()
    year, month, day, hour, minute, second, millis = parts
    stamp = f"{year}{month}{day}T{hour}{minute}{second}{millis}Z"
    suffix = ".jsonl.gz" if gzipped else ".jsonl"
    return f"{source_prefix(prefix, source)}{year}/{month}/{day}/{hour}/{stamp}-{unique}{suffix}"


def split_lines(lines: list[bytes], limit: int) -> list[tuple[int, int]]:
    """Ranges [start, end) of newline-terminated lines packed into payloads of at most `limit`
    bytes, in order; a single longer line is a payload of its own."""
    ranges: list[tuple[int, int]] = []
    start = 0
    size = 0
    for index, line in enumerate(lines):
        if index > start and size + len(line) > limit:
            ranges.append((start, index))
            start, size = index, 0
        size += len(line)
    if start < len(lines):
        ranges.append((start, len(lines)))
    return ranges
