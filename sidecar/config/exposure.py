"""Which listeners are open beyond this machine without authentication: the judgement `check`
and `run` warn with, and that `security.require_auth_beyond_loopback` turns into a refusal.

Pure: it looks at settings and host names only (no DNS). A host is loopback when it is an
address in 127.0.0.0/8 or ::1 (IPv4-mapped too), or `localhost` (or a name under
`.localhost`, which resolves to loopback by RFC 6761); a Unix socket is local. Anything else (0.0.0.0,
::, an empty host, a LAN address, a host name) is beyond loopback.
"""

import ipaddress

import attrs

RISK = "anyone who can reach that port can write telemetry into every backend"


def is_loopback(host: str) -> bool:
    """Whether a listener bound to `host` is reachable from this machine only."""
    text = host.strip().lower()
    if text.startswith("unix:"):
        return True
    text = text.removeprefix("[").removesuffix("]").rstrip(".")
    if text == "localhost" or text.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone is not the address
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def source_authenticates(settings) -> bool:
    """Whether a source's settings let only authenticated clients write: TLS with
    `client_ca` (mutual TLS), a token (`authenticates`), or forward's shared key."""
    tls = getattr(settings, "tls", None)
    if tls is not None and tls.client_ca is not None:
        return True
    if getattr(settings, "authenticates", False):
        return True
    return bool(getattr(settings, "shared_key", None) or getattr(settings, "shared_key_env", None))


@attrs.frozen
class Exposure:
    """A listener open beyond loopback to unauthenticated clients. `source` is the source's
    name, None for the HTTP view."""

    source: str | None
    address: str

    @property
    def what(self) -> str:
        return f"source {self.source}" if self.source is not None else "the HTTP view"

    @property
    def warning(self) -> str:
        if self.source is None:
            return (
                f"the HTTP view listens on {self.address}, beyond loopback, with no token: anyone who can reach that port can read "
                "every job, trace and message through /api and tap the live stream; set the variable http.token_env names "
                "(or http.tls with client_ca), or bind http.host to 127.0.0.1"
            )
        return (
            f"source {self.source} listens on {self.address}, beyond loopback, without authentication: {RISK}; "
            "use tls with client_ca (or the source's token or shared key), a Unix socket, or bind it to 127.0.0.1"
        )


def token_configured(http, environ) -> bool:
    """Whether the HTTP view has its bearer token: the variable `http.token_env` names is set."""
    return bool(http.token_env and environ.get(http.token_env))


def exposures(sources, http, http_token: bool) -> list[Exposure]:
    """The listeners open beyond loopback without authentication. `sources`: name -> the
    source's settings (with `host` and `unix`); `http`: the HTTP view's settings; `http_token`:
    whether its token is configured (the variable `http.token_env` names is set)."""
    found = []
    for name, settings in sources.items():
        host = getattr(settings, "host", None)
        if getattr(settings, "unix", None) is None and host is not None and not is_loopback(host) and not source_authenticates(settings):
            found.append(Exposure(name, _address(host, settings.port)))
    if http.enabled and not is_loopback(http.host):
        mutual_tls = http.tls is not None and http.tls.client_ca is not None
        if not (http_token or mutual_tls):
            found.append(Exposure(None, _address(http.host, http.port)))
    return found


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
