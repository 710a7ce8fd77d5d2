"""The filter step: keeps the messages of some types, event levels and metric names.

A routing rule's `filter:` is one (`Target.select` in sidecar.routing keeps what passes any of
the rules that lead to one backend); in `transforms:` it is a step of a source's pipeline, for
every backend at once:

    transforms:
      noisy-*:
        - {type: filter, levels: [warning, error, critical]}
"""

import fnmatch
import re
from typing import Any

import attrs

from sidecar.batch import Batch
from sidecar.constants import LEVELS, MESSAGE_TYPES
from sidecar.transforms.base import Transform


FILTER_KEYS = ("types", "levels", "names", "aggregated")


def is_aggregate(message: dict) -> bool:
    """A metric the aggregate step emitted (sidecar.aggregate): it has `data.aggregation`."""
    return message["type"] == "metric" and "aggregation" in message["data"]


@attrs.frozen
class MessageFilter:
    """Which messages a rule passes. `levels` applies to events, `names` (globs) to metrics;
    `aggregated` true passes only the aggregate step's metrics, false everything else."""

    types: frozenset | None = None
    levels: frozenset | None = None
    names: tuple[str, ...] | None = None
    _names_regex: Any = attrs.field(default=None, eq=False, repr=False)
    aggregated: bool | None = None

    @classmethod
    def build(cls, types=None, levels=None, names=None, aggregated=None) -> "MessageFilter":
        regex = re.compile("|".join(fnmatch.translate(n) for n in names)) if names else None
        return cls(
            frozenset(types) if types is not None else None,
            frozenset(levels) if levels is not None else None,
            tuple(names) if names is not None else None,
            regex,
            aggregated,
        )

    @property
    def passes_all(self) -> bool:
        return self.aggregated is None and self.passes_all_plain

    @property
    def passes_all_plain(self) -> bool:
        """Passes every message that is not an aggregate, or every aggregate, by `aggregated`."""
        return self.types is None and self.levels is None and self.names is None

    def passes(self, message: dict) -> bool:
        kind = message["type"]
        if self.types is not None and kind not in self.types:
            return False
        if self.levels is not None and kind == "event" and message["data"]["level"] not in self.levels:
            return False
        if self._names_regex is not None and kind == "metric" and not self._names_regex.match(message["data"]["name"]):
            return False
        if self.aggregated is not None and is_aggregate(message) != self.aggregated:
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.types is not None:
            parts.append("types=" + ",".join(sorted(self.types)))
        if self.levels is not None:
            parts.append("levels=" + ",".join(sorted(self.levels, key=LEVELS.index)))
        if self.names is not None:
            parts.append("names=" + ",".join(self.names))
        if self.aggregated is not None:
            parts.append(f"aggregated={str(self.aggregated).lower()}")
        return " ".join(parts) or "all messages"


def keep_passing(batch: Batch, filters: tuple[MessageFilter, ...]) -> Batch:
    """The messages of `batch` that pass any of `filters` (none: all): the same object when all
    do, else a new batch."""
    if not filters:
        return batch
    if any(f.aggregated is not None for f in filters) and not batch.may_hold_aggregates():
        # No aggregate among them: the filters on `aggregated` decide without parsing a line
        # (on the native path, the batch's lines need not become dicts at all).
        filters = tuple(f for f in filters if not f.aggregated)
        if not filters:
            return Batch.empty(batch.source)
        if any(f.passes_all_plain for f in filters):
            return batch
    chosen = [i for i, m in enumerate(batch.messages()) if any(f.passes(m) for f in filters)]
    return batch if len(chosen) == len(batch) else batch.pick(chosen)


def _known(allowed):
    def check(_instance, attribute, values) -> None:
        wrong = [v for v in values or () if v not in allowed]
        if wrong:
            raise ValueError(f"unknown {', '.join(map(repr, wrong))} (known: {', '.join(sorted(allowed))})")

    return check


@attrs.frozen
class FilterSettings:
    types: tuple[str, ...] | None = attrs.field(default=None, validator=_known(MESSAGE_TYPES))
    levels: tuple[str, ...] | None = attrs.field(default=None, validator=_known(LEVELS))
    names: tuple[str, ...] | None = None  # globs of metric names
    aggregated: bool | None = None  # true: only the aggregate step's metrics; false: all but them


class Filter(Transform):
    type_name = "filter"
    Settings = FilterSettings

    def __init__(self, settings: FilterSettings):
        super().__init__(settings)
        self.filter = MessageFilter.build(settings.types, settings.levels, settings.names, settings.aggregated)

    def apply(self, batch: Batch) -> Batch:
        return keep_passing(batch, () if self.filter.passes_all else (self.filter,))

    def describe(self) -> str:
        return self.filter.describe()
