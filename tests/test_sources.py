"""Sources: the `sources:` map beside the `tcp:` section, several at once, a Unix socket, and
each source's counters under its name."""

import socket

import attrs
import pytest

from sidecar.config import load_config
from sidecar.sources.tcp import TcpSettings
from tests.harness import SidecarProcess, encode, event, read_jsonl, seqs
from tests.test_config import problems_of

CONFIG = """
sources:
  apps:
    type: tcp
    host: 127.0.0.1
    port: 0
  batch-jobs:
    type: tcp
    unix: {socket}
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    batch: {{max_messages: 100, timeout: 0.05}}
routing:
  all:
    - backend: files
"""


def test_without_a_sources_map_the_tcp_section_is_the_source_named_tcp(write):
    config = load_config(write("sidecar.yaml", "tcp: {host: 127.0.0.1, port: 18000}\n"), None)
    assert list(config.sources) == ["tcp"] and config.sources["tcp"].settings.port == 18000
    assert list(load_config(write("other.yaml", "backends: {}\n"), None).sources) == ["tcp"]  # its defaults


def test_a_sources_map_alone_listens_only_where_it_says(write):
    config = load_config(write("sidecar.yaml", "sources:\n  a: {type: tcp, port: 18001}\n  b: {type: tcp, unix: /tmp/x.sock}\n"), None)
    assert [(s.name, s.type, s.settings.where) for s in config.sources.values()] == [("a", "tcp", "127.0.0.1:18001"), ("b", "tcp", "unix:/tmp/x.sock")]


def test_source_mistakes_are_reported_at_their_lines(write):
    main = write(
        "sidecar.yaml",
        """
        tcp: {port: 0}
        sources:
          tcp: {type: tcp}
          pigeons: {type: carrier-pigeon}
          untyped: {port: 1}
          "a b": {type: tcp}
          apps: {type: tcp, colour: blue}
        """,
    )
    problems = problems_of(main)
    assert problems == [
        f"{main}:3: source 'tcp' is defined twice (the `tcp:` section is the source named tcp)",
        f"{main}:4: unknown source type 'carrier-pigeon' (known types: forward, otlp, tcp)",
        f"{main}:5: source 'untyped' needs a type",
        f"{main}:6: source name 'a b' must be letters, digits, '.', '_' or '-'",
        f"{main}:7: unknown key sources.apps.colour (known keys: {', '.join(f.name for f in attrs.fields(TcpSettings))})",
    ]


def test_several_sources_feed_one_pipeline_each_counted_under_its_name(tmp_path):
    unix_path = tmp_path / "sidecar.sock"
    sidecar = SidecarProcess(tmp_path, CONFIG.format(socket=unix_path, base=tmp_path / "out")).start()
    try:
        sources = sidecar.stats()["sources"]
        assert set(sources) == {"apps", "batch-jobs", "tcp"} and sources["batch-jobs"]["address"] == f"unix:{unix_path}"
        apps_port = int(sources["apps"]["address"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", apps_port)) as apps:
            apps.sendall(encode([event("svc", i) for i in range(0, 30)]))
        with socket.socket(socket.AF_UNIX) as batch_jobs:
            batch_jobs.connect(str(unix_path))
            batch_jobs.sendall(encode([event("svc", i) for i in range(30, 50)], "msgpack"))
        sidecar.send([event("svc", i) for i in range(50, 60)])  # the `tcp:` section's source
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 60, what="all 60 delivered")
        assert {name: s["received"] for name, s in stats["sources"].items()} == {"apps": 30, "batch-jobs": 20, "tcp": 10}
        assert stats["received"] == 60
        assert sorted(seqs(read_jsonl(tmp_path / "out" / "svc.jsonl"))) == list(range(60))
    finally:
        assert sidecar.stop() == 0


def test_the_metrics_carry_each_sources_name(tmp_path):
    config = CONFIG.format(socket=tmp_path / "s.sock", base=tmp_path / "out") + "http: {enabled: true, host: 127.0.0.1, port: 0}\n"
    sidecar = SidecarProcess(tmp_path, config).start()
    try:
        sidecar.send([event("svc", 0), {"source": "svc", "type": "gossip"}])
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="one delivered")
        status, body = sidecar.http("/metrics")
        text = body.decode()
        assert status == 200
        assert 'sidecar_messages_received_total{input="tcp"} 1.0' in text
        assert 'sidecar_messages_received_total{input="apps"} 0.0' not in text  # no series for what never happened
        assert 'sidecar_decode_errors_total{input="tcp",reason="unknown_type"} 1.0' in text
        assert 'sidecar_connections_active{input="apps"} 0.0' in text and 'sidecar_connections_active{input="batch-jobs"} 0.0' in text
        status, ready = sidecar.http("/readyz")
        assert status == 200
    finally:
        assert sidecar.stop() == 0


def test_a_unix_socket_left_by_a_killed_run_is_taken_over(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, as after SIGKILL
    sidecar = SidecarProcess(tmp_path, CONFIG.format(socket=path, base=tmp_path / "out")).start()
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.sendall(encode([event("svc", 1)]))
        sidecar.wait_for(lambda s: s["sources"]["batch-jobs"]["received"] == 1, what="the message over the socket")
    finally:
        assert sidecar.stop() == 0
    assert not path.exists(), "a clean exit removes its socket"


def test_a_unix_path_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    sidecar = SidecarProcess(tmp_path, CONFIG.format(socket=path, base=tmp_path / "out"))
    with pytest.raises(AssertionError, match="exited"):
        sidecar.start(timeout=10)
    assert path.read_text() == "keep me"
    assert f"error: source batch-jobs: cannot listen on unix:{path}: Address already in use" in sidecar.log()
    assert "Traceback" not in sidecar.log()


def test_a_port_in_use_is_one_line_naming_the_source_and_no_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = f"tcp: {{host: 127.0.0.1, port: {port}}}\nbackends: {{files: {{type: filesystem, base_path: {tmp_path}/out, create_base_path: true}}}}\nrouting: {{all: [{{backend: files}}]}}\n"
        sidecar = SidecarProcess(tmp_path, config)
        with pytest.raises(AssertionError, match="exited with 1"):
            sidecar.start(timeout=10)
    assert f"error: source tcp: cannot listen on 127.0.0.1:{port}: Address already in use" in sidecar.log()
    assert "Traceback" not in sidecar.log()
