"""A cache of lookups by keys that are usually few (sources, their names and paths) but come
from the wire, so a flood of distinct ones must not grow it: it forgets everything when full."""


class ForgetfulCache(dict):
    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.limit = limit

    def remember(self, key, value):
        """Keep `value` under `key` (after forgetting all when full); returns `value`."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
