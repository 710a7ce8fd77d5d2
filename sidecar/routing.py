"""The routing table: which backend instances a message goes to. Pure: no I/O, no clock.

Source keys: an exact name; a glob (`file-*`); `default`, for sources with no exact or glob
rule of their own (enabled or not); `all`, for every source in addition. Rules that resolve to
the same backend instance are merged: a message goes to an instance once, if any of those
rules' filters passes it.
"""

import fnmatch
import re

import attrs

from sidecar.batch import Batch
from sidecar.config.settings import BackendSpec, MessageFilter, Rule

_GLOB_CHARS = re.compile(r"[*?\[]")


@attrs.frozen
class Target:
    spec: BackendSpec
    filters: tuple  # of MessageFilter; empty: every message passes
    priority: int
    rules: tuple  # the rules that made this target, for display

    def select(self, batch: Batch) -> Batch:
        """The messages of `batch` this target takes: all of it (the same object) when it has no
        filter, else a new batch of those that pass."""
        if not self.filters:
            return batch
        chosen = [i for i, m in enumerate(batch.messages()) if self.passes(m)]
        return batch if len(chosen) == len(batch) else batch.pick(chosen)

    def passes(self, message: dict) -> bool:
        return not self.filters or any(f.passes(message) for f in self.filters)


class RouteTable:
    """Rules resolved per source name; resolution is cached, since sources are few."""

    def __init__(self, rules: tuple[Rule, ...]):
        self.rules = rules
        self._exact: dict[str, list[Rule]] = {}
        self._globs: list[tuple[re.Pattern, list[Rule]]] = []
        self._default: list[Rule] = []
        self._all: list[Rule] = []
        globs: dict[str, list[Rule]] = {}
        for rule in rules:
            if rule.source == "default":
                self._default.append(rule)
            elif rule.source == "all":
                self._all.append(rule)
            elif _GLOB_CHARS.search(rule.source):
                globs.setdefault(rule.source, []).append(rule)
            else:
                self._exact.setdefault(rule.source, []).append(rule)
        self._globs = [(re.compile(fnmatch.translate(pattern)), found) for pattern, found in globs.items()]
        self._cache: dict[str, tuple[Target, ...]] = {}

    @property
    def specs(self) -> set[BackendSpec]:
        return {rule.spec for rule in self.rules if rule.enabled}

    def rules_for(self, source: str) -> list[Rule]:
        """Every rule that applies to `source`, enabled or not, in priority order."""
        own = list(self._exact.get(source, ()))
        for pattern, found in self._globs:
            if pattern.match(source):
                own.extend(found)
        chosen = own if own else self._default
        return sorted([*chosen, *self._all], key=lambda r: self.rules.index(r))

    def targets_for(self, source: str) -> tuple[Target, ...]:
        targets = self._cache.get(source)
        if targets is None:
            targets = self._resolve(source)
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[source] = targets
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
        keys = [*self._exact, *(rules[0].source for _pattern, rules in self._globs)]
        if self._default:
            keys.append("default")
        if self._all:
            keys.append("all")
        return keys

    def rules_under(self, key: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.source == key]
