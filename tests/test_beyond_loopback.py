"""Listeners beyond loopback without authentication: one judgement (sidecar/config/exposure.py),
a warning from `check` and `run`, a config error at the host's line with
`security.require_auth_beyond_loopback: true`. The seed's `tcp.host: "0.0.0.0"` still loads and
runs, with the warning."""

import ipaddress
import signal

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import HttpSettings, load_config
from sidecar.config.exposure import exposures, is_loopback
from sidecar.sources.forward import ForwardSettings
from sidecar.sources.otlp import OtlpSettings
from sidecar.sources.tcp import TcpSettings
from sidecar.tls import TlsSettings
from tests.conftest import SEED_CONFIG
from tests.harness import SidecarProcess, wait_until
from tests.test_cli import cli
from tests.test_config import problems_of

# ------------------------------------------------------------------ what counts as loopback

loopback_v4 = st.integers(min_value=0x7F000000, max_value=0x7FFFFFFF).map(lambda n: str(ipaddress.IPv4Address(n)))
other_v4 = st.integers(min_value=0, max_value=2**32 - 1).filter(lambda n: n >> 24 != 127).map(lambda n: str(ipaddress.IPv4Address(n)))
other_v6 = st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: not a.is_loopback and (a.ipv4_mapped is None or not a.ipv4_mapped.is_loopback)).map(str)
names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)


@given(loopback_v4)
def test_every_address_in_127_0_0_0_8_is_loopback(host):
    assert is_loopback(host) and is_loopback(f"::ffff:{host}")


@given(other_v4)
def test_every_other_ipv4_address_is_beyond_loopback(host):
    assert not is_loopback(host) and not is_loopback(f"::ffff:{host}")


@given(other_v6)
def test_every_ipv6_address_but_1_is_beyond_loopback(host):
    assert not is_loopback(host) and not is_loopback(f"[{host}]")


@given(names)
def test_a_host_name_is_loopback_only_when_it_is_localhost(name):
    assert is_loopback(name) == (name == "localhost" or name.endswith(".localhost"))
    assert is_loopback(f"{name}.localhost") and is_loopback(name.upper() + ".LOCALHOST")


@given(st.text())
def test_a_unix_socket_is_local(path):
    assert is_loopback(f"unix:{path}")


@pytest.mark.parametrize("host", ["::1", "[::1]", "0:0:0:0:0:0:0:1", "localhost", "LocalHost", "localhost.", "127.0.0.1", "127.255.255.254"])
def test_the_usual_loopback_spellings(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "192.168.1.10", "10.0.0.1", "fe80::1%eth0", "myhost", "localhost.example.com", "128.0.0.1"])
def test_the_usual_wildcards_and_lan_addresses(host):
    assert not is_loopback(host)


# ------------------------------------------------------------------ what counts as authenticated


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    server = authority.issue_cert("localhost")
    paths = {name: directory / f"{name}.pem" for name in ("cert", "key", "ca")}
    paths["cert"].write_bytes(server.cert_chain_pems[0].bytes())
    paths["key"].write_bytes(server.private_key_pem.bytes())
    paths["ca"].write_bytes(authority.cert_pem.bytes())
    return {name: str(path) for name, path in paths.items()}


def test_exposed_means_beyond_loopback_and_without_authentication(tls_files):
    server_tls = TlsSettings(tls_files["cert"], tls_files["key"])
    mutual_tls = TlsSettings(tls_files["cert"], tls_files["key"], tls_files["ca"])
    sources = {
        "local": TcpSettings(),
        "open": TcpSettings(host="0.0.0.0"),
        "encrypted-only": TcpSettings(host="0.0.0.0", tls=server_tls),
        "mutual": TcpSettings(host="0.0.0.0", tls=mutual_tls),
        "socket": TcpSettings(host="0.0.0.0", unix="/run/sidecar.sock"),
        "fluent-keyed": ForwardSettings(host="::", shared_key_env="FLUENT_KEY"),
        "fluent-open": ForwardSettings(host="::"),
        "otel-open": OtlpSettings(host="192.168.1.10"),
        "otel-mutual": OtlpSettings(host="192.168.1.10", tls=mutual_tls),
        "tokened": TcpSettings(host="0.0.0.0", token_env="INGEST_TOKEN"),
    }
    found = exposures(sources)
    assert [(e.source, e.address) for e in found] == [("open", "0.0.0.0:17000"), ("encrypted-only", "0.0.0.0:17000"), ("fluent-open", "[::]:24224"), ("otel-open", "192.168.1.10:4318")]
    assert "anyone who can reach that port can write telemetry into every backend" in found[0].warning
    assert "source open listens on 0.0.0.0:17000" in found[0].warning


# ------------------------------------------------------------------ the seed, check and run

REQUIRED = "security:\n  require_auth_beyond_loopback: true\n"


def test_check_warns_of_the_seeds_0_0_0_0_and_still_passes():
    result = cli("check", "--config", str(SEED_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "warning: source tcp listens on 0.0.0.0:17000, beyond loopback, without authentication: anyone who can reach that port can write telemetry into every backend" in result.stdout


def test_the_seed_as_written_runs_with_the_warning(tmp_path):
    # The seed's own file, its host 0.0.0.0 kept: only the port is moved to a free one.
    sidecar = SidecarProcess(tmp_path, SEED_CONFIG.read_text(), extra_args=["--listen", "0.0.0.0:0"]).start()
    try:
        assert "level=warning" in sidecar.log() and "source tcp listens on 0.0.0.0:0, beyond loopback, without authentication" in sidecar.log()
        sidecar.send([{"source": "anyone", "type": "event", "data": {"level": "info", "message": "from anywhere"}}])
        sidecar.wait_for(lambda s: s["received"] == 1, what="the message taken in")
    finally:
        assert sidecar.stop() == 0


def test_require_auth_refuses_the_seed_at_its_host_line(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(REQUIRED + SEED_CONFIG.read_text())
    host_line = 2 + next(i for i, line in enumerate(SEED_CONFIG.read_text().splitlines(), 1) if line.strip().startswith("host:"))
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    expected = f"error: {config}:{host_line}: tcp.host: source tcp would listen on 0.0.0.0:17000, beyond loopback, without authentication, and security.require_auth_beyond_loopback is true"
    assert result.stderr.startswith(expected), result.stderr
    assert "bind tcp.host to 127.0.0.1" in result.stderr
    run = cli("run", "--config", str(config))
    assert run.returncode == 2 and run.stderr.splitlines()[-2].startswith(expected), run.stderr


def test_require_auth_names_each_open_listener_and_accepts_the_authenticated_ones(write, tls_files):
    main = write(
        "sidecar.yaml",
        f"""
        security: {{require_auth_beyond_loopback: true}}
        sources:
          open:
            type: otlp
            host: 0.0.0.0
          mutual: {{type: tcp, host: 0.0.0.0, tls: {{cert: {tls_files['cert']}, key: {tls_files['key']}, client_ca: {tls_files['ca']}}}}}
          keyed: {{type: forward, host: 0.0.0.0, shared_key_env: FLUENT_KEY}}
          local: {{type: tcp, unix: /tmp/sidecar-test.sock}}
        http:
          host: 0.0.0.0
        """,
    )
    problems = problems_of(main, environ={"FLUENT_KEY": "k"})
    assert problems == [
        f"{main}:5: sources.open.host: source open would listen on 0.0.0.0:4318, beyond loopback, without authentication, and security.require_auth_beyond_loopback is true: set its tls with client_ca (or its token or shared key), use a Unix socket (unix:), or bind it to 127.0.0.1",
    ]
    # The view beyond loopback is not among them: its /api needs a token, its own or one it makes.
    # Without the setting, the same file loads (and check and run warn).
    relaxed = write("relaxed.yaml", main.read_text().replace("true", "false"))
    assert list(load_config(relaxed, None, {"FLUENT_KEY": "k"}).sources) == ["open", "mutual", "keyed", "local"]


def test_run_refuses_what_listen_would_open_beyond_loopback_under_require_auth(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(REQUIRED + "tcp: {host: 127.0.0.1, port: 0}\n")
    result = cli("run", "--config", str(config), "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "error: source tcp would listen on 0.0.0.0:0 (from --listen), beyond loopback, without authentication" in result.stderr


def test_a_view_beyond_loopback_is_not_warned_of_it_guards_its_api_with_a_token_of_its_own(tmp_path):
    """No warning for the view: without a configured token it makes one, and every /api route
    needs it; with one, that one. The token is never in the log."""
    config = "tcp: {host: 127.0.0.1, port: 0}\n"
    (tmp_path / "open").mkdir()
    made = SidecarProcess(tmp_path / "open", config, env={"MONITORING_SIDECAR_HTTP": "0.0.0.0:0", "MONITORING_SIDECAR_TOKEN": ""}).start()
    try:
        wait_until(lambda: "HTTP view: every /api route needs the bearer token" in made.log(), what="the view's token line")
        assert "beyond loopback" not in made.log()
        assert made.http("/api/jobs")[0] == 401
        token = cli("token", "--config", str(made.config_path), cwd=made.workdir, env={"MONITORING_SIDECAR_HTTP": "0.0.0.0:0", "MONITORING_SIDECAR_TOKEN": ""}).stdout.strip()
        assert token and token not in made.log()
        assert made.http("/api/jobs", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        assert made.stop(signal.SIGTERM) == 0
    (tmp_path / "token").mkdir()
    with_token = SidecarProcess(tmp_path / "token", config, env={"MONITORING_SIDECAR_HTTP": "0.0.0.0:0", "MONITORING_SIDECAR_TOKEN": "secret-token"}).start()
    try:
        assert "beyond loopback" not in with_token.log() and "secret-token" not in with_token.log()
    finally:
        assert with_token.stop() == 0
