"""SDK conformance suite: every language's driver replays every scenario against a capture server,
over TCP and over a Unix socket; what arrives must match the scenario's expectations and the wire
protocol v1 schema. End to end, drivers send through a real sidecar over both transports, and
with the ingest token (right: delivered; wrong: refused, counted, nothing delivered).

    .venv/bin/python -m pytest sdk_clients/conformance -q

The driver contract is DRIVERS.md beside this file. A language whose SDK directory exists but
whose driver is missing or not built fails; a language without an SDK directory is skipped. The
suite never builds drivers (the Makefile does that first).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conformance_kit as kit  # noqa: E402

if str(kit.REPO) not in sys.path:
    sys.path.insert(0, str(kit.REPO))

SCENARIOS = kit.load_scenarios()
LANGUAGES = {lang.name: lang for lang in kit.LANGUAGES}


def require(language: kit.Language) -> None:
    if not language.present():
        pytest.skip(f"{language.name}: no SDK in {language.sdk_dir}/")
    problem = language.problem()
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def socket_dir():
    """A short directory for Unix sockets (a socket's path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="conformance-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def capture_server(transport: str, socket_dir: Path) -> kit.CaptureServer:
    return kit.CaptureServer(unix=socket_dir / "sidecar.sock" if transport == "unix" else None)


@pytest.fixture(scope="module")
def validator():
    try:
        return kit.schema_validator()
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)


# -- the suite's own checks (no driver involved) --------------------------------------------------

def test_schema_is_draft_2020_12_and_accepts_the_design_examples(validator):
    good = [
        {"source": "queue-service", "type": "progress", "timestamp": "2025-10-20T10:30:45.123Z",
         "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "4f2a9c1d0b7e6a53",
         "context": {"job_id": "job-12345"}, "data": {"job_id": "job-12345", "percent": 0, "status": "started"}},
        {"source": "s", "type": "event", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"level": "warning", "message": ""}},
        {"source": "s", "type": "metric", "timestamp": "2025-10-20T10:30:45.123Z",
         "data": {"name": "sdk.dropped_messages", "value": 3, "unit": "count", "tags": {"reason": "buffer_full"}}},
        {"source": "s", "type": "resource", "timestamp": "2025-10-20T10:30:45.123Z", "data": {}},
        {"source": "s", "type": "span", "timestamp": "2025-10-20T10:30:45.123Z", "trace_id": "0af7651916cd43dd8448eb211c80319c",
         "span_id": "4f2a9c1d0b7e6a53", "parent_span_id": "00f067aa0ba902b7",
         "data": {"name": "load", "phase": "end", "status": "success", "duration_ms": 12.5}},
    ]
    assert kit.schema_problems(validator, good) == []
    base = {"source": "s", "type": "event", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"level": "info", "message": "m"}}
    bad = [
        {**base, "timestamp": "2025-10-20T10:30:45Z"},  # no milliseconds
        {**base, "timestamp": "2025-10-20T10:30:45.123+00:00"},  # not Z
        {**base, "timestamp": 1760956245123},  # epoch: the sidecar takes it, SDKs do not send it
        {**base, "data": {"level": "warn", "message": "m"}},  # alias not normalised
        {**base, "trace_id": "0AF7651916CD43DD8448EB211C80319C", "span_id": "4f2a9c1d0b7e6a53"},
        {**base, "trace_id": "0" * 32, "span_id": "4f2a9c1d0b7e6a53"},
        {**base, "span_id": "4f2a9c1d0b7e6a53"},  # span without trace
        {**base, "extra": 1},
        {**base, "data": {"level": "info", "message": "m", "x": 1}},
        {**base, "type": "metric", "data": {"name": "m", "value": "1"}},
        {**base, "type": "metric", "data": {"name": "m", "value": True}},
        {**base, "type": "metric", "data": {"name": "m", "value": 1, "tags": {"a": 1}}},
        {**base, "type": "progress", "data": {"job_id": "j", "percent": 101, "status": "running"}},
        {**base, "type": "span", "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "4f2a9c1d0b7e6a53",
         "data": {"name": "x", "phase": "end", "status": "success"}},  # no duration_ms
        {**base, "type": "span", "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "4f2a9c1d0b7e6a53",
         "data": {"name": "x", "phase": "start", "duration_ms": 1}},
        {**base, "type": "span", "data": {"name": "x", "phase": "start"}},  # span without ids
        {**base, "context": {"job_id": 12}},
    ]
    for message in bad:
        assert kit.schema_problems(validator, [message]), f"the schema accepts {json.dumps(message)}"


def test_matcher_rules():
    m = kit.Matcher(window=(time.time() - 1, time.time() + 1))
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert m.match({"t": "<timestamp>", "id": "<trace:a>", "s": "<span:x>", "v": 10, "d": "<duration>"},
                   {"t": now, "id": trace, "s": span, "v": 10.0, "d": 0.0}, "m") == []
    assert m.match(f"00-<trace:a>-<span:x>-01", f"00-{trace}-{span}-01", "line") == []
    assert m.match("<span:x>", "1" * 16, "m")  # same name, another id
    assert m.match("<span:y>", span, "m")  # another name, the same id
    assert m.match("<trace:b>", trace.upper(), "m")
    assert m.match("<span:z>", "0" * 16, "m")
    assert m.match({"v": 1}, {"v": True}, "m") and m.match({"v": 1}, {"v": "1"}, "m")
    assert m.match({"a": 1}, {"a": 1, "b": 2}, "m") and m.match({"a": 1, "b": 2}, {"a": 1}, "m")
    assert m.match("<timestamp>", now.replace(".000Z", "Z"), "m") and m.match("<timestamp>", "2001-01-01T00:00:00.000Z", "m")
    assert m.match("<duration>", -1, "m") and m.match("<duration>", "1", "m")
    messages, problems = kit.parse_connections([b'{"a":1}\n{"a":1,"a":2}\n{"b":NaN}\n\n{"c":"\\ud800"}\n{"d":1}'])
    assert messages == [{"a": 1}, {"c": "\ud800"}, {"d": 1}] and len(problems) == 5, problems


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_scenario_file_is_well_formed(scenario):
    assert kit.scenario_problems(scenario) == []


# -- replaying scenarios --------------------------------------------------------------------------

def replay(language: kit.Language, scenario: dict, scenario_file: Path, matcher: kit.Matcher, validator,
           transport: str, socket_dir: Path, label: str = "message") -> tuple[list[str], list[dict], kit.DriverRun]:
    """Run one driver against a fresh capture server; the problems found, the messages, the run."""
    token = scenario.get("token")
    with capture_server(transport, socket_dir) as server:
        run = kit.run_driver(language, scenario_file, scenario.get("env", {}), server.address, token=token)
        connections = server.settle()
    matcher.window = (run.started, run.ended)
    messages, problems = kit.parse_connections(connections, token)
    if run.returncode != 0:
        problems.insert(0, f"the driver exited with status {run.returncode} (expected 0)")
    problems += kit.schema_problems(validator, messages, label)
    problems += kit.match_messages(matcher, scenario["expect"], messages, label)
    problems += kit.match_stdout(matcher, scenario.get("expect_stdout", []), run.stdout)
    return problems, messages, run


CASES = [pytest.param(lang, scenario, transport, id=f"{lang.name}-{scenario['name']}-{transport}")
         for lang in kit.LANGUAGES for scenario in SCENARIOS for transport in kit.TRANSPORTS]


@pytest.mark.parametrize("language,scenario,transport", CASES)
def test_conformance(language: kit.Language, scenario: dict, transport: str, validator, tmp_path, socket_dir):
    require(language)
    title = f"{language.name} / {scenario['name']} over {transport}"
    matcher = kit.Matcher()
    problems, messages, run = replay(language, scenario, scenario["_path"], matcher, validator, transport, socket_dir)
    if problems:
        pytest.fail(kit.render(title, problems, scenario["expect"], messages, run), pytrace=False)

    child = scenario.get("child")
    if child is None:
        return
    lines = run.stdout.decode("utf-8").split("\n")
    env = {var: lines[index] for var, index in child["env_from_stdout"].items() if lines[index]}
    child_scenario = {"name": f"{scenario['name']}.child", "description": f"child process of {scenario['name']}",
                      "source": child["source"], "env": env, "calls": child["calls"], "expect": child["expect"]}
    child_file = tmp_path / "child-scenario.json"
    child_file.write_text(json.dumps(child_scenario, ensure_ascii=False), encoding="utf-8")
    child_matcher = kit.Matcher(ids=matcher.ids)  # the child's ids must be the parent's
    problems, messages, run = replay(language, child_scenario, child_file, child_matcher, validator, transport, socket_dir,
                                     "child message")
    if problems:
        pytest.fail(kit.render(f"{title} (child started with {env})", problems, child["expect"], messages, run),
                    pytrace=False)


# -- end to end through a real sidecar ------------------------------------------------------------

E2E_SCENARIOS = [s for s in SCENARIOS if s.get("end_to_end")]
TOKEN_SCENARIOS = [s for s in SCENARIOS if s.get("token")]
LANGUAGE_TRANSPORTS = [pytest.param(lang, transport, id=f"{lang.name}-{transport}")
                       for lang in kit.LANGUAGES for transport in kit.TRANSPORTS]

# The filesystem backend under {base}, flushed within 50 ms; the `tcp:` section's source and one
# on a Unix socket, both with the token when {token} says so.
SIDECAR_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0{token}}}
sources:
  local: {{type: tcp, unix: {socket}{token}}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


def start_sidecar(tmp_path: Path, socket_dir: Path, token: str | None = None):
    from tests.harness import SidecarProcess

    config = SIDECAR_CONFIG.format(base=tmp_path / "out", socket=socket_dir / "sidecar.sock",
                                   token=", token_env: INGEST_TOKEN" if token else "")
    return SidecarProcess(tmp_path, config, env={"INGEST_TOKEN": token} if token else None).start()


def sidecar_address(sidecar, transport: str, socket_dir: Path) -> tuple[str, str]:
    """MONITORING_SIDECAR for `transport`, and the name of the source behind it."""
    if transport == "unix":
        return f"unix:{socket_dir / 'sidecar.sock'}", "local"
    return f"127.0.0.1:{sidecar.port}", "tcp"


def delivered_messages(tmp_path: Path) -> list[dict]:
    """What the filesystem backend wrote, without the sidecar's received_at and host (checked)."""
    from tests.harness import read_jsonl

    messages = [m for path in sorted((tmp_path / "out").rglob("*.jsonl")) for m in read_jsonl(path)]
    for i, message in enumerate(messages, 1):
        received, host = message.pop("received_at", None), message.pop("host", None)
        assert isinstance(received, str) and kit.TIMESTAMP_RE.fullmatch(received), f"message {i}: received_at {received!r}"
        assert isinstance(host, str) and host, f"message {i}: host {host!r}"
    return messages


@pytest.mark.parametrize("language,transport", LANGUAGE_TRANSPORTS)
def test_end_to_end_through_a_real_sidecar(language: kit.Language, transport: str, validator, tmp_path, socket_dir):
    """The driver sends to a real sidecar (filesystem backend); what lands in the JSONL file is
    the scenario's expectation plus the sidecar's received_at and host."""
    require(language)
    from sidecar.protocol import NATIVE_AVAILABLE

    assert E2E_SCENARIOS, "no scenario has \"end_to_end\": true"
    sidecar = start_sidecar(tmp_path, socket_dir)
    address, source = sidecar_address(sidecar, transport, socket_dir)
    runs = []
    try:
        for scenario in E2E_SCENARIOS:
            run = kit.run_driver(language, scenario["_path"], scenario.get("env", {}), address)
            assert run.returncode == 0, f"{scenario['name']}: {run.describe()}"
            runs.append(run)
        expected = sum(len(s["expect"]) for s in E2E_SCENARIOS)
        stats = sidecar.wait_for(lambda s: sum(b.get("delivered", 0) for b in s["backends"]) >= expected,
                                 timeout=30, what=f"{expected} messages delivered to the file")
        assert not stats.get("decode_errors"), stats
        assert stats["sources"][source]["received"] == expected, stats["sources"]
        if NATIVE_AVAILABLE:
            # What an SDK sends is canonical protocol v1: none of it needs the Python path.
            assert stats["decoded_by_path"] == {"native": expected}, stats["decoded_by_path"]
    finally:
        assert sidecar.stop() == 0, sidecar.log()[-3000:]
    messages = delivered_messages(tmp_path)
    problems = kit.schema_problems(validator, messages)
    start = 0
    for scenario, run in zip(E2E_SCENARIOS, runs):
        part = messages[start:start + len(scenario["expect"])]
        start += len(scenario["expect"])
        matcher = kit.Matcher(window=(run.started, run.ended))
        problems += [f"{scenario['name']}: {p}" for p in kit.match_messages(matcher, scenario["expect"], part)]
    if len(messages) != start:
        problems.append(f"the file holds {len(messages)} messages, the scenarios expect {start}")
    if problems:
        pytest.fail(kit.render(f"{language.name} end to end over {transport}", problems,
                               [e for s in E2E_SCENARIOS for e in s["expect"]], messages, None), pytrace=False)


@pytest.mark.parametrize("language,transport", LANGUAGE_TRANSPORTS)
def test_the_token_through_a_real_sidecar(language: kit.Language, transport: str, validator, tmp_path, socket_dir):
    """A sidecar whose sources require the token: the driver with the right token delivers the
    scenario's messages; the same driver with another token is refused, the refusal counted,
    and nothing of it delivered."""
    require(language)
    assert TOKEN_SCENARIOS, "no scenario has a \"token\""
    scenario = TOKEN_SCENARIOS[0]
    token = scenario["token"]
    sidecar = start_sidecar(tmp_path, socket_dir, token)
    address, source = sidecar_address(sidecar, transport, socket_dir)
    expected = len(scenario["expect"])
    try:
        run = kit.run_driver(language, scenario["_path"], scenario.get("env", {}), address, token=token)
        assert run.returncode == 0, run.describe()
        sidecar.wait_for(lambda s: sum(b.get("delivered", 0) for b in s["backends"]) >= expected,
                         timeout=30, what=f"{expected} messages delivered to the file")
        wrong = kit.run_driver(language, scenario["_path"], scenario.get("env", {}), address, token=token + " (wrong)")
        assert wrong.returncode == 0, wrong.describe()
        stats = sidecar.wait_for(lambda s: s["connections_refused"].get("auth", 0) >= 1,
                                 timeout=30, what="the wrong token's connection refused and counted")
        assert stats["sources"][source]["authenticates"] is True
    finally:
        assert sidecar.stop() == 0, sidecar.log()[-3000:]
    stats = sidecar.stats()  # as the sidecar left it: every connection it took is accounted for
    assert stats["sources"][source]["received"] == expected and not stats.get("decode_errors"), stats
    messages = delivered_messages(tmp_path)
    matcher = kit.Matcher(window=(run.started, run.ended))
    problems = kit.schema_problems(validator, messages) + kit.match_messages(matcher, scenario["expect"], messages)
    if problems:
        pytest.fail(kit.render(f"{language.name} with the token over {transport}", problems, scenario["expect"], messages, run),
                    pytrace=False)
