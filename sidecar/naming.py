"""Names made from what arrives on the wire: path components, object keys, log stream names.

A source's name, a message's type or date is untrusted text; what a backend makes of it is
reduced to `[A-Za-z0-9._-]`, and a template may use only the placeholders named here.
"""

import os
import string

PLACEHOLDERS = ("source", "type", "date", "host")
_UNSAFE = str.maketrans({c: "_" for c in map(chr, range(256)) if not (c.isascii() and (c.isalnum() or c in "._-"))})
HOST = os.uname().nodename


def safe_component(value: str) -> str:
    """One path component from untrusted text: no separators, no `..`, no control bytes."""
    cleaned = "".join(c if c.isascii() else "_" for c in value.translate(_UNSAFE)[:200])
    # No hidden files and no `.` or `..`: a leading dot becomes `_`.
    return "_" + cleaned[1:] if cleaned.startswith(".") or not cleaned else cleaned


def template_fields(template: str, what: str = "path") -> set[str]:
    """The placeholders a name template uses; ValueError for any other, or one with a format
    spec or conversion (`{source.__class__}`, `{source!r}` must not reach str.format)."""
    fields = set()
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ValueError(f"{what} template {template!r}: unknown placeholder {{{field}}} (known: {', '.join('{%s}' % p for p in PLACEHOLDERS)})")
        fields.add(field)
    return fields
