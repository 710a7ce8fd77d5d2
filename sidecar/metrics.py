"""One registry for the core's counters, so logs, `statistics()` and /metrics read the same numbers."""

import collections


class Counters:
    """Monotonic counters keyed by name and labels. Incremented per chunk, not per message."""

    def __init__(self):
        self._values: collections.Counter = collections.Counter()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self._values[(name, tuple(sorted(labels.items())))] += amount

    def get(self, name: str, **labels: str) -> int:
        return self._values[(name, tuple(sorted(labels.items())))]

    def total(self, name: str) -> int:
        return sum(v for (n, _labels), v in self._values.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, int]:
        return {values[0]: count for values, count in self.by_labels(name, (label,)).items()}

    def by_labels(self, name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], int]:
        """Values of a counter summed by the values of several labels ("" where one is unset)."""
        found: dict[tuple[str, ...], int] = {}
        for (n, given), value in self._values.items():
            if n == name:
                given = dict(given)
                key = tuple(given.get(label, "") for label in labels)
                found[key] = found.get(key, 0) + value
        return found

    def items(self):
        """(name, labels dict, value) for every counter, for exposition."""
        for (name, labels), value in sorted(self._values.items()):
            yield name, dict(labels), value
