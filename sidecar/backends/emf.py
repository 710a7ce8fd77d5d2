"""CloudWatch Embedded Metric Format (EMF) documents from metric messages, without I/O.

A document is one log event that CloudWatch Logs turns into metrics: the root holds `_aws`
(`Timestamp` in ms and one MetricDirective: `Namespace`, one dimension set, the metric
definitions), the dimension values as strings and the metric values as numbers. The spec's
limits are kept: at most MAX_DIMENSIONS keys in the dimension set (`source` first, then the
tags in key order), at most MAX_METRICS metric definitions. A tag that cannot be a dimension
(beyond the limit, or a key or value of a length CloudWatch refuses) stays a plain property of
the root; one whose key is taken by the document's own members is left out. Both are counted.

The spec defines no statistic sets (PutMetricData's StatisticValues has no EMF form), so an
aggregated metric's statistics are separate metrics, NAME.count, NAME.sum, NAME.p99 ...
"""

import math

import attrs
import orjson

from sidecar.message import epoch_ms

MAX_DIMENSIONS = 30  # keys in one dimension set
MAX_METRICS = 100  # metric definitions in one directive
MAX_NAME_CHARS = 255  # metric and dimension names, namespaces
MAX_DIMENSION_VALUE_CHARS = 1024
DEFAULT_NAMESPACE = "monitoring-sidecar"

# CloudWatch's unit names (MetricDatum's StandardUnit) for the units messages commonly carry.
UNITS = {
    "ms": "Milliseconds", "millisecond": "Milliseconds", "milliseconds": "Milliseconds",
    "us": "Microseconds", "µs": "Microseconds", "microsecond": "Microseconds", "microseconds": "Microseconds",
    "s": "Seconds", "sec": "Seconds", "second": "Seconds", "seconds": "Seconds",
    "b": "Bytes", "byte": "Bytes", "bytes": "Bytes",
    "kb": "Kilobytes", "kib": "Kilobytes", "kilobytes": "Kilobytes",
    "mb": "Megabytes", "mib": "Megabytes", "megabytes": "Megabytes",
    "gb": "Gigabytes", "gib": "Gigabytes", "gigabytes": "Gigabytes",
    "%": "Percent", "percent": "Percent",
    "count": "Count", "1": "Count", "rows": "Count", "items": "Count", "events": "Count", "requests": "Count",
    "errors": "Count", "jobs": "Count", "messages": "Count",
    "count/s": "Count/Second", "/s": "Count/Second", "per_second": "Count/Second",
    "bytes/s": "Bytes/Second", "b/s": "Bytes/Second",
}
STANDARD_UNITS = frozenset({
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
    "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
    "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
    "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
})
# Members of the aggregation object that are not statistics.
_WINDOW_KEYS = ("window_start", "window_end", "partial")
# The document's own members: a metric of one of these names is written as `metric.NAME`.
_RESERVED = frozenset({"_aws", "source", "aggregation"})


def cloudwatch_unit(unit) -> str | None:
    """CloudWatch's name for a message's `unit`, or None (no Unit) when it has none."""
    if type(unit) is not str:
        return None
    return unit if unit in STANDARD_UNITS else UNITS.get(unit.strip().lower())


@attrs.frozen
class EmfDocument:
    text: str  # the log event's message: one JSON object
    not_dimensions: tuple[str, ...]  # tag keys kept as plain properties instead
    left_out: tuple[str, ...]  # tag keys whose name a member of the document has
    not_metrics: tuple[str, ...]  # statistics beyond MAX_METRICS, kept as plain properties


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def emf_document(message: dict, timestamp_ms: int, namespace: str = DEFAULT_NAMESPACE) -> EmfDocument | None:
    """The EMF document for a `metric` message, or None for any other message (it stays JSON).

    `timestamp_ms` is the message's time; an aggregate's metrics are stamped with its window's
    end instead, when that can be read."""
    data = message.get("data")
    if message.get("type") != "metric" or type(data) is not dict or type(data.get("name")) is not str:
        return None
    name = data["name"][:MAX_NAME_CHARS]
    unit = cloudwatch_unit(data.get("unit"))
    aggregation = data.get("aggregation")
    root: dict = {}
    if type(aggregation) is dict:
        ended = epoch_ms(aggregation.get("window_end"))
        timestamp_ms = ended if ended is not None else timestamp_ms
        values = [(f"{name}.{stat}"[:MAX_NAME_CHARS], stat, value) for stat, value in aggregation.items() if stat not in _WINDOW_KEYS and _number(value)]
        root["aggregation"] = {key: aggregation[key] for key in _WINDOW_KEYS if key in aggregation}
    else:
        values = [(name, "value", data.get("value"))] if _number(data.get("value")) else []
    if not values:
        return None
    source = message.get("source")
    root["source"] = source if type(source) is str and source else "_"
    definitions, not_metrics = [], []
    for member, stat, value in values:
        if member in _RESERVED:
            member = f"metric.{member}"
        if member in root:
            continue  # a name cut to MAX_NAME_CHARS twice over: the first stays
        root[member] = value
        if len(definitions) < MAX_METRICS:
            definition = {"Name": member}
            metric_unit = "Count" if stat == "count" else unit
            if metric_unit:
                definition["Unit"] = metric_unit
            definitions.append(definition)
        else:
            not_metrics.append(member)
    dimensions = ["source"]
    not_dimensions, left_out = [], []
    tags = data.get("tags")
    for key, value in sorted(tags.items()) if type(tags) is dict else ():
        value = value if type(value) is str else orjson.dumps(value).decode()
        if key in root or key in _RESERVED:
            left_out.append(key)
            continue
        root[key] = value
        if len(dimensions) < MAX_DIMENSIONS and 1 <= len(key) <= MAX_NAME_CHARS and 1 <= len(value) <= MAX_DIMENSION_VALUE_CHARS and not key.startswith(":"):
            dimensions.append(key)
        else:
            not_dimensions.append(key)
    directive = {"Namespace": namespace, "Dimensions": [dimensions], "Metrics": definitions}
    root["_aws"] = {"Timestamp": timestamp_ms, "CloudWatchMetrics": [directive]}
    return EmfDocument(orjson.dumps(root).decode(), tuple(not_dimensions), tuple(left_out), tuple(not_metrics))


def check_namespace(_instance, _attribute, namespace: str) -> None:
    """A namespace CloudWatch accepts: 1-255 characters, not starting with `AWS/` (reserved), no `:`."""
    if not 1 <= len(namespace) <= MAX_NAME_CHARS or namespace.startswith("AWS/") or ":" in namespace or not namespace.isascii():
        raise ValueError(f"namespace {namespace!r}: 1-255 ASCII characters without ':', not starting with AWS/ (reserved)")


class NotPlaced:
    """How many tags and statistics documents could not place as dimensions or metrics, by kind."""

    KINDS = {
        "emf_tags_not_dimensions": "tag(s) kept as plain properties, not dimensions (over 30, or a key or value of a length CloudWatch refuses)",
        "emf_tags_left_out": "tag(s) left out: their key is one of the document's own members",
        "emf_statistics_not_metrics": "statistic(s) kept as plain properties, not metrics (over 100 in one document)",
    }

    def __init__(self):
        self.counts = dict.fromkeys(self.KINDS, 0)

    def add(self, documents) -> list[str]:
        """Counts what `documents` did not place; returns a description of each kind seen the first time."""
        first = []
        for document in documents:
            for kind, keys in zip(self.KINDS, (document.not_dimensions, document.left_out, document.not_metrics)):
                if keys and not self.counts[kind]:
                    first.append(f"EMF: {self.KINDS[kind]}, e.g. {', '.join(map(repr, keys[:3]))} (counted in {kind}; logged once)")
                self.counts[kind] += len(keys)
        return first
