"""Project hygiene that drifts unless a test holds it: every settings key of every backend type,
source type, transform type and top-level section documented in docs/configuration.md with its
true default; one licence, Apache-2.0, declared by the sidecar and by every SDK's own packaging."""

import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import types
import typing
import xml.etree.ElementTree as ET
import zipfile

import attrs
import pytest
from ruamel.yaml import YAML

from sidecar.aggregate import AggregateSettings
from sidecar.backends import BACKEND_TYPES, backend_class
from sidecar.config.loader import _RULE_KEYS, _TOP_LEVEL
from sidecar.config.settings import DeliverySettings
from sidecar.sources import SOURCE_TYPES, source_class
from sidecar.transforms import TRANSFORM_TYPES, transform_class
from sidecar.transforms.filter import FilterSettings
from sidecar.units import ByteSize, Duration, StringPairs, parse_bytesize, parse_duration
from tests.harness import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"

# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt (also Debian's common-licenses/Apache-2.0)
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
SDKS = REPO / "sdk_clients"
# The SDKs distributed on their own with the text beside them (sdist/wheel, CPAN, make install).
LICENCE_COPIES = [SDKS / "python" / "LICENSE", SDKS / "perl" / "LICENSE", SDKS / "c" / "LICENSE"]


def test_the_root_licence_is_the_apache_license_2_0_text():
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256
    assert b"Apache License\n                           Version 2.0, January 2004" in text


@pytest.mark.parametrize("copy", LICENCE_COPIES, ids=lambda p: p.parent.name)
def test_each_sdk_that_ships_the_licence_text_ships_the_root_one(copy):
    assert copy.read_bytes() == (REPO / "LICENSE").read_bytes()


@pytest.mark.parametrize("pyproject", [REPO / "pyproject.toml", SDKS / "python" / "pyproject.toml"], ids=["sidecar", "python-sdk"])
def test_python_packages_declare_apache_2_0_and_ship_the_file(pyproject):
    project = tomllib.loads(pyproject.read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert (pyproject.parent / "LICENSE").is_file()


def test_the_native_crate_declares_apache_2_0():
    assert tomllib.loads((REPO / "native" / "Cargo.toml").read_text())["package"]["license"] == "Apache-2.0"


@pytest.mark.slow
def test_the_python_sdk_wheel_says_apache_2_0_and_carries_the_text(tmp_path):
    source = tmp_path / "python"
    shutil.copytree(SDKS / "python", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)], check=True, timeout=300)
    wheel = zipfile.ZipFile(next(wheels.glob("monitoring_sdk-*.whl")))
    info = next(n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert wheel.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()


def test_the_perl_distribution_declares_apache_2_0(tmp_path):
    dist = tmp_path / "perl"
    shutil.copytree(SDKS / "perl", dist, ignore=shutil.ignore_patterns("blib", "Makefile", "Makefile.old", "MYMETA.*", "pm_to_blib"))
    subprocess.run(["perl", "Makefile.PL"], cwd=dist, check=True, capture_output=True, timeout=120)
    assert json.loads((dist / "MYMETA.json").read_text())["license"] == ["apache_2_0"]
    assert "LICENSE" in (dist / "MANIFEST").read_text().split()
    pod = (dist / "lib" / "Monitoring" / "SDK.pm").read_text()
    section = re.search(r"^=head1 LICENSE\n(.*?)^=", pod, re.S | re.M)
    assert section and "Apache License, Version 2.0" in section.group(1)


def test_the_r_package_declares_apache_2_0():
    description = email.parser.Parser().parsestr((SDKS / "r" / "DESCRIPTION").read_text())
    # R's own spelling (share/licenses/license.db); a standard licence needs no `file LICENSE`.
    assert description["License"] == "Apache License 2.0"


def test_the_java_artifact_declares_apache_2_0():
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(SDKS / "java" / "pom.xml").getroot()
    licences = [(lic.findtext("m:name", namespaces=ns), lic.findtext("m:url", namespaces=ns)) for lic in pom.findall("m:licenses/m:license", ns)]
    assert licences == [("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0.txt")]


def test_the_c_library_declares_apache_2_0_and_installs_the_text():
    for name in ("monitoring_sdk.h", "monitoring_sdk.c"):
        assert (SDKS / "c" / name).read_text().splitlines()[0] == "/* SPDX-License-Identifier: Apache-2.0 */"
    install = re.search(r"^install:.*?(?=^\S|\Z)", (SDKS / "c" / "Makefile").read_text(), re.S | re.M).group(0)
    assert re.search(r"install -m 644 LICENSE \S*share/doc/monitoring-sdk/", install)



def required_python(pyproject) -> tuple[str, str]:
    major, minor = re.fullmatch(r">=(\d+)\.(\d+)", tomllib.loads(pyproject.read_text())["project"]["requires-python"]).groups()
    return major, minor


def test_the_readme_states_the_python_versions_the_packages_require():
    readme = (REPO / "README.md").read_text()
    quick_start = " ".join(readme[: readme.index("## How it works")].split())
    major, minor = required_python(REPO / "pyproject.toml")
    assert f"Needs Python {major}.{minor} or later" in quick_start
    assert f"sys.version_info < ({major}, {minor})" in (REPO / "Makefile").read_text()  # `make` refuses older ones
    major, minor = required_python(SDKS / "python" / "pyproject.toml")
    assert f"The Python SDK alone runs on Python {major}.{minor} or later" in quick_start


# --- docs/configuration.md --------------------------------------------------------------------


def sections(markdown: str) -> dict[str, str]:
    """Heading text -> the text under it up to the next heading of any level."""
    parts = re.split(r"^(#{2,4}) (.+)$", markdown, flags=re.M)
    return {parts[i + 1].strip(): parts[i + 2] for i in range(1, len(parts) - 2, 3)}


def table_rows(text: str) -> list[list[str]]:
    """The cells of the table rows in `text` (a header row names no `key` and counts for none)."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def code(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def documented(rows: list[list[str]]) -> dict[str, str]:
    """key -> its default cell's text as the rows give them: a row may name several keys, with
    one default each (`a`, `b` | `1`, `2`) or one for all."""
    keys = {}
    for row in rows:
        names = code(row[0])
        defaults = code(row[1])
        for i, name in enumerate(names):
            if row[1].startswith("required"):
                keys[name] = "required"
            elif len(defaults) == len(names):
                keys[name] = defaults[i]
            elif len(defaults) == 1:
                keys[name] = defaults[0]
            elif not defaults:
                keys[name] = None
            else:
                raise AssertionError(f"docs/configuration.md: cannot pair the keys {names} with the defaults {defaults}")
    return keys


def documented_default(cls, field: attrs.Attribute, shown: str | None):
    """The value the docs' default cell means, read by the field's type as the config reader
    reads it: `required` is no default, a cell without code (`unset`) is None."""
    if shown == "required":
        return attrs.NOTHING
    if shown is None:
        return None
    kind = typing.get_type_hints(cls, include_extras=True)[field.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind == Duration:
        return parse_duration(shown)
    if kind == ByteSize:
        return parse_bytesize(shown)
    if kind == StringPairs:  # a YAML mapping, kept as pairs
        return tuple(YAML(typ="safe").load(shown).items())
    if typing.get_origin(kind) is tuple:  # a YAML list
        return tuple(YAML(typ="safe").load(shown))
    if kind is bool:
        return {"true": True, "false": False}[shown]
    if kind is int:
        return int(shown)
    if kind is float:
        return float(shown)
    return "" if shown == '""' else shown


def assert_documented(cls, keys: dict[str, str], where: str):
    fields = {f.name: f for f in attrs.fields(cls)}
    assert set(keys) == set(fields), f"{where}: documented {sorted(keys)}, settings {sorted(fields)}"
    for name, field in fields.items():
        expected = field.default
        assert documented_default(cls, field, keys[name]) == expected, f"{where}: {name} documented as {keys[name]!r}, default is {expected!r}"


DOC = sections(CONFIGURATION.read_text())


def top_level_keys() -> dict[str, dict[str, str]]:
    """section -> {key: default} of the dotted keys in the top-level table (`tcp.host`, ...)."""
    found: dict[str, dict[str, str]] = {}
    for name, default in documented(table_rows(DOC["Top level"])).items():
        if "." in name:
            section, key = name.split(".", 1)
            found.setdefault(section, {})[key] = default
    return found


def test_the_top_level_table_documents_only_sections_that_exist():
    assert set(top_level_keys()) <= set(_TOP_LEVEL)


@pytest.mark.parametrize("section", sorted(_TOP_LEVEL))
def test_every_top_level_setting_is_documented_with_its_default(section):
    assert_documented(_TOP_LEVEL[section], top_level_keys().get(section, {}), f"top level {section}")


@pytest.mark.parametrize("type_name", sorted(SOURCE_TYPES))
def test_every_source_type_setting_is_documented_with_its_default(type_name):
    # A source type's settings are rows `TYPE.key` of the top-level table (tcp's are also the
    # `tcp:` section) or a table under the heading "… TYPE source" (e.g. "OTLP source").
    headings = [h for h in DOC if h.lower().endswith(f"{type_name} source")]
    assert type_name in top_level_keys() or len(headings) == 1, f"docs/configuration.md has no section '## … {type_name} source'"
    keys = top_level_keys().get(type_name) or documented(table_rows(DOC[headings[0]]))
    assert_documented(source_class(type_name).Settings, keys, f"source {type_name}")


@pytest.mark.parametrize("type_name", sorted(BACKEND_TYPES))
def test_every_backend_type_setting_is_documented_with_its_default(type_name):
    cls = backend_class(type_name)
    if cls is None:
        pytest.skip(f"{type_name} is not available in this build")
    assert type_name in DOC, f"docs/configuration.md has no section '### {type_name}'"
    assert_documented(cls.Settings, documented(table_rows(DOC[type_name])), f"backend {type_name}")


def test_the_delivery_settings_example_holds_every_key_at_its_default():
    example = re.search(r"```yaml\n(.*?)```", DOC["Backends"], re.S).group(1)
    backend = YAML(typ="safe").load(example)["backends"]["files"]
    for group in attrs.fields(DeliverySettings):
        cls = group.type
        shown = {key: (str(value).lower() if isinstance(value, bool) else str(value)) for key, value in backend[group.name].items()}
        assert_documented(cls, shown, f"backends: {group.name}")


def test_every_transform_type_setting_is_documented():
    rows = {code(row[0])[0]: row for row in table_rows(DOC["Transforms"]) if code(row[0])}
    for type_name in TRANSFORM_TYPES:
        fields = {f.name for f in attrs.fields(transform_class(type_name).Settings)}
        assert fields <= set(code(rows[type_name][1])), f"transform {type_name}: {fields} not all in {rows[type_name][1]!r}"


def test_every_aggregate_setting_is_documented_with_its_default():
    assert_documented(AggregateSettings, documented(table_rows(DOC["Aggregate"])), "aggregate")


def test_the_rules_example_holds_every_rule_key_and_filter_key():
    example = re.search(r"```yaml\n(.*?)```", DOC["Rules"], re.S).group(1)
    rule = next(iter(YAML(typ="safe").load(example)["routing"].values()))[0]
    assert set(rule) == set(_RULE_KEYS)
    assert set(rule["filter"]) == {f.name for f in attrs.fields(FilterSettings)}


def test_the_readmes_full_config_examples_load(tmp_path):
    # Every ```yaml block of the README that is a main file (it defines backends) loads as written.
    import textwrap

    from sidecar.config import load_config

    readme = (REPO / "README.md").read_text()
    blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```yaml\n(.*?)^\1```", readme, re.S | re.M)]
    mains = [block for block in blocks if re.search(r"^backends:", block, re.M)]
    assert mains
    for number, block in enumerate(mains):
        path = tmp_path / f"example-{number}.yaml"
        path.write_text(block)
        load_config(path, None, {"PG_URL": "postgresql://user:secret@localhost:5432/monitoring"})
