"""Secrets kept out of everything shown (sidecar.redaction): libpq's own parser is the oracle for
what the password of a generated connection string is; then the places that show settings and
errors, and a real sidecar whose rule overrides a connection string."""

import json
import logging
import os
import re
import subprocess
import sys
import urllib.parse

import psycopg
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from sidecar.backends.base import PermanentError, RetryableError
from sidecar.config import ConfigError, Interpolated, display_value, load_config
from sidecar.logs import JsonFormatter, LogfmtFormatter
from sidecar.redaction import credential_shown, is_secret_name, without_secrets
from tests.harness import REPO, SidecarProcess, event
from tests.services.postgres import PASSWORD, postgres_server  # noqa: F401 (fixture)

SECRET_KEYS = ("password", "sslpassword")
PLAIN_KEYS = ("host", "port", "dbname", "user", "application_name", "sslmode", "connect_timeout", "options")
# A secret may hold anything libpq can carry: quotes, backslashes, spaces, `@ : / ? & = % #`,
# any Unicode; not NUL (C strings). Each ends in Ω, which nothing else holds: where a secret's
# text is looked for, only the secret can have put it there.
secrets = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24).map(lambda s: s + "Ω")
# The other values: anything but what would make them look like a secret's form themselves.
plain_values = st.text(st.characters(codec="utf-8", exclude_characters="\x00=:@?&Ω"), min_size=1, max_size=12)
LIBPQ_SPACE = " \t\n\r\f\v"


def quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unquoted(value: str, escape_all: bool) -> str:
    return "".join("\\" + c if escape_all or c in LIBPQ_SPACE + "\\'" else c for c in value)


@st.composite
def keyword_connection_strings(draw):
    """(text, what libpq must read from it, the text with each secret as ***, the secrets)."""
    keys = draw(st.lists(st.sampled_from(PLAIN_KEYS), unique=True, max_size=4))
    secret_keys = draw(st.lists(st.sampled_from(SECRET_KEYS), unique=True, min_size=1))
    order = draw(st.permutations(keys + secret_keys))
    text, hidden, meant, shown = [], [], {}, []
    for key in order:
        value = draw(secrets if key in SECRET_KEYS else plain_values)
        form = draw(st.sampled_from(["quoted", "unquoted", "escape_all"]))
        written = quoted(value) if form == "quoted" else unquoted(value, form == "escape_all")
        equals = draw(st.sampled_from(["=", " =", "= ", " = ", "\t=\n"]))
        text.append(f"{key}{equals}{written}")
        hidden.append(f"{key}{equals}{written if key not in SECRET_KEYS else quoted('***') if form == 'quoted' else '***'}")
        meant[key] = value
        if key not in SECRET_KEYS:
            shown.append(written)
    lead = draw(st.sampled_from(["", " ", "\n"]))
    gaps = [draw(st.sampled_from([" ", "  ", "\t", "\n", " \r\n "])) for _ in order[1:]]
    join = lambda parts: lead + "".join(part + gap for part, gap in zip(parts, [*gaps, ""]))  # noqa: E731
    return join(text), meant, join(hidden), [meant[k] for k in secret_keys], shown


@given(keyword_connection_strings())
@settings(max_examples=500)
def test_every_key_value_password_is_hidden_and_the_rest_kept(case):
    text, meant, expected, secret_values, shown_parts = case
    assert conninfo_to_dict(text) == meant, "the generator writes what libpq reads"
    result = without_secrets(text)
    assert result == expected
    # still a connection string: libpq reads the same settings, each password as ***
    assert conninfo_to_dict(result) == {k: "***" if k in SECRET_KEYS else v for k, v in meant.items()}
    for secret in secret_values:
        assert secret not in result and quoted(secret)[1:-1] not in result and "Ω" not in result
    for part in shown_parts:
        assert part in result


URL_USERINFO_RAW = ":?#&=!$'()*+,;~"  # what libpq takes raw in a URL's password
URL_QUERY_RAW = "!$'()*+,:;@/~?#"  # and in a query value (not & = %)


@st.composite
def url_connection_strings(draw):
    user = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", max_size=8))
    host = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=12))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    dbname = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=8))
    scheme = draw(st.sampled_from(["postgresql", "postgres"]))
    meant = {}
    secret_values = []
    in_userinfo = draw(st.booleans())
    userinfo = hidden_userinfo = ""
    if in_userinfo:
        secret = draw(secrets)
        raw = draw(st.sets(st.sampled_from(URL_USERINFO_RAW)))
        userinfo = f"{user}:{urllib.parse.quote(secret, safe=''.join(raw))}@"
        hidden_userinfo = f"{user}:***@"
        meant["password"] = secret
        secret_values.append(secret)
        if user:
            meant["user"] = user
    elif user:
        userinfo = hidden_userinfo = f"{user}@"
        meant["user"] = user
    netloc = host + (f":{port}" if port else "")
    meant["host"] = host
    if port:
        meant["port"] = str(port)
    if dbname:
        meant["dbname"] = dbname
    query, hidden_query = [], []
    plain = draw(st.dictionaries(st.sampled_from(["application_name", "sslmode", "connect_timeout"]), st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8), max_size=2))
    for key, value in plain.items():
        query.append(f"{key}={value}")
        hidden_query.append(f"{key}={value}")
        meant[key] = value
    for key in draw(st.lists(st.sampled_from(SECRET_KEYS if not in_userinfo else ("sslpassword",)), unique=True)):
        secret = draw(secrets)
        raw = draw(st.sets(st.sampled_from(URL_QUERY_RAW)))
        query.append(f"{key}={urllib.parse.quote(secret, safe=''.join(raw))}")
        hidden_query.append(f"{key}=***")
        meant[key] = secret
        secret_values.append(secret)
    assume(secret_values)
    order = draw(st.permutations(range(len(query))))
    tail = lambda parts: ("?" + "&".join(parts[i] for i in order)) if parts else ""  # noqa: E731
    path = f"/{dbname}" if dbname or query else ""
    text = f"{scheme}://{userinfo}{netloc}{path}{tail(query)}"
    hidden = f"{scheme}://{hidden_userinfo}{netloc}{path}{tail(hidden_query)}"
    return text, meant, hidden, secret_values


@given(url_connection_strings())
@settings(max_examples=500)
def test_every_url_password_and_password_parameter_is_hidden_and_the_rest_kept(case):
    text, meant, expected, secret_values = case
    assert conninfo_to_dict(text) == meant, "the generator writes what libpq reads"
    result = without_secrets(text)
    assert result == expected
    assert conninfo_to_dict(result) == {k: "***" if k in SECRET_KEYS else v for k, v in meant.items()}
    for secret in secret_values:
        assert secret not in result and urllib.parse.quote(secret) not in result and "%CE%A9" not in result


@given(st.lists(st.sampled_from(["host=h", "password=", "'", "\\", " ", "\t", "\n", "sslpassword", "=", "a", "é", "postgresql://", "u:", "@", "/", "?", "#", "&", "%41"]), max_size=16).map("".join))
@settings(max_examples=1000)
def test_whatever_libpq_reads_as_a_password_from_any_text_is_hidden(text):
    try:
        meant = conninfo_to_dict(text)
    except psycopg.Error:
        return
    result = without_secrets(text)
    secret_values = [meant[k] for k in SECRET_KEYS if meant.get(k)]
    try:
        redacted = conninfo_to_dict(result)
    except psycopg.Error:
        redacted = None
    if secret_values:
        assert redacted is not None and all(redacted.get(k) == "***" for k in SECRET_KEYS if meant.get(k)), (text, result, redacted)
    for secret in secret_values:
        # what the secret was written as (its own characters, escaped or not) is gone
        assume(len(secret) >= 3 and secret not in text.replace(secret, "", 1))
        assert secret not in result, (text, result)


@pytest.mark.parametrize(("text", "shown"), [
    # the forms the issue found shown partly or fully by `check`
    ("host=db sslpassword=Ssl-S3cret dbname=x", "host=db sslpassword=*** dbname=x"),
    ("host=db password='it\\'s a S3cret' user=u", "host=db password='***' user=u"),
    ("password=a\\ S3cret host=db", "password=*** host=db"),
    ("postgresql://sidecar:s3cr%40t@db:5432/x", "postgresql://sidecar:***@db:5432/x"),
    ("postgresql://db/x?sslpassword=S3cret&password=p%26w&application_name=app", "postgresql://db/x?sslpassword=***&password=***&application_name=app"),
    ("postgresql://db/x?pass%77ord=S3cret", "postgresql://db/x?pass%77ord=***"),  # libpq decodes the name too
    ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),
    ("password='never closed S3cret", "password='***'"),
    # URLs of other backends
    ("https://AKIAEXAMPLE:wJal/rXUtn+S3cret@s3.example.com:9000", "https://AKIAEXAMPLE:***@s3.example.com:9000"),
    ("PutObject https://s3.example.com/b/k?X-Amz-Signature=S3cret&X-Amz-Date=20260101: refused", "PutObject https://s3.example.com/b/k?X-Amz-Signature=***&X-Amz-Date=20260101: refused"),
    ("http://collector:4318?token=S3cret&x=1", "http://collector:4318?token=***&x=1"),
    ("Authorization: Bearer S3cret.token refused", "Authorization: Bearer *** refused"),
    ("proxy-authorization=Basic dXNlcjpTM2NyZXQ=", "proxy-authorization=Basic ***"),
    ("target=http://u:S3cret@h/x?a=b", "target=http://u:***@h/x?a=b"),
    # what is not a secret stays
    ("no secret here: passwords=are_words, token_env=MONITORING_SIDECAR_TOKEN", "no secret here: passwords=are_words, token_env=MONITORING_SIDECAR_TOKEN"),
    ("postgresql://u:@db/x http://h:80/path a@b", "postgresql://u:@db/x http://h:80/path a@b"),
    ("password=", "password="),
    ("password=''host=h", "password='***'host=h"),  # libpq: an empty password, then host
])
def test_each_form_is_hidden(text, shown):
    assert without_secrets(text) == shown


def test_a_string_the_patterns_misread_is_shown_as_libpq_reads_it():
    # libpq: host `a://b:` and password `c@d`; the URL pattern alone would leave `@d` shown
    text = "host=a://b: password=c@d"
    result = without_secrets(text)
    assert conninfo_to_dict(result) == {"host": "a://b:", "password": "***"} and "c@d" not in result and "@d" not in result


def test_linear_time_on_hostile_text():
    import time

    for text in ("a" * 200_000 + "://", "?" * 200_000 + "=", "password" * 30_000, "x password   " * 20_000, "'" * 100_000):
        started = time.perf_counter()
        without_secrets(text)
        assert time.perf_counter() - started < 1.0, text[:20]


def test_settings_are_shown_with_templates_and_headers_only_as_their_references():
    assert display_value(Interpolated("postgresql://u:S3cret@db/x", "postgresql://u:S3cret@${DB_HOST}/x")) == "postgresql://u:***@${DB_HOST}/x"
    assert display_value(Interpolated("postgresql://u:S3cret@db/x", "${PG_URL}")) == "${PG_URL}"
    headers = (("authorization", Interpolated("Bearer S3cret", "Bearer ${OTLP_TOKEN}")), ("x-honeycomb-team", "S3cret"), ("api-key", Interpolated("S3cret", "${KEY}")))
    assert display_value(headers) == {"authorization": "Bearer ${OTLP_TOKEN}", "x-honeycomb-team": "***", "api-key": "${KEY}"}
    # the raw options `check` lists: a mapping as YAML gives it
    assert display_value({"authorization": "Bearer S3cret", "x-scope-orgid": 42}) == {"authorization": "Bearer ***", "x-scope-orgid": "***"}
    assert credential_shown("Basic ${A}") == "Basic ${A}" and credential_shown("Bearer ${A}x") == "Bearer ***"
    assert is_secret_name("sslpassword") and is_secret_name("X-Amz-Signature") and is_secret_name("Authorization") and not is_secret_name("token_env")


def test_config_errors_errors_and_log_lines_keep_no_secret(write):
    config = write("sidecar.yaml", """
        backends:
          otel: {type: otlp, endpoint: "http://u:Endp0int-S3cret@collector:4318?x=1"}
        """)
    with pytest.raises(ConfigError) as raised:
        load_config(config, None)
    assert "Endp0int-S3cret" not in str(raised.value) and "http://u:***@collector:4318?x=1" in str(raised.value)
    assert str(RetryableError("PutObject https://AKIA:Err-S3cret@s3.local/b: refused")) == "PutObject https://AKIA:***@s3.local/b: refused"
    assert "Err-S3cret" not in str(PermanentError("password=Err-S3cret", reason="x"))
    try:
        raise ValueError("connect to host=db password='Tb-S3cret' failed")
    except ValueError:
        record = logging.LogRecord("sidecar", logging.ERROR, __file__, 1, "backend %s: %s", ("pg", "sslpassword=Log-S3cret"), sys.exc_info())
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "Log-S3cret" not in line and "Tb-S3cret" not in line and "sslpassword=***" in line


# ---------------------------------------------------------------- a real sidecar

SSL_SECRET = "Ssl-S3cret's key"
WRONG_SECRET = "Wr0ng-Url-S3cret-2"
URL_SSL_SECRET = "Url-Ssl-S3cret-3"
MARKER = "label-marker-5150"  # a non-secret part of the override, which no label may carry

CONFIG = """
storage: {{data_dir: {data_dir}}}
backends:
  pg: {{type: postgres, connection_string: "${{PG_URL}}", table: {table}}}
  files: {{type: filesystem, base_path: {base}, create_base_path: true}}
routing:
  svc:
    - backend: pg
      config:
        connection_string: '{good}'
    - backend: files
  svc2:
    - backend: pg
      config:
        connection_string: '{bad}'
"""


def test_a_rule_overriding_a_connection_string_shows_no_part_of_it_in_labels_and_no_secret_anywhere(postgres_server, tmp_path):  # noqa: F811
    good = f"host=127.0.0.1 port={postgres_server.port} user=sidecar dbname=monitoring application_name={MARKER} password = 'Pg-t3st-S3cret-9f2c' sslpassword={SSL_SECRET.replace(' ', chr(92) + ' ').replace(chr(39), chr(92) + chr(39))}"
    assert conninfo_to_dict(good)["password"] == PASSWORD and conninfo_to_dict(good)["sslpassword"] == SSL_SECRET
    bad = f"postgresql://sidecar:{WRONG_SECRET}@127.0.0.1:{postgres_server.port}/monitoring?sslpassword={URL_SSL_SECRET}&application_name={MARKER}"
    table = "redaction_" + os.urandom(4).hex()
    text = CONFIG.format(data_dir=tmp_path / "spool", table=table, base=tmp_path / "out", good=good.replace("'", "''"), bad=bad)
    sidecar = SidecarProcess(tmp_path, text, env={"PG_URL": postgres_server.url()})
    secrets = [PASSWORD, SSL_SECRET, WRONG_SECRET, URL_SSL_SECRET, "Ssl-S3cret", "S3cret\\'s"]
    try:
        sidecar.start()
        sidecar.send([event("svc", i) for i in range(20)] + [event("svc2", i) for i in range(5)])
        stats = sidecar.wait_for(
            lambda s: any(b["backend"] == "pg[connection_string]" and b["delivered"] == 20 for b in s["backends"])
            and any(b["backend"] == "pg[connection_string]#2" and b["circuit"] == "open" for b in s["backends"]),
            what="the good instance delivering, the bad one's circuit open",
        )
        assert "password authentication failed" in sidecar.backend("pg[connection_string]#2")["last_error"]
        assert postgres_server.admin(f"SELECT count(*) FROM {table}")[0][0] == 20
        shown = {path: sidecar.http(path)[1].decode() for path in ("/metrics", "/api/backends", "/api/statistics", "/api/routes", "/api/jobs")}
        labels = re.findall(r'backend="([^"]*)"', shown["/metrics"])
        assert set(labels) == {"pg[connection_string]", "pg[connection_string]#2", "files"}
    finally:
        sidecar.stop()
    shown["status"] = sidecar.status_path.read_text()
    shown["log"] = sidecar.log() + sidecar.stdout_path.read_text()
    check = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(sidecar.config_path), "--source", "svc", "--source", "svc2"],
        capture_output=True, text=True, cwd=tmp_path, env={**sidecar.env, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    shown["check"] = check.stdout + check.stderr
    assert "-> pg[connection_string]#2" in check.stdout
    for where, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} in {where}"
    # what is not secret in the value is shown only where settings are: never in a label
    for where in ("/metrics", "/api/backends", "/api/statistics", "status", "log"):
        assert MARKER not in shown[where], where
    overrides = [rule["overrides"] for rule in json.loads(shown["/api/routes"])["rules"] if rule["overrides"]]
    assert [o["connection_string"] for o in overrides] == [without_secrets(good), without_secrets(bad)]
    assert f"application_name={MARKER}" in shown["check"]
