"""Issue 15, point 4: configuration errors that point at the fix, still at their `file:line`:
"did you mean" for near-miss names, the usual shape mistakes of drop-ins and rules named as
such, and YAML syntax errors said in plain words beside the parser's own."""

import attrs
import pytest

from sidecar.suggestions import did_you_mean
from tests.test_cli import cli
from tests.test_config import problems_of
from sidecar.sources.tcp import TcpSettings

TCP_KEYS = ", ".join(f.name for f in attrs.fields(TcpSettings))

BACKENDS = "backends:\n  files: {type: filesystem, base_path: /tmp/x}\n  console: {type: console}\n"


def test_did_you_mean_only_for_a_near_miss():
    assert did_you_mean("flies", ["files", "console"]) == "; did you mean 'files'?"
    assert did_you_mean("Files", ["files"]) == "; did you mean 'files'?"
    assert did_you_mean("nowhere", ["files", "console"]) == ""
    assert did_you_mean("files", ["files"]) == ""  # known: nothing to suggest
    assert did_you_mean(None, ["files"]) == "" and did_you_mean(3, ["files"]) == ""


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (BACKENDS + "routing:\n  svc: [{backend: flies}]\n", 5, "rule for 'svc' names unknown backend 'flies' (backends: files, console); did you mean 'files'?"),
        ("backends:\n  files: {type: filesytem, base_path: /tmp/x}\n", 2, "unknown backend type 'filesytem' (known types: cloudwatch, console, filesystem, otlp, postgres, s3); did you mean 'filesystem'?"),
        ("backends:\n  db: {type: timescale, connection_string: x}\n", 2, "did you mean 'timescaledb'?"),
        ("sources:\n  apps: {type: tpc}\n", 2, "unknown source type 'tpc' (known types: forward, otlp, tcp); did you mean 'tcp'?"),
        ("transforms:\n  svc: [{type: fliter}]\n", 2, "unknown transform type 'fliter' (known types: filter); did you mean 'filter'?"),
        ("routng: {}\n", 1, "unknown top-level key 'routng' (known keys: tcp, http, pipeline, index, storage, reload, shutdown, security, sources, backends, transforms, aggregate, routing); did you mean 'routing'?"),
        ("tcp:\n  prot: 1\n", 2, f"unknown key tcp.prot (known keys: {TCP_KEYS}); did you mean 'port'?"),
        ("storage: {data_dri: ./var}\n", 1, "unknown key storage.data_dri (known keys: data_dir, max_bytes, sync_interval); did you mean 'data_dir'?"),
        ("backends:\n  files: {type: filesystem, base_path: /tmp/x, fsnyc: true}\n", 2, "unknown key backends.files.fsnyc (known keys: base_path, path, create_base_path, fsync, fsync_interval, rotate_bytes, rotate_keep, max_open_files, io); did you mean 'fsync'?"),
        ("backends:\n  files: {type: filesystem, base_path: /tmp/x, batch: {max_mesages: 5}}\n", 2, "did you mean 'max_messages'?"),
        (BACKENDS + "routing:\n  svc: [{backend: files, prioirty: 1}]\n", 5, "unknown rule key 'prioirty' (known keys: backend, enabled, priority, filter, config); did you mean 'priority'?"),
        (BACKENDS + "routing:\n  svc: [{backend: files, config: {pth: a.jsonl}}]\n", 5, "did you mean 'path'?"),
        (BACKENDS + "routing:\n  svc: [{backend: files, filter: {type: [event]}}]\n", 5, "unknown filter key 'type' (known keys: types, levels, names, aggregated); did you mean 'types'?"),
        (BACKENDS + "routing:\n  svc: [{backend: files, filter: {levels: [warn]}}]\n", 5, "filter.levels: unknown 'warn' (known: critical, debug, error, info, warning); did you mean 'warning'?"),
    ],
)
def test_a_near_miss_name_gets_a_suggestion_at_its_line(write, text, line, expected):
    main = write("sidecar.yaml", text)
    problems = problems_of(main)
    assert any(p.startswith(f"{main}:{line}: ") and p.endswith(expected) for p in problems), problems


def test_a_drop_in_wrapped_in_routing_says_to_drop_the_wrapper(write):
    main = write("sidecar.yaml", BACKENDS)
    drop_in = write("routes.d/10-svc.yaml", "routing:\n  svc:\n    - backend: files\n")
    assert problems_of(main, main.parent / "routes.d") == [
        f"{drop_in}:1: rules for 'routing' must be a list; drop-ins hold the routing mapping at their top level, without `routing:` (source -> list of rules)"
    ]


def test_a_drop_in_holding_main_file_sections_or_a_bare_rule(write):
    main = write("sidecar.yaml", BACKENDS)
    drop_in = write("routes.d/10-svc.yaml", "backends:\n  more: {type: console}\nsvc: {backend: files}\n")
    assert problems_of(main, main.parent / "routes.d") == [
        f"{drop_in}:1: rules for 'backends' must be a list; `backends:` belongs in the main config file, a drop-in holds only source -> list of rules",
        f"{drop_in}:3: rules for 'svc' must be a list; write each rule as a list item: `svc: [{{backend: ...}}]`, or `- backend: ...` on the line below",
    ]


def test_routing_written_twice_in_the_main_file(write):
    main = write("sidecar.yaml", BACKENDS + "routing:\n  routing:\n    svc: [{backend: files}]\n")
    assert problems_of(main) == [f"{main}:5: rules for 'routing' must be a list; `routing:` is written once, with source -> list of rules under it"]


def test_a_rule_without_a_backend_key_says_so(write):
    main = write("sidecar.yaml", BACKENDS)
    drop_in = write("routes.d/10-svc.yaml", "svc:\n  - priority: 5\n  - backnd: files\n  - backend:\n")
    problems = problems_of(main, main.parent / "routes.d")
    assert problems == [
        f"{drop_in}:2: rule for 'svc' has no `backend:` key: add one naming the backend it sends to (backends: files, console)",
        f"{drop_in}:3: unknown rule key 'backnd' (known keys: backend, enabled, priority, filter, config); did you mean 'backend'?",
        f"{drop_in}:3: rule for 'svc' has no `backend:` key: add one naming the backend it sends to (backends: files, console); is 'backnd' meant to be `backend`?",
        f"{drop_in}:4: rule for 'svc' has an empty `backend:`: name the backend it sends to (backends: files, console)",
    ]
    assert not any("None" in p for p in problems)


INDENTATION = "the indentation of this line does not match the lines above: a key or '- ' item is indented less or more than the others at its level"


@pytest.mark.parametrize(
    ("text", "line", "plain", "parser"),
    [
        ("svc:\n  - backend: files\n  priority: 1\n", 3, INDENTATION, "expected <block end>, but found '?'"),
        ("backends:\n  files:\n    type: filesystem\n   base_path: /tmp/x\n", 4, INDENTATION, "expected <block end>, but found '<block mapping start>'"),
        ("svc:\n  - backend: files\n   - backend: console\n", 3, INDENTATION, "expected <block end>, but found '<block sequence start>'"),
        ("svc:\n  - backend: files\n    config:\n      path: a\n      - b\n", 5, INDENTATION, "expected <block end>, but found '-'"),
        ("svc:\n  - backend: files\n      priority: 1\n", 3, "a ':' where no key can begin: this line is indented more than it should be", "mapping values are not allowed here"),
        ("svc:\n\t- backend: files\n", 2, "a tab: YAML indents with spaces only", "found character '\\t' that cannot start any token"),
        ("svc: [{backend: files}\n", 2, "a '[' or '{' is not closed", "expected ',' or ']', but got '<stream end>'"),
        ("svc:\n  - backend: files\n    config:\n      path: {source}.jsonl\n", 4, "quote the whole value (e.g. \"{source}.jsonl\")", "expected <block end>, but found '<scalar>'"),
        ("svc:\n  - backend: \"files\n  - backend: console\n", 2, "a quote opened here is never closed", "found unexpected end of stream"),
        ("svc:\n  - backend: @files\n", 2, "a value cannot begin with '@' unquoted: put it in quotes", "found character '@' that cannot start any token"),
    ],
)
def test_a_yaml_syntax_error_is_said_in_plain_words_with_the_parsers_line(write, text, line, plain, parser):
    main = write("sidecar.yaml", BACKENDS)
    drop_in = write("routes.d/10-svc.yaml", text)
    (problem,) = problems_of(main, main.parent / "routes.d")
    assert problem.startswith(f"{drop_in}:{line}: invalid YAML: ") and plain in problem, problem
    assert problem.endswith(f"(the parser says: {parser})"), problem


def test_check_shows_the_hints(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(BACKENDS + "routing:\n  svc: [{backend: flies}]\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {config}:5: rule for 'svc' names unknown backend 'flies' (backends: files, console); did you mean 'files'?" in result.stderr
