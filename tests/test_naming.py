"""Source names mapped to file names, S3 keys and CloudWatch names injectively (sidecar.naming):
properties over arbitrary text, then the three backends and `check` with the names that used
to collide."""

import datetime as dt
import hashlib
import os
import re
import subprocess
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.backends.base import Attempt
from sidecar.backends.cloudwatch_requests import LogNames, check_group, check_stream
from sidecar.backends.filesystem import FilesystemBackend, FilesystemSettings
from sidecar.backends.s3_layout import object_key, source_prefix
from sidecar.batch import Batch
from sidecar.naming import FILE_NAME, LOG_GROUP, LOG_STREAM, MAX_NAME_LENGTH, S3_KEY, NameRules, escaped
from tests.harness import REPO

RULES = [FILE_NAME, S3_KEY, LOG_STREAM, LOG_GROUP]
# The names that all wrote `a_b.jsonl` (and one S3 key level, one stream) before.
COLLIDING = ["a/b", "a b", "a?b", "a\\b", "a_b"]
# Any text a JSON string can hold, lone surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=260)


def decoded(name: str, rules: NameRules) -> str:
    """The value a name that was not cut came from: its escapes read back as UTF-8 bytes."""
    if name == rules.escape:
        return ""
    data = bytearray()
    index = 0
    while index < len(name):
        if name[index] == rules.escape:
            data += bytes.fromhex(name[index + 1:index + 3])
            index += 3
        else:
            data += name[index].encode()
            index += 1
    return data.decode("utf-8", "surrogatepass")


def allowed(rules: NameRules) -> set[str]:
    return set(rules.safe) | {rules.escape} | set("0123456789ABCDEFabcdef-")


@pytest.mark.parametrize("rules", RULES, ids=lambda r: r.what)
@given(value=any_text)
@settings(max_examples=300)
def test_a_name_is_within_its_targets_characters_and_length_and_reads_back_as_its_value(rules, value):
    name = escaped(value, rules)
    assert set(name) <= allowed(rules) and 1 <= len(name) <= rules.max_length
    if rules.escape_leading_dot:
        assert not name.startswith(".") and name not in (".", "..")
    if f"{rules.escape}-" in name:  # cut: the value's hash ends it
        assert name.endswith(hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16])
    else:
        assert decoded(name, rules) == value


@pytest.mark.parametrize("rules", RULES, ids=lambda r: r.what)
@given(first=any_text, second=any_text)
@settings(max_examples=300)
def test_distinct_values_get_distinct_names(rules, first, second):
    if first != second:
        assert escaped(first, rules) != escaped(second, rules)


@pytest.mark.parametrize("rules", RULES, ids=lambda r: r.what)
@given(data=st.data())
def test_a_name_of_safe_characters_is_its_own_name(rules, data):
    value = data.draw(st.text(st.sampled_from(sorted(rules.safe)), min_size=1, max_size=rules.max_length))
    if rules.escape_leading_dot and value.startswith("."):
        value = "x" + value[1:]
    assert escaped(value, rules) == value


@pytest.mark.parametrize("rules", RULES, ids=lambda r: r.what)
@given(common=st.text(st.characters(codec="utf-8"), min_size=70, max_size=200), tails=st.lists(st.text(max_size=5), min_size=2, max_size=2, unique=True))
def test_values_past_the_length_limit_are_cut_and_stay_apart(rules, common, tails):
    values = [common + tail for tail in tails]
    names = [escaped(value, rules) for value in values]
    assert names[0] != names[1]
    for name in names:
        assert len(name) <= rules.max_length and set(name) <= allowed(rules)
        if len(name) == rules.max_length and f"{rules.escape}-" in name:
            # never cut inside an escape: what comes before the marker reads back
            head = name[: name.index(f"{rules.escape}-")]
            assert re.fullmatch(rf"(?:[^{re.escape(rules.escape)}]|{re.escape(rules.escape)}[0-9A-F]{{2}})*", head)


def test_the_names_that_collided_are_five_names_and_the_safe_one_keeps_its_own():
    for rules in RULES:
        names = [escaped(source, rules) for source in COLLIDING]
        assert len(set(names)) == 5 and names[-1] == "a_b", (rules.what, names)
    assert [escaped(source, FILE_NAME) for source in COLLIDING] == ["a%2Fb", "a%20b", "a%3Fb", "a%5Cb", "a_b"]
    assert escaped("a/b", LOG_GROUP) == "a#2Fb" and escaped("a#b", LOG_GROUP) == "a#23b"
    assert escaped("it's (v2)!", S3_KEY) == "it's%20(v2)!" and escaped("100%", FILE_NAME) == "100%25"
    assert escaped(".hidden", FILE_NAME) == "%2Ehidden" and escaped(".hidden", LOG_STREAM) == ".hidden"
    assert escaped("", FILE_NAME) == "%" and escaped("x" * MAX_NAME_LENGTH, FILE_NAME) == "x" * MAX_NAME_LENGTH
    assert escaped("\ud800", FILE_NAME) == "%ED%A0%80"  # a lone surrogate, as JSON may carry one


def test_a_long_name_is_cut_at_an_escape_boundary_and_ends_in_the_values_hash():
    for value in ("x" * 250 + "1", "x" * 250 + "2", *("x" * lead + "é" * 100 for lead in range(6))):
        name = escaped(value, FILE_NAME)
        head, marker, digest = name.rpartition("%-")
        assert marker and digest == hashlib.sha256(value.encode()).hexdigest()[:16] and len(name) <= MAX_NAME_LENGTH
        assert re.fullmatch(r"x*(?:%[0-9A-F]{2})*", head), "cut between escapes, never inside one"
        assert escaped(value, FILE_NAME).startswith(head) and len(head) >= MAX_NAME_LENGTH - 18 - 2
    assert len({escaped("x" * 250 + tail, FILE_NAME) for tail in "12"}) == 2


def event(source: str, seq: int) -> dict:
    return {"source": source, "type": "event", "timestamp": "2026-03-01T10:00:00.000Z", "data": {"level": "info", "message": f"m{seq}"}}


async def test_the_filesystem_backend_writes_each_of_the_colliding_sources_to_its_own_file(tmp_path):
    backend = FilesystemBackend(FilesystemSettings(base_path=str(tmp_path), fsync="batch"), label="files")
    await backend.open()
    for seq, source in enumerate(COLLIDING):
        await backend.write_batch(Attempt(source, Batch.of([event(source, seq)])))
    await backend.aclose()
    assert sorted(os.listdir(tmp_path)) == sorted(f"{escaped(source, FILE_NAME)}.jsonl" for source in COLLIDING)
    for source in COLLIDING:
        (line,) = (tmp_path / f"{escaped(source, FILE_NAME)}.jsonl").read_bytes().splitlines()
        assert orjson.loads(line)["source"] == source


def test_s3_keys_and_cloudwatch_streams_of_the_colliding_sources_are_distinct():
    heads = [source_prefix("logs/", source) for source in COLLIDING]
    assert heads == ["logs/a%2Fb/", "logs/a%20b/", "logs/a%3Fb/", "logs/a%5Cb/", "logs/a_b/"]
    keys = {object_key("logs/", source, "2026-03-01T10:00:00.000Z", unique="u", gzipped=False) for source in COLLIDING}
    assert len(keys) == 5 and all(key.count("/") == 6 for key in keys)
    names = LogNames("/app/{source}", "{source}")
    pairs = [names(source) for source in COLLIDING]
    assert len({group for group, _ in pairs}) == 5 and len({stream for _, stream in pairs}) == 5
    assert pairs[0] == ("/app/a#2Fb", "a%2Fb") and pairs[-1] == ("/app/a_b", "a_b")
    assert all(check_group(group) is None and check_stream(stream) is None for group, stream in pairs)


@given(source=st.text(st.characters(codec="utf-8"), min_size=1, max_size=200))
@settings(max_examples=200)
def test_cloudwatch_names_from_any_source_are_valid_and_the_source_adds_no_level(source):
    group, stream = LogNames("/app/{source}", "{host}/{source}")(source)
    assert check_group(group) is None and check_stream(stream) is None
    assert group.count("/") == 2 and stream.count("/") == 1


def test_check_lists_the_escaped_names(tmp_path):
    base = tmp_path / "out"
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true}}
  archive: {{type: s3, bucket: logs, prefix: raw/}}
  cw: {{type: cloudwatch, region: us-east-1, log_group: /apps, log_stream: "{{source}}"}}
routing:
  "a/b": [{{backend: files}}, {{backend: archive}}, {{backend: cw}}]
  "a b": [{{backend: files}}]
  "a_b": [{{backend: files}}]
"""
    )
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"writes {base / 'a%2Fb.jsonl'}" in out and f"writes {base / 'a%20b.jsonl'}" in out and f"writes {base / 'a_b.jsonl'}" in out
    now = dt.datetime.now(dt.timezone.utc)
    assert f"writes s3://logs/raw/a%2Fb/{now:%Y}/" in out and "writes log group /apps, stream a%2Fb" in out
    assert "warning" not in out
