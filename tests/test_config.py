"""Loading configuration: the seed's example as written, file:line errors, secrets."""

import attrs
import pytest

from sidecar.config import ConfigError, display_value, load_config
from sidecar.routing import RouteTable
from tests.conftest import SEED_CONFIG
from sidecar.sources.tcp import TcpSettings

TCP_KEYS = ", ".join(f.name for f in attrs.fields(TcpSettings))


def test_the_seeds_config_loads_unchanged_and_routes_as_its_text_says():
    config = load_config(SEED_CONFIG, None)
    assert (config.sources["tcp"].settings.host, config.sources["tcp"].settings.port) == ("0.0.0.0", 17000)
    assert set(config.backends) == {"timescaledb", "nfs-file", "s3", "cloudwatch"}
    table = RouteTable(config.rules)

    def names(source, kind="event"):
        return [s.name for s in table.route({"source": source, "type": kind, "data": {"level": "info", "name": "m"}})]

    # queue-service -> TimescaleDB (metrics and events) + NFS file (events only), priority order
    assert names("queue-service", "event") == ["timescaledb", "nfs-file"]
    assert names("queue-service", "metric") == ["timescaledb"]
    assert names("queue-service", "progress") == []
    # config-service -> S3 only: `default` is for sources with no rule of their own
    assert names("config-service") == ["s3"]
    # every other source -> CloudWatch, its stream named after the source
    assert names("file-receiver") == ["cloudwatch"]
    assert names("db-loader") == ["cloudwatch"]
    nfs = next(r.spec for r in config.rules if r.backend == "nfs-file")
    assert nfs.settings.path == "/mnt/nas/logs/queue-service.jsonl"
    assert nfs.settings.base_path == "/mnt/nas/logs"
    cloudwatch = next(r.spec for r in config.rules if r.backend == "cloudwatch")
    assert setting(cloudwatch, "log_stream") == "{source}"
    assert setting(cloudwatch, "log_group") == "/app/monitoring"


def setting(spec, key):
    """A setting of a backend instance, whether its type is in this build or not."""
    return getattr(spec.settings, key) if spec.available else dict(spec.settings.options)[key]


def problems_of(config_path, routes_dir=None, environ=None):
    with pytest.raises(ConfigError) as caught:
        load_config(config_path, routes_dir, environ if environ is not None else {})
    return [str(p) for p in caught.value.problems]


def test_every_problem_is_reported_with_file_and_line(write):
    main = write(
        "sidecar.yaml",
        """
        tcp:
          port: 99999
          colour: blue
        backends:
          files:
            type: filesystem
            base_path: /tmp/x
            fsync: sometimes
          weird:
            type: carrier-pigeon
        routing:
          svc:
            - backend: nowhere
            - backend: files
              filter: {types: [event, gossip]}
        """,
    )
    problems = problems_of(main)
    assert problems == [
        f"{main}:2: tcp.port: 'port' must be <= 65535: 99999",
        f"{main}:3: unknown key tcp.colour (known keys: {TCP_KEYS})",
        f"{main}:8: backends.files.fsync must be one of batch, interval, never, got 'sometimes'",
        f"{main}:10: unknown backend type 'carrier-pigeon' (known types: cloudwatch, console, filesystem, otlp, postgres, s3)",
    ] + [p for p in problems[4:]]
    assert any(p.startswith(f"{main}:13: rule for 'svc' names unknown backend 'nowhere'") for p in problems)


def test_a_rule_whose_backend_is_not_a_name_is_a_config_error(write):
    main = write("sidecar.yaml", "backends:\n  files:\n    type: filesystem\n    base_path: /tmp/x\n")
    write("routes.d/10-odd.yaml", "svc:\n  - backend: [files]\n  - backend: {name: files}\n")
    problems = problems_of(main, main.parent / "routes.d")
    drop_in = main.parent / "routes.d" / "10-odd.yaml"
    assert [p.split(" (backends:")[0] for p in problems] == [
        f"{drop_in}:2: rule for 'svc' names unknown backend ['files']",
        f"{drop_in}:3: rule for 'svc' names unknown backend {{'name': 'files'}}",
    ]


def test_drop_in_errors_name_the_drop_in_file(write):
    main = write("sidecar.yaml", "backends:\n  files:\n    type: filesystem\n    base_path: /tmp/x\n")
    write("routes.d/10-ok.yaml", "svc:\n  - backend: files\n")
    bad = write("routes.d/20-bad.yaml", "svc:\n  - backend: files\n    enabled: maybe\n    colour: red\n")
    broken = write("routes.d/30-broken.yaml", "svc: [\n")
    problems = problems_of(main, main.parent / "routes.d")
    assert f"{bad}:3: enabled must be true or false, got 'maybe'" in problems
    assert f"{bad}:4: unknown rule key 'colour' (known keys: backend, enabled, priority, filter, config)" in problems
    assert any(p.startswith(f"{broken}:2: invalid YAML") for p in problems)


def test_duplicate_keys_are_rejected_with_their_line(write):
    main = write("sidecar.yaml", "tcp:\n  port: 1\n  port: 2\n")
    assert problems_of(main)[0].startswith(f"{main}:3: invalid YAML: found duplicate key")


def test_path_templates_must_stay_inside_base_path(write):
    main = write(
        "sidecar.yaml",
        """
        backends:
          files:
            type: filesystem
            base_path: /srv/logs
        routing:
          svc:
            - backend: files
              config:
                path: ../../etc/{source}
          other:
            - backend: files
              config:
                path: "{source.__class__}.jsonl"
        """,
    )
    problems = problems_of(main)
    assert f"{main}:9: files config: path '../../etc/{{source}}' must name a file inside base_path '/srv/logs'" in problems
    assert f"{main}:13: files config: path template '{{source.__class__}}.jsonl': unknown placeholder {{source.__class__}} (known: {{source}}, {{type}}, {{date}}, {{host}})" in problems


def test_environment_interpolation_and_secrets_never_shown(write, monkeypatch):
    from sidecar.backends import BACKEND_TYPES

    # a type known to the registry but missing from this build keeps its options as given
    monkeypatch.setitem(BACKEND_TYPES, "tape", ("sidecar.backends.tape", "TapeBackend"))
    main = write(
        "sidecar.yaml",
        """
        backends:
          db:
            type: tape
            connection_string: "postgresql://app:${PGPASSWORD}@db:5432/monitoring"
          files:
            type: filesystem
            base_path: "${LOG_ROOT:-/var/log/monitoring}"
        routing:
          all:
            - backend: files
            - backend: db
        """,
    )
    config = load_config(main, None, {"PGPASSWORD": "s3cr3t"})
    db = next(r.spec for r in config.rules if r.backend == "db")
    value = dict(db.settings.options)["connection_string"]
    assert value == "postgresql://app:s3cr3t@db:5432/monitoring"
    assert "s3cr3t" not in str(display_value(value))
    files = next(r.spec for r in config.rules if r.backend == "files")
    assert files.settings.base_path == "/var/log/monitoring"
    assert display_value("postgresql://app:literal@db/m") == "postgresql://app:***@db/m"
    problems = problems_of(main, None, {})
    assert problems == [f"{main}:2: environment variable PGPASSWORD is not set (use ${{PGPASSWORD:-default}} for a fallback)"]


def test_durations_and_sizes_read_with_units(write):
    main = write(
        "sidecar.yaml",
        """
        tcp: {max_message_size: 2MiB}
        backends:
          files:
            type: filesystem
            base_path: /tmp/x
            batch: {timeout: 250ms, max_messages: 10}
            queue: {max_bytes: 256MiB, when_full: block}
            retry: {max_backoff: 2m}
        routing:
          all: [{backend: files}]
        """,
    )
    config = load_config(main, None, {})
    assert config.sources["tcp"].settings.max_message_size == 2 * 1024 * 1024
    delivery = config.backends["files"].delivery
    assert delivery.batch.timeout == 0.25 and delivery.batch.max_messages == 10
    assert delivery.queue.when_full == "block" and delivery.queue.max_bytes == 256 * 1024**2 and delivery.queue.mode == "disk"
    assert delivery.retry.max_backoff == 120.0


@pytest.mark.parametrize(
    "queue, problem",
    [
        ("{when_full: drop_oldest}", "backends.files.queue: when_full: drop_oldest needs mode: memory (a disk queue drops the newest at its cap, or blocks)"),
        ("{mode: memory, when_full: spill}", "backends.files.queue: when_full: spill needs mode: disk (the default)"),
        ("{mode: tape}", "backends.files.queue.mode must be one of disk, memory, got 'tape'"),
        ("{spill_max_bytes: 1GiB}", "unknown key backends.files.queue.spill_max_bytes (known keys: mode, max_messages, max_bytes, when_full)"),
    ],
)
def test_a_queue_that_cannot_be_is_named_at_its_line(write, queue, problem):
    main = write("sidecar.yaml", f"""
        backends:
          files:
            type: filesystem
            base_path: /tmp/x
            queue: {queue}
        routing:
          all: [{{backend: files}}]
        """)
    with pytest.raises(ConfigError) as raised:
        load_config(main, None, {})
    assert f"{main}:5: {problem}" in str(raised.value)


def test_a_queue_named_spill_is_a_disk_queue_that_drops_the_newest(write):
    main = write("sidecar.yaml", """
        backends:
          files: {type: filesystem, base_path: /tmp/x, queue: {when_full: spill}}
        routing:
          all: [{backend: files}]
        """)
    queue = load_config(main, None, {}).backends["files"].delivery.queue
    assert (queue.mode, queue.overflow) == ("disk", "drop_newest")


def test_the_embedded_default_needs_nothing_outside():
    config = load_config(None, None)
    assert (config.sources["tcp"].settings.host, config.sources["tcp"].settings.port) == ("127.0.0.1", 17000)
    assert {r.backend for r in config.rules} == {"files", "console"}


def test_the_example_routes_d_loads_with_the_embedded_default():
    from pathlib import Path

    routes = Path(__file__).parent.parent / "routes.d"
    config = load_config(None, routes)
    assert len(config.files) > 1


def test_key_value_passwords_are_hidden_too():
    assert display_value("host=db user=app password=s3cr3t dbname=m") == "host=db user=app password=*** dbname=m"
    assert display_value("host=db password='with space' dbname=m") == "host=db password='***' dbname=m"
