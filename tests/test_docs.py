"""Project hygiene that drifts unless a test holds it: one licence, Apache-2.0, declared by the
sidecar and by every SDK's own packaging."""

import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
import zipfile

import pytest

from tests.harness import REPO

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
