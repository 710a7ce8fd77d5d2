"""Passwords out of text that may be shown or logged: a URL's `user:password@` and libpq's
`password=...` (quoted or not), written once for the config's display and the PostgreSQL errors."""

import re

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def without_passwords(text: str) -> str:
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
