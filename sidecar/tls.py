"""TLS for what the sidecar serves: the stream sources (tcp, forward, otlp) and the HTTP view.

`TlsSettings` is the `tls:` setting they share, checked when the config is loaded: a file that
cannot be read, a certificate or key that is not PEM, an encrypted key, or a key that does not
belong to the certificate is a problem at the line of the setting at fault. `server_context`
builds the `ssl.SSLContext` a server side uses: TLS 1.2 at least, and with `client_ca` mutual
TLS, every client presenting a certificate that CA signed.
"""

import ssl

import attrs

from sidecar.units import Duration

_CERTIFICATE_MARK = "-----BEGIN CERTIFICATE-----"


def _pem_text(path: str, what: str) -> str:
    """The file's text, or ValueError saying why it cannot be read (never its content)."""
    try:
        with open(path, "rb") as file:
            data = file.read(16 * 1024 * 1024)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise ValueError(f"{what} {path}: permission denied (make it readable for the sidecar's user)") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path}: is a directory, not a PEM file") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    return data.decode("ascii", errors="replace")


def _check_certificate(_instance, attribute, path: str) -> None:
    text = _pem_text(path, "certificate")
    start = text.find(_CERTIFICATE_MARK)
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError(f"certificate {path}: no PEM certificate in it (a block starting {_CERTIFICATE_MARK})")
    try:
        ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])
    except ValueError:
        raise ValueError(f"certificate {path}: its first PEM certificate is not valid base64") from None


def _check_key(_instance, attribute, path: str) -> None:
    text = _pem_text(path, "key")
    if "PRIVATE KEY-----" not in text:
        raise ValueError(f"key {path}: no PEM private key in it (a block starting -----BEGIN PRIVATE KEY-----)")
    if "ENCRYPTED" in text:
        raise ValueError(f"key {path}: the key is encrypted; the sidecar reads unencrypted keys only (protect the file by its permissions)")


def _check_client_ca(_instance, attribute, path: str | None) -> None:
    if path is None:
        return
    _pem_text(path, "client_ca")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"client_ca {path}: no PEM certificate in it to trust") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted; the sidecar reads unencrypted keys only")


@attrs.frozen
class TlsSettings:
    """`tls: {cert, key, client_ca}`: PEM files. With `client_ca`, every client must present a
    certificate that one of its certificates signed (mutual TLS); only those are trusted, never
    the system's CAs."""

    cert: str = attrs.field(validator=_check_certificate)
    key: str = attrs.field(validator=_check_key)
    client_ca: str | None = attrs.field(default=None, validator=_check_client_ca)
    # A client must finish the TLS handshake within this, or its connection is closed.
    handshake_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key, password=_no_password)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ValueError(f"the key {self.key} does not belong to the certificate {self.cert}") from None
            raise ValueError(f"cannot use the certificate {self.cert} with the key {self.key}: {exc.reason or exc}") from None

    @property
    def authenticates(self) -> bool:
        """Whether only clients with a certificate get in (mutual TLS)."""
        return self.client_ca is not None


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The server side's context: TLS 1.2 or later, the certificate and key, and with
    `client_ca` a client certificate required and checked against that CA alone."""
    # Not create_default_context(CLIENT_AUTH): it loads the system's CAs, and under mutual TLS
    # a certificate any public CA signed would then get in.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
