"""Names made from what arrives on the wire: path components, object keys, log groups and streams.

A source's name, a message's type or date is untrusted text. `escaped` maps it into one
target's names, injectively: distinct values give distinct names, so two sources never share
a file, a key or a stream. Each character outside the target's safe set becomes `%XX`, one
escape per UTF-8 byte (upper-case hex), and the escape character itself is escaped, so the
result percent-decodes back to the value; a value made only of safe characters is its own
name. A template may use only the placeholders named here.

| target | kept as it is | escape | also |
|---|---|---|---|
| file (path component) | `A-Z a-z 0-9 . _ -` | `%` | a leading `.` is escaped (no hidden files, no `.` or `..`) |
| S3 key (one level) | `A-Z a-z 0-9 . _ - ! * ' ( )` (AWS's safe characters) | `%` | a leading `.` is escaped |
| CloudWatch log stream | `A-Z a-z 0-9 . _ -` | `%` | |
| CloudWatch log group | `A-Z a-z 0-9 . _ -` | `#` (`%` is not allowed in group names) | |

A name longer than 200 characters (a source is at most 200, but one escaped character can take
12) is cut at 182, never inside an escape, and ends in `%-` and 16 hex digits of the value's
SHA-256: the marker cannot occur in a name that was not cut, and two long values share a name
only if their hashes do (in practice, never). The empty value, which no message can have, is
the escape character alone.
"""

import hashlib
import os
import string

import attrs

PLACEHOLDERS = ("source", "type", "date", "host")
HOST = os.uname().nodename

_ALPHANUMERIC = frozenset(string.ascii_letters + string.digits)
MAX_NAME_LENGTH = 200
_DIGEST_CHARACTERS = 16  # hex digits of the hash ending a cut name


@attrs.frozen
class NameRules:
    """What one kind of target keeps of a wire value, and how it escapes the rest."""

    what: str
    safe: frozenset  # of characters kept as they are; never the escape character
    escape: str = "%"
    escape_leading_dot: bool = False
    max_length: int = MAX_NAME_LENGTH

    def __attrs_post_init__(self):
        if self.escape in self.safe or "-" not in self.safe:
            raise ValueError(f"{self.what}: the escape character must not be safe, and '-' must be")


FILE_NAME = NameRules("file name", _ALPHANUMERIC | frozenset("._-"), escape_leading_dot=True)
S3_KEY = NameRules("S3 key", _ALPHANUMERIC | frozenset("._-!*'()"), escape_leading_dot=True)
LOG_STREAM = NameRules("log stream", _ALPHANUMERIC | frozenset("._-"))
LOG_GROUP = NameRules("log group", _ALPHANUMERIC | frozenset("._-"), escape="#")


def escaped(value: str, rules: NameRules) -> str:
    """`value` as one name under `rules` (see the module's docstring)."""
    if not value:
        return rules.escape
    safe, escape = rules.safe, rules.escape
    parts = []
    for index, character in enumerate(value):
        if character in safe and not (index == 0 and character == "." and rules.escape_leading_dot):
            parts.append(character)
        else:
            # surrogatepass: a lone surrogate (JSON allows one) is still three distinct bytes
            parts.append("".join(f"{escape}{byte:02X}" for byte in character.encode("utf-8", "surrogatepass")))
    name = "".join(parts)
    if len(name) <= rules.max_length:
        return name
    keep = rules.max_length - 2 - _DIGEST_CHARACTERS
    cut = name[:keep]
    inside_escape = cut.rfind(escape, max(0, keep - 2))
    if inside_escape != -1:
        cut = cut[:inside_escape]
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARACTERS]
    return f"{cut}{escape}-{digest}"


def safe_component(value: str) -> str:
    """One path component reduced to `[A-Za-z0-9._-]` (no leading dot), at most 200 characters:
    for the disk logs' directories, named by backend, where a digest of the rule's overrides
    keeps two instances apart. Not injective: wire values use `escaped`."""
    cleaned = "".join(c if c in FILE_NAME.safe else "_" for c in value[:200])
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
