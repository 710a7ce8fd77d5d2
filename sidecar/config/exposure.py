"""Which sources are open beyond this machine without authentication: the judgement `check`
and `run` warn with, and that `security.require_auth_beyond_loopback` turns into a refusal.

The HTTP view is never among them: beyond loopback every `/api` route needs its bearer token,
the configured one or, without it, one the view makes in `storage.data_dir` (sidecar.http).

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
    """A source open beyond loopback to unauthenticated clients."""

    source: str
    address: str

    @property
    def what(self) -> str:
        return f"source {self.source}"

    @property
    def warning(self) -> str:
        return (
            f"source {self.source} listens on {self.address}, beyond loopback, without authentication: {RISK}; "
            "use tls with client_ca (or the source's token or shared key), a Unix socket, or bind it to 127.0.0.1"
        )


def exposures(sources) -> list[Exposure]:
    """The sources open beyond loopback without authentication. `sources`: name -> the
    source's settings (with `host` and `unix`)."""
    found = []
    for name, settings in sources.items():
        host = getattr(settings, "host", None)
        if getattr(settings, "unix", None) is None and host is not None and not is_loopback(host) and not source_authenticates(settings):
            found.append(Exposure(name, _address(host, settings.port)))
    return found


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
