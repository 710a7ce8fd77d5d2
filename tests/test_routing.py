"""Routing table semantics: exact, glob, default, all; filters; disabled rules; merging."""

import tempfile
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import load_config
from sidecar.routing import RouteTable

CONFIG = """
backends:
  a: {type: filesystem, base_path: /tmp/a}
  b: {type: filesystem, base_path: /tmp/b}
  c: {type: filesystem, base_path: /tmp/c}
  d: {type: filesystem, base_path: /tmp/d}
routing:
  queue-service:
    - backend: a
      priority: 2
    - backend: b
      priority: 1
      filter: {types: [metric], names: ["jobs_*"]}
  file-*:
    - backend: b
      filter: {types: [event], levels: [error, critical]}
  muted-service:
    - backend: a
      enabled: false
  default:
    - backend: c
  all:
    - backend: d
      filter: {types: [event, metric]}
"""


def table_from(tmp_path, text=CONFIG) -> RouteTable:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text))
    return RouteTable(load_config(path, None, {}).rules)


def event(source, level="info"):
    return {"source": source, "type": "event", "data": {"level": level, "message": "m"}}


def metric(source, name):
    return {"source": source, "type": "metric", "data": {"name": name, "value": 1}}


def names(table, message):
    return [spec.name for spec in table.route(message)]


def test_exact_rules_in_priority_order_with_filters(tmp_path):
    table = table_from(tmp_path)
    assert names(table, metric("queue-service", "jobs_processed")) == ["b", "a", "d"]
    assert names(table, metric("queue-service", "queue_depth")) == ["a", "d"]
    assert names(table, event("queue-service")) == ["a", "d"]
    assert names(table, {"source": "queue-service", "type": "progress", "data": {}}) == ["a"]


def test_globs_are_rules_of_their_own_so_default_does_not_apply(tmp_path):
    table = table_from(tmp_path)
    assert names(table, event("file-receiver", "error")) == ["b", "d"]
    assert names(table, event("file-receiver", "info")) == ["d"]


def test_default_is_only_for_sources_without_rules_and_all_is_for_everyone(tmp_path):
    table = table_from(tmp_path)
    assert names(table, event("db-loader")) == ["c", "d"]
    # a source whose only rule is disabled has rules of its own: no default, but still `all`
    assert names(table, event("muted-service")) == ["d"]


def test_rules_to_the_same_instance_merge_into_one_target(tmp_path):
    table = table_from(
        tmp_path,
        """
        backends:
          a: {type: filesystem, base_path: /tmp/a}
        routing:
          svc:
            - backend: a
              filter: {types: [metric]}
          all:
            - backend: a
              filter: {types: [event]}
            - backend: a
              config: {path: "other-{source}.jsonl"}
        """,
    )
    targets = table.targets_for("svc")
    assert [t.spec.label for t in targets] == ["a", "a[path]"]
    assert len(targets[0].filters) == 2
    assert names(table, event("svc")) == ["a", "a"]
    assert names(table, {"source": "svc", "type": "span", "data": {}}) == ["a"]


def _table_in_a_temporary_directory() -> RouteTable:
    with tempfile.TemporaryDirectory() as directory:
        return table_from(Path(directory))


ROUTES = _table_in_a_temporary_directory()


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.", min_size=1, max_size=30), st.sampled_from(["debug", "info", "warning", "error", "critical"]))
def test_routing_is_a_pure_function_and_all_always_applies(source, level):
    first = names(ROUTES, event(source, level))
    assert first == names(ROUTES, event(source, level))
    assert "d" in first
    own = source == "queue-service" or source.startswith("file-") or source == "muted-service"
    assert ("c" in first) == (not own)
