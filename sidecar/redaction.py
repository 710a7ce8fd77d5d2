"""Secrets out of text that is shown or logged: `check`, log lines, the status file, /api/*,
errors. `without_secrets` is the one routine for text; `credential_shown` is for a value that
is a credential as a whole (an HTTP header's); `is_secret_name` says which names hold secrets.

`without_secrets` finds, and replaces by `***`:

- libpq's `key=value` form: `password=` and `sslpassword=` (any key ending in password,
  passwd, secret, token, api_key, access_key or signature), spaces around `=` allowed, the
  value either unquoted, up to whitespace, where a backslash escapes the next character (`a\\ b`
  is `a b`), or in single quotes, where a backslash escapes the next character (`'it\\'s'`);
  a quote left open runs to the end of the text;
- a URL's password, for any scheme (`postgresql://u:PASSWORD@h/db`, an S3 endpoint
  `https://KEY:SECRET@host`), percent-encoded or not: from the `:` after the user to the first
  `@` before any `/` (libpq's reading, where `?` and `#` belong to the password), on to the
  last `@` before a `/`, `?` or `#` (RFC 3986's), and across a raw `/` that an `@` follows
  before any `?` or `#` (a secret pasted unencoded, which neither reads as a password). A raw
  space inside it, which libpq refuses, ends it, and so does a `?` after a `/`, so a query's
  `@` never takes the URL's password over the query's own secrets; spaces around it, which
  libpq trims, and a tab or a newline, which it takes, do not;
- query parameters with such a name (`?password=`, `&sslpassword=`, `X-Amz-Signature=`), the
  name percent-decoded first, as libpq decodes it, the value up to `&` or a space after it;
- HTTP credentials: `Authorization: Bearer TOKEN`, `Proxy-Authorization: ...`.

A secret becomes `***` (`'***'` where it was quoted): a connection string keeps its shape, and
the result parses as one, with the password `***`. Text that libpq reads as a connection string
is checked against libpq's own reading (`without_secrets`). The time taken is linear in the
text's length (each pattern starts at a word or a separator and scans a bounded or
separator-ended stretch), so a hostile line quoted in a log costs no more.
"""

import re
import urllib.parse

# The end of a name that holds a secret (key=value keys, query parameters, mapping keys).
_SECRET_NAME = r"[\w.-]*?(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|signature|credentials?)"
_SECRET_NAME_WHOLE = re.compile(rf"{_SECRET_NAME}|(?:proxy-)?authorization|cookie|sig", re.IGNORECASE | re.ASCII)

# HTTP authentication schemes: the word before a credential, kept when the credential is hidden.
_SCHEMES = r"basic|bearer|digest|token|apikey|api-key|key|negotiate|ntlm|splunk|sso-key|dsn|aws4-hmac-sha256|hoba|mutual"

# ASCII: whitespace and word characters as libpq's parser sees them (C's isspace).
_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII

# A URL's user:password@ (libpq trims spaces around both: ` pw @` is `pw`).
_URL = re.compile(
    r"(?P<url>(?<![A-Za-z0-9+./-])[A-Za-z][A-Za-z0-9+.-]*:// *[^ :/@]{0,256} *:)(?P<password> *[^ /@]{0,1024}(?:/[^ /?#@]{0,1024}){0,8}(?:@[^ /?#@]{0,1024}){0,8} *)@",
    _FLAGS,
)
# libpq's key=value (and any key=value naming a secret); not right after `=` (`host=hpassword=`
# is a host's value), `?` or `&` (a query parameter's, below).
_KEY_VALUE = re.compile(
    rf"(?<![\w.=?&-])(?P<key>{_SECRET_NAME})(?P<equals>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*(?:'|\\?\Z)|(?:\\.|\\\Z|[^\s\\])+)",
    _FLAGS,
)
# A query parameter: `?name=value`, `&name=value`.
_QUERY = re.compile(r"(?P<query>[?&] *(?P<name>[^=&?\s]+) *=)(?P<value> *[^& ]*)", _FLAGS)
_HEADER = re.compile(rf"(?P<header>\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:{_SCHEMES})\s+)?)(?P<credential>[^\s,;\"']+)", _FLAGS)
_HIDDEN = "***"
_LIBPQ_SECRETS = ("password", "sslpassword")
_LONGEST_CONNECTION_STRING = 65536  # longer text is not read as one


def _hide_url(match: re.Match) -> str:
    return f"{match['url']}{_HIDDEN}@" if match["password"].strip(" ") else match[0]


def _hide_value(match: re.Match) -> str:
    # in the form it was written: a quoted value may touch the next key (`password='x'host=h`)
    hidden = f"'{_HIDDEN}'" if match["value"].startswith("'") else _HIDDEN
    return f"{match['key']}{match['equals']}{hidden}"


def _hide_query(match: re.Match) -> str:
    if match["value"].strip(" ") and is_secret_name(urllib.parse.unquote(match["name"])):
        return f"{match['query']}{_HIDDEN}"
    return match["query"] + without_secrets(match["value"])  # a URL in it may hold one


def _libpq_reading(text: str) -> dict | None:
    """What libpq reads from `text` as a connection string; None when it is not one, or cannot
    hold a password (no `password`, no URL, no percent-encoded name): most log lines."""
    if len(text) > _LONGEST_CONNECTION_STRING or not ("password" in text.lower() or "://" in text or "%" in text):
        return None
    import psycopg.conninfo  # here: a command that shows no connection string need not load it

    try:
        return psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.Error:
        return None


def without_secrets(text: str) -> str:
    """`text` with every password, token and credential of the forms above as `***`: in turns
    (URL passwords, key=value, query parameters, headers), what one hides gone for the next.
    Text that libpq reads as a connection string is checked against libpq's reading: if the
    result does not read back with each password `***`, or still holds one (an input no one
    writes, like `postgresql://u:password=@`), libpq's reading is shown instead, written out
    as key=value with its passwords `***`."""
    hidden = _URL.sub(_hide_url, text)
    hidden = _KEY_VALUE.sub(_hide_value, hidden)
    hidden = _QUERY.sub(_hide_query, hidden)
    hidden = _HEADER.sub(lambda match: f"{match['header']}{_HIDDEN}", hidden)
    reading = _libpq_reading(text)
    secrets = {key: reading[key] for key in _LIBPQ_SECRETS if reading and reading.get(key)}
    if not secrets:
        return hidden
    again = _libpq_reading(hidden)
    if again is not None and all(again.get(key) == _HIDDEN for key in secrets) and not any(len(v) > 3 and v in hidden for v in secrets.values()):
        return hidden
    import psycopg.conninfo

    return psycopg.conninfo.make_conninfo("", **{key: _HIDDEN if key in secrets else value for key, value in reading.items()})


def is_secret_name(name: str) -> bool:
    """Whether a setting, header, query parameter or key of this name holds a secret."""
    return _SECRET_NAME_WHOLE.fullmatch(name) is not None


_SCHEME_AND_REST = re.compile(rf"(?P<scheme>(?:{_SCHEMES})\s+)?(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_REFERENCES = re.compile(r"(?:\$\{[^}]*\}\s*)+")


def credential_shown(text: str) -> str:
    """A credential as it may be shown: as written when it is only `${NAME}` references (with
    an authentication scheme before them: `Bearer ${OTLP_TOKEN}`), else `***` (the scheme kept)."""
    parts = _SCHEME_AND_REST.fullmatch(text)
    if _REFERENCES.fullmatch(parts["rest"]):
        return text
    return f"{parts['scheme'] or ''}{_HIDDEN}"


# The former name, for the callers that scrub error text.
without_passwords = without_secrets
