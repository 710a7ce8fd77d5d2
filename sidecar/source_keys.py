"""Things filed under source keys, found for a source name the way routing finds rules.

A key is an exact name, a glob (`file-*`), `default` (for sources with no exact or glob entry of
their own) or `all` (for every source, in addition). Pure; lookups are cached, since sources
are few.
"""

import fnmatch
import re
from collections.abc import Iterable
from typing import Generic, TypeVar

from sidecar.bounded import ForgetfulCache

Item = TypeVar("Item")
GLOB_CHARS = re.compile(r"[*?\[]")


class SourceKeys(Generic[Item]):
    def __init__(self, entries: Iterable[tuple[str, Item]]):
        self.entries = list(entries)  # (key, item), in the order configured
        self._exact: dict[str, list[int]] = {}
        self._globs: dict[str, list[int]] = {}
        self._default: list[int] = []
        self._all: list[int] = []
        for position, (key, _item) in enumerate(self.entries):
            if key == "default":
                self._default.append(position)
            elif key == "all":
                self._all.append(position)
            elif GLOB_CHARS.search(key):
                self._globs.setdefault(key, []).append(position)
            else:
                self._exact.setdefault(key, []).append(position)
        self._patterns = [(re.compile(fnmatch.translate(key)), positions) for key, positions in self._globs.items()]
        self._cache = ForgetfulCache()  # source -> its items

    def for_source(self, source: str) -> list[Item]:
        """Every item that applies to `source`, in the order configured."""
        found = self._cache.get(source)
        if found is None:
            own = list(self._exact.get(source, ()))
            for pattern, positions in self._patterns:
                if pattern.match(source):
                    own.extend(positions)
            chosen = own if own else self._default
            found = self._cache.remember(source, [self.entries[p][1] for p in sorted({*chosen, *self._all})])
        return found

    def names(self) -> list[str]:
        """The exact names among the keys: the sources known by name."""
        return list(self._exact)

    def keys(self) -> list[str]:
        """The keys as an operator wrote them: exact and globs, then default, then all."""
        keys = [*self._exact, *self._globs]
        if self._default:
            keys.append("default")
        if self._all:
            keys.append("all")
        return keys
