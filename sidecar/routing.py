"""The routing table: which backend instances a message goes to. Pure: no I/O, no clock.

Source keys: an exact name; a glob (`file-*`); `default`, for sources with no exact or glob
rule of their own (enabled or not); `all`, for every source in addition. Rules that resolve to
the same backend instance are merged: a message goes to an instance once, if any of those
rules' filters passes it.
"""

import attrs

from sidecar.batch import Batch
from sidecar.bounded import ForgetfulCache
from sidecar.config.settings import BackendSpec, Rule
from sidecar.source_keys import SourceKeys
from sidecar.transforms.filter import MessageFilter, keep_passing


@attrs.frozen
class Target:
    spec: BackendSpec
    filters: tuple  # of MessageFilter; empty: every message passes
    priority: int
    rules: tuple  # the rules that made this target, for display

    def select(self, batch: Batch) -> Batch:
        """The messages of `batch` this target takes: all of it (the same object) when it has no
        filter, else a new batch of those that pass."""
        return keep_passing(batch, self.filters)

    def passes(self, message: dict) -> bool:
        return not self.filters or any(f.passes(message) for f in self.filters)


class RouteTable:
    """Rules resolved per source name; resolution is cached, since sources are few."""

    def __init__(self, rules: tuple[Rule, ...]):
        self.rules = rules
        self._keys = SourceKeys((rule.source, rule) for rule in rules)
        self._cache: ForgetfulCache = ForgetfulCache()  # source -> its targets

    @property
    def specs(self) -> set[BackendSpec]:
        return {rule.spec for rule in self.rules if rule.enabled}

    def rules_for(self, source: str) -> list[Rule]:
        """Every rule that applies to `source`, enabled or not, in the order configured."""
        return self._keys.for_source(source)

    def targets_for(self, source: str) -> tuple[Target, ...]:
        targets = self._cache.get(source)
        if targets is None:
            targets = self._cache.remember(source, self._resolve(source))
        return targets

    def _resolve(self, source: str) -> tuple[Target, ...]:
        merged: dict[BackendSpec, list[Rule]] = {}
        for rule in self.rules_for(source):
            if rule.enabled:
                merged.setdefault(rule.spec, []).append(rule)
        targets = []
        for spec, rules in merged.items():
            filters: tuple[MessageFilter, ...] = tuple(r.filter for r in rules)
            if any(f.passes_all for f in filters):
                filters = ()
            targets.append(Target(spec, filters, min(r.priority for r in rules), tuple(rules)))
        return tuple(sorted(targets, key=lambda t: t.priority))

    def route(self, message: dict) -> list[BackendSpec]:
        """The backend instances one message goes to, in priority order."""
        return [t.spec for t in self.targets_for(message["source"]) if t.passes(message)]

    def source_keys(self) -> list[str]:
        """Source keys as an operator wrote them: exact and globs, then default, then all."""
        return self._keys.keys()

    def source_names(self) -> list[str]:
        """The sources some rule names exactly."""
        return self._keys.names()

    def rules_under(self, key: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.source == key]
