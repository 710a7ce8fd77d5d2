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
  `https://KEY:SECRET@host`): from the `:` after the user to the last `@` before whitespace,
  percent-encoded or not (libpq ends it at the first `@`, RFC 3986 at the last before a `/`,
  and a secret written with a raw `/` in it is neither's: hiding up to the last `@` covers
  all three; a raw space, which libpq refuses in a URL, ends it, and 1 KiB is the longest);
- query parameters with such a name (`?password=`, `&sslpassword=`, `X-Amz-Signature=`), the
  name percent-decoded first, as libpq decodes it;
- HTTP credentials: `Authorization: Bearer TOKEN`, `Proxy-Authorization: ...`.

A connection string keeps its shape: the result parses as one, with the password `***`. The
time taken is linear in the text's length (each pattern starts at a word or a separator and
scans a bounded or separator-ended stretch), so a hostile line quoted in a log costs no more.
"""

import re
import urllib.parse

# The end of a name that holds a secret (key=value keys, query parameters, mapping keys).
_SECRET_NAME = r"[\w.-]*?(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|signature|credentials?)"
_SECRET_NAME_WHOLE = re.compile(rf"{_SECRET_NAME}|(?:proxy-)?authorization|cookie|sig", re.IGNORECASE | re.ASCII)

# HTTP authentication schemes: the word before a credential, kept when the credential is hidden.
_SCHEMES = r"basic|bearer|digest|token|apikey|api-key|key|negotiate|ntlm|splunk|sso-key|dsn|aws4-hmac-sha256|hoba|mutual"

_SECRETS = re.compile(
    "|".join((
        # libpq key=value (and any key=value naming a secret)
        rf"(?<![\w.-])(?P<key>{_SECRET_NAME})(?P<equals>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*(?:'|\\?\Z)|(?:\\.|\\\Z|[^\s\\])+)",
        # a URL's user:password@
        r"(?P<url>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<url_password>\S{0,1024})@",
        # a query parameter: `?name=value`, `&name=value`
        r"(?P<query>[?&](?P<query_name>[^=&?\s]+)=)(?P<query_value>[^&\s]*)",
        # an HTTP authorization header
        rf"(?P<header>\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:{_SCHEMES})\s+)?)(?P<credential>[^\s,;\"']+)",
    )),
    # ASCII: whitespace and word characters as libpq's parser sees them (C's isspace)
    re.IGNORECASE | re.DOTALL | re.ASCII,
)
_HIDDEN = "***"


def _hide(match: re.Match) -> str:
    if match["key"] is not None:
        return f"{match['key']}{match['equals']}{_HIDDEN}"
    if match["url"] is not None:
        return f"{match['url']}{_HIDDEN}@" if match["url_password"] else match[0]
    if match["query"] is not None:
        if match["query_value"] and is_secret_name(urllib.parse.unquote(match["query_name"])):
            return f"{match['query']}{_HIDDEN}"
        return match["query"] + without_secrets(match["query_value"])  # a URL in it may hold one
    return f"{match['header']}{_HIDDEN}"


def without_secrets(text: str) -> str:
    """`text` with every password, token and credential of the forms above as `***`."""
    return _SECRETS.sub(_hide, text)


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
