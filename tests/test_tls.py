"""TLS on the stream sources and the HTTP view, with real certificates (trustme) and real
clients: Python's ssl sockets, the OpenTelemetry SDK's HTTP exporter, a raw forward client.

A client trusting the CA gets in and delivers; a plaintext client on a TLS port, a client
without a certificate or with one from another CA under mutual TLS: each refused, counted as
`connections_refused_total{reason="tls"}`, and nothing it sent reaches a backend."""

import socket
import ssl
import time
import urllib.error
import urllib.request

import orjson
import pytest
import trustme
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from sidecar.config import load_config
from sidecar.tls import TlsSettings, server_context
from tests.harness import SidecarProcess, event, read_jsonl, wait_until
from tests.test_config import problems_of
from tests.test_forward_source import ForwardClient


class Certificates:
    """A server CA and the sidecar's certificate, a client CA with one client, and a rogue CA
    with a client of its own, written as PEM files under `directory`."""

    def __init__(self, directory):
        self.directory = directory
        self.authority = trustme.CA()
        self.server = self.authority.issue_cert("localhost", "127.0.0.1")
        self.client_authority = trustme.CA()
        self.client = self.client_authority.issue_cert("client.example")
        self.rogue = trustme.CA().issue_cert("client.example")
        self.cert = self._write("cert.pem", self.server.cert_chain_pems[0].bytes())
        self.key = self._write("key.pem", self.server.private_key_pem.bytes())
        self.ca = self._write("ca.pem", self.authority.cert_pem.bytes())
        self.client_ca = self._write("client-ca.pem", self.client_authority.cert_pem.bytes())
        self.client_cert = self._write("client-cert.pem", self.client.cert_chain_pems[0].bytes())
        self.client_key = self._write("client-key.pem", self.client.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def client_context(self, identity=None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.authority.configure_trust(context)
        if identity is not None:
            identity.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return Certificates(tmp_path_factory.mktemp("certificates"))


CONFIG = """
sources:
  sdk: {{type: tcp, host: 127.0.0.1, port: 0, tls: {{cert: {cert}, key: {key}, handshake_timeout: 2s}}}}
  sdk-mtls: {{type: tcp, host: 127.0.0.1, port: 0, tls: {{cert: {cert}, key: {key}, client_ca: {client_ca}}}}}
  fluent: {{type: forward, host: 127.0.0.1, port: 0, tls: {{cert: {cert}, key: {key}, client_ca: {client_ca}}}}}
  otel: {{type: otlp, host: 127.0.0.1, port: 0, tls: {{cert: {cert}, key: {key}, client_ca: {client_ca}}}}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


@pytest.fixture(scope="module")
def sidecar(certificates, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls-sidecar")
    process = SidecarProcess(workdir, CONFIG.format(cert=certificates.cert, key=certificates.key, client_ca=certificates.client_ca, base=workdir / "out")).start()
    process.out = workdir / "out"
    yield process
    assert process.stop() == 0


def port_of(sidecar: SidecarProcess, source: str) -> int:
    return int(sidecar.stats()["sources"][source]["address"].rsplit(":", 1)[1])


def refused(sidecar: SidecarProcess, source: str) -> int:
    for line in sidecar.http("/metrics")[1].decode().splitlines():
        if line.startswith(f'sidecar_connections_refused_total{{input="{source}",reason="tls"}} '):
            return int(float(line.split()[-1]))
    return 0


def line(source: str, seq: int = 0) -> bytes:
    return orjson.dumps(event(source, seq)) + b"\n"


def send_over_tls(port: int, context: ssl.SSLContext, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""  # the sidecar read everything and closed


def attempt(port: int, payload: bytes, context: ssl.SSLContext | None = None) -> None:
    """Connect (over TLS when `context` is given), send `payload`, and read until the
    sidecar closes: whatever fails on the way is the refusal, from the client's side."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            conn = context.wrap_socket(raw, server_hostname="localhost") if context is not None else raw
            conn.sendall(payload)
            while conn.recv(4096):
                pass
    except (ssl.SSLError, ConnectionError):
        pass


def arrives(sidecar: SidecarProcess, source: str, count: int = 1) -> list[dict]:
    return wait_until(lambda: len(found := read_jsonl(sidecar.out / f"{source}.jsonl")) >= count and found, what=f"{count} from {source}")


# ------------------------------------------------------------------ tcp


def test_a_client_trusting_the_ca_delivers_over_tls(sidecar, certificates):
    send_over_tls(port_of(sidecar, "sdk"), certificates.client_context(), line("tls-ok", 1) + line("tls-ok", 2))
    assert [m["context"]["seq"] for m in arrives(sidecar, "tls-ok", 2)] == [1, 2]
    assert sidecar.stats()["sources"]["sdk"]["tls"] is True


def test_a_plaintext_client_on_a_tls_port_is_refused_counted_and_delivers_nothing(sidecar, certificates):
    port = port_of(sidecar, "sdk")
    before = refused(sidecar, "sdk")
    attempt(port, line("plaintext-intruder"))
    wait_until(lambda: refused(sidecar, "sdk") == before + 1, what="the plaintext client counted")
    # A client that connects and says nothing is refused too, after tls.handshake_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert 1.5 < time.monotonic() - started < 6
    wait_until(lambda: refused(sidecar, "sdk") == before + 2, what="the silent client counted")
    # What a good client sends after them arrives; what they sent never does.
    send_over_tls(port, certificates.client_context(), line("after-plaintext"))
    arrives(sidecar, "after-plaintext")
    assert not (sidecar.out / "plaintext-intruder.jsonl").exists()
    assert "TLS handshake with 127.0.0.1" in sidecar.log() and "does not speak TLS" in sidecar.log()


def test_mutual_tls_lets_in_only_a_certificate_the_client_ca_signed(sidecar, certificates):
    port = port_of(sidecar, "sdk-mtls")
    before = refused(sidecar, "sdk-mtls")
    attempt(port, line("no-certificate"), certificates.client_context())
    attempt(port, line("rogue-certificate"), certificates.client_context(certificates.rogue))
    attempt(port, line("plaintext"))
    wait_until(lambda: refused(sidecar, "sdk-mtls") == before + 3, what="three refusals counted")
    send_over_tls(port, certificates.client_context(certificates.client), line("mtls-ok"))
    arrives(sidecar, "mtls-ok")
    for intruder in ("no-certificate", "rogue-certificate", "plaintext"):
        assert not (sidecar.out / f"{intruder}.jsonl").exists()
    assert "presented no certificate" in sidecar.log()


# ------------------------------------------------------------------ forward and otlp


def test_forward_under_mutual_tls(sidecar, certificates):
    port = port_of(sidecar, "fluent")
    client = ForwardClient(port, tls_context=certificates.client_context(certificates.client))
    client.send(["fluent-mtls", [[1700000000, {"log": "over mutual TLS"}]], {"chunk": "bXRscw=="}])
    assert client.read() == {"ack": "bXRscw=="}
    client.close()
    assert [m["data"]["message"] for m in arrives(sidecar, "fluent-mtls")] == ["over mutual TLS"]
    before = refused(sidecar, "fluent")
    try:
        stranger = ForwardClient(port, tls_context=certificates.client_context(certificates.rogue))
        stranger.send(["fluent-rogue", 1700000000, {"log": "let me in"}])
        assert stranger.read() is None
    except (ssl.SSLError, ConnectionError):
        pass
    wait_until(lambda: refused(sidecar, "fluent") == before + 1, what="the rogue forward client counted")
    assert not (sidecar.out / "fluent-rogue.jsonl").exists()


def export_span(port: int, name: str, certificates: Certificates, client_identity: bool) -> bool:
    exporter = OTLPSpanExporter(
        endpoint=f"https://localhost:{port}/v1/traces",
        certificate_file=certificates.ca,
        client_certificate_file=certificates.client_cert if client_identity else None,
        client_key_file=certificates.client_key if client_identity else None,
        timeout=3,
    )
    traces = TracerProvider(resource=Resource.create({"service.name": name}))
    outcome = []

    class Recording(SimpleSpanProcessor):
        def on_end(self, span):
            outcome.append(self.span_exporter.export((span,)))

    traces.add_span_processor(Recording(exporter))
    with traces.get_tracer(name).start_as_current_span("secure-operation"):
        pass
    traces.shutdown()
    return outcome[0].name == "SUCCESS"


def test_otlp_from_the_opentelemetry_sdk_under_mutual_tls(sidecar, certificates, monkeypatch):
    # requests prefers these variables to the exporter's own CA file (psf/requests#3829)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    port = port_of(sidecar, "otel")
    assert export_span(port, "otel-mtls", certificates, client_identity=True)
    spans = arrives(sidecar, "otel-mtls", 2)
    assert {(m["type"], m["data"]["name"], m["data"]["phase"]) for m in spans} == {("span", "secure-operation", "start"), ("span", "secure-operation", "end")}
    before = refused(sidecar, "otel")
    assert not export_span(port, "otel-anonymous", certificates, client_identity=False)
    wait_until(lambda: refused(sidecar, "otel") > before, what="the exporter without a certificate counted")
    assert not (sidecar.out / "otel-anonymous.jsonl").exists()


# ------------------------------------------------------------------ the HTTP view


def test_the_http_view_over_tls_and_under_mutual_tls(tmp_path, certificates):
    config = f"""
    tcp: {{host: 127.0.0.1, port: 0}}
    http: {{host: 127.0.0.1, port: 0, tls: {{cert: {certificates.cert}, key: {certificates.key}, client_ca: {certificates.client_ca}}}}}
    """
    env = {"MONITORING_SIDECAR_HTTP": ""}  # the config's address, not the harness's override
    process = SidecarProcess(tmp_path, config, env=env).start()
    try:
        found = wait_until(lambda: __import__("re").search(r"HTTP view on https://127\.0\.0\.1:(\d+)/", process.log()), what="the view over https")
        url = f"https://localhost:{found.group(1)}/healthz"
        with urllib.request.urlopen(url, context=certificates.client_context(certificates.client), timeout=10) as response:
            assert response.status == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=certificates.client_context(), timeout=10).read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=10).read()
    finally:
        assert process.stop() == 0


# ------------------------------------------------------------------ settings


def test_the_server_context_is_tls_1_2_or_later_and_trusts_only_the_client_ca(certificates):
    plain = server_context(TlsSettings(certificates.cert, certificates.key))
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2 and plain.verify_mode == ssl.CERT_NONE
    mutual = server_context(TlsSettings(certificates.cert, certificates.key, certificates.client_ca))
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    # Only the client CA: not the system's (create_default_context would have loaded those).
    assert [c["subject"] for c in mutual.get_ca_certs()] == [c["subject"] for c in ssl.create_default_context(cafile=certificates.client_ca).get_ca_certs()]


def test_tls_files_that_cannot_serve_are_errors_at_their_lines(write, certificates, tmp_path):
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(trustme.CA().issue_cert("elsewhere").private_key_pem.bytes())
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    not_pem = tmp_path / "not-pem.txt"
    not_pem.write_text("hello\n")
    main = write(
        "sidecar.yaml",
        f"""
        sources:
          a:
            type: tcp
            tls:
              cert: {tmp_path / 'missing.pem'}
              key: {certificates.key}
          b:
            type: tcp
            tls: {{cert: {certificates.cert}, key: {other_key}}}
          c:
            type: forward
            tls:
              cert: {certificates.cert}
              key: {encrypted}
          d:
            type: otlp
            tls:
              cert: {certificates.cert}
              key: {certificates.key}
              client_ca: {not_pem}
        http:
          tls: {{cert: {not_pem}, key: {certificates.key}}}
        """,
    )
    problems = problems_of(main)
    assert f"{main}:5: sources.a.tls.cert: certificate {tmp_path / 'missing.pem'}: no such file" in problems
    assert f"{main}:9: sources.b.tls: the key {other_key} does not belong to the certificate {certificates.cert}" in problems
    assert any(p.startswith(f"{main}:14: sources.c.tls.key: key {encrypted}: the key is encrypted") for p in problems), problems
    assert f"{main}:20: sources.d.tls.client_ca: client_ca {not_pem}: no PEM certificate in it to trust" in problems
    assert any(p.startswith(f"{main}:22: http.tls.cert: certificate {not_pem}: no PEM certificate in it") for p in problems), problems
    assert len(problems) == 5
    assert "PRIVATE KEY" not in "\n".join(problems).replace("PRIVATE KEY-----", "")  # no key material, only names


def test_the_tls_setting_is_shown_by_where_and_loads_with_good_files(write, certificates):
    main = write("sidecar.yaml", f"tcp: {{host: 127.0.0.1, port: 0, tls: {{cert: {certificates.cert}, key: {certificates.key}}}}}\n")
    settings = load_config(main, None).sources["tcp"].settings
    assert settings.tls == TlsSettings(certificates.cert, certificates.key) and settings.where == "127.0.0.1:0 (TLS)"
