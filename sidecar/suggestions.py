""""Did you mean" for a name that is not known: the closest known one, when one is close."""

import difflib
from collections.abc import Iterable


def did_you_mean(given, known: Iterable) -> str:
    """`; did you mean 'files'?` when `given` is a near miss of one of `known` (difflib's
    ratio of 0.6 or more: `flies` for `files`, `filesytem` for `filesystem`), else ""."""
    if not isinstance(given, str) or not given or len(given) > 100:  # no name is that long
        return ""
    candidates = [k for k in known if isinstance(k, str) and k != given]
    close = difflib.get_close_matches(given, candidates, n=1, cutoff=0.6)
    if not close:
        # A different case only (`Files`): difflib counts each letter that differs.
        close = [k for k in candidates if k.lower() == given.lower()][:1]
    return f"; did you mean {close[0]!r}?" if close else ""
