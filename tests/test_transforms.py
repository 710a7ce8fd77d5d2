"""The transform stage: per source key (the routing keys), ordered steps between enrichment and
routing, on both decode paths; the filter is the first step type."""

import socket
import urllib.request

import orjson
from hypothesis import given, strategies as st

from sidecar.batch import Batch
from sidecar.config import load_config
from sidecar.source_keys import SourceKeys
from sidecar.transforms import TransformSpec, TransformStage
from sidecar.transforms.filter import FilterSettings, MessageFilter, keep_passing
from tests.harness import SidecarProcess, encode, event, read_jsonl, seqs
from tests.test_config import problems_of

KEYS = st.sampled_from(["a", "b", "ab", "a*", "b*", "?b", "default", "all"])


@given(st.lists(KEYS, max_size=12), st.sampled_from(["a", "b", "ab", "bb", "c"]))
def test_source_keys_find_what_routing_finds(keys, source):
    """Exact and glob keys that match, or else `default`; `all` always; in the order configured."""
    import fnmatch

    found = SourceKeys((key, position) for position, key in enumerate(keys)).for_source(source)
    own = [p for p, k in enumerate(keys) if k not in ("default", "all") and fnmatch.fnmatchcase(source, k)]
    chosen = own or [p for p, k in enumerate(keys) if k == "default"]
    assert found == sorted([*chosen, *(p for p, k in enumerate(keys) if k == "all")])


def mixed(source: str) -> Batch:
    levels = ["debug", "info", "warning", "error"]
    return Batch.of([event(source, i, levels[i % 4]) for i in range(8)] + [{"source": source, "type": "metric", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"name": "q.depth", "value": 3}}])


def test_steps_run_in_order_per_source_key_and_never_change_the_batch_they_are_given():
    stage = TransformStage((
        TransformSpec("noisy-*", "filter", FilterSettings(levels=("warning", "error", "critical")), "t:1"),
        TransformSpec("all", "filter", FilterSettings(types=("event",)), "t:2"),
    ))
    removed = []
    batch = mixed("noisy-1")
    kept = stage.apply(batch, lambda spec, count: removed.append((spec.label, count)))
    assert [m["data"]["level"] for m in kept.messages()] == ["warning", "error", "warning", "error"]
    assert removed == [("noisy-*[filter]", 4), ("all[filter]", 1)]  # levels apply to events: the metric went on to the next step
    assert len(batch) == 9  # the live index and the tap hold the original
    calm = mixed("calm")
    assert len(stage.apply(calm, lambda *_: None)) == 8
    assert stage.apply(Batch.of([event("calm", 0)]), lambda *_: None) is not None


def test_transform_mistakes_are_reported_at_their_lines(write):
    main = write(
        "sidecar.yaml",
        """
        backends:
          out: {type: console}
        transforms:
          noisy-*:
            - {type: filter, levels: [warning, loud]}
            - {type: squash}
            - just a string
          calm: {type: filter}
        routing:
          all: [{backend: out}]
        """,
    )
    assert problems_of(main) == [
        f"{main}:5: transforms.noisy-*.filter.levels: unknown 'loud' (known: critical, debug, error, info, warning)",
        f"{main}:6: unknown transform type 'squash' (known types: filter)",
        f"{main}:7: a transform step for 'noisy-*' must be a mapping with a type (known types: filter)",
        f"{main}:8: transforms for 'calm' must be a list of steps",
    ]


def test_a_filter_step_keeps_a_sources_noise_from_every_backend_on_both_decode_paths(tmp_path):
    config = f"""
    tcp: {{host: 127.0.0.1, port: 0}}
    storage: {{data_dir: {tmp_path / "spool"}}}
    backends:
      files: {{type: filesystem, base_path: {tmp_path / "out"}, create_base_path: true, fsync: never}}
      more: {{type: filesystem, base_path: {tmp_path / "more"}, create_base_path: true, fsync: never}}
    transforms:
      noisy-*:
        - {{type: filter, levels: [warning, error, critical]}}
    routing:
      all: [{{backend: files}}, {{backend: more}}]
    """
    sidecar = SidecarProcess(tmp_path, config).start()
    try:
        assert load_config(sidecar.config_path, sidecar.routes_dir, {}).transforms
        for encoding, source in (("json", "noisy-json"), ("msgpack", "noisy-msgpack"), ("json", "calm")):
            with socket.create_connection(("127.0.0.1", sidecar.port)) as conn:
                conn.sendall(encode([event(source, i, ("info", "warning", "debug", "error")[i % 4]) for i in range(40)], encoding))
        stats = sidecar.wait_for(lambda s: all(b["delivered"] == 80 for b in s["backends"]), what="the kept messages delivered")
        for directory in ("out", "more"):
            for source in ("noisy-json", "noisy-msgpack"):
                assert seqs(read_jsonl(tmp_path / directory / f"{source}.jsonl")) == [i for i in range(40) if i % 4 in (1, 3)]
            assert seqs(read_jsonl(tmp_path / directory / "calm.jsonl")) == list(range(40))
        assert stats["received"] == 120 and stats["routed"] == 80
        assert stats["removed_by_transforms"] == {"noisy-*[filter]": 40}
        assert stats["decoded_by_path"].get("python", 0) >= 40  # MessagePack takes the Python path
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{sidecar.http_port}/metrics", timeout=10).read().decode()
        assert 'sidecar_transform_removed_messages_total{transform="noisy-*[filter]"} 40.0' in metrics
    finally:
        assert sidecar.stop() == 0
    assert stats["unrouted"] == 0 and stats["received"] == stats["routed"] + sum(stats["removed_by_transforms"].values())


def _line_of(message: dict, escaped: bool) -> bytes:
    """A message's line as a client may write it: the key `aggregation` plain or escaped."""
    line = orjson.dumps(message)
    return line.replace(b'"aggregation"', b'"aggreg\\u0061tion"') if escaped else line


_MESSAGES = st.lists(
    st.tuples(
        st.sampled_from(["event", "metric", "aggregate"]),
        st.sampled_from(["info", "error"]),
        st.sampled_from(["rows", "jobs_done"]),
        st.booleans(),  # the key `aggregation` escaped in the line
    ),
    max_size=12,
)
_FILTERS = st.lists(
    st.builds(
        MessageFilter.build,
        st.none() | st.just(["metric"]) | st.just(["event"]),
        st.none() | st.just(["error"]),
        st.none() | st.just(["jobs_*"]),
        st.none() | st.booleans(),
    ),
    max_size=3,
)


@given(_MESSAGES, _FILTERS, st.booleans())
def test_a_filter_on_aggregated_decides_a_batch_without_aggregates_as_message_by_message(specs, filters, as_lines):
    """The shortcut for batches with no `aggregation` key in any line (no line parsed) keeps
    exactly what the per-message filter keeps, on the native path's lines as received too."""

    messages = []
    for number, (kind, level, name, _escaped) in enumerate(specs):
        if kind == "event":
            data = {"level": level, "message": f"m{number}"}
        else:
            data = {"name": name, "value": number}
            if kind == "aggregate":
                data["aggregation"] = {"count": 1}
        messages.append({"source": "s", "type": "event" if kind == "event" else "metric", "timestamp": "2025-10-20T10:30:45.123Z", "data": data})
    lines = [_line_of(m, escaped) for m, (*_, escaped) in zip(messages, specs)]
    batch = Batch("s", lines, [m["timestamp"] for m in messages]) if as_lines else Batch.of(messages)
    kept = keep_passing(batch, tuple(filters))
    expected = [m for m in messages if not filters or any(f.passes(m) for f in filters)]
    assert kept.messages() == expected
    assert len(kept.lines) == len(expected)
