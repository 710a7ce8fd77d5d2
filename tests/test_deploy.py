"""What can be checked of the deployment without a container engine or a cluster.

- The image: the Containerfile's own build and install lines, run as written (container paths
  mapped to a scratch directory), give a venv that runs the way the image runs it (its
  ENTRYPOINT, CMD, ENV and USER) on a root that is read-only (a private mount namespace),
  with only the image's volumes writable; a message sent to the socket is delivered, SIGTERM
  ends it cleanly.
- The manifests: rendered with kustomize (the version the Makefile pins), validated against
  the Kubernetes schemas of kubernetes-validate, and checked for what the schemas cannot say
  (a native sidecar, probes on the view's port, the buffer within its emptyDir, the grace
  period covering the drain, the security context). The sidecar config inside the ConfigMap
  loads, and the example application's jobs show in the view of a sidecar running it.
- The systemd unit: its hardening, and `systemd-analyze verify`.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import sidecar
from sidecar.config.loader import load_config
from sidecar.disk_log import SEGMENT_BYTES
from tests.harness import wait_until

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "Containerfile"
KUBERNETES = REPO / "deploy" / "kubernetes"
SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "monitoring-sidecar.service"
# The oldest Kubernetes the manifests are for (native sidecars and the preStop sleep action are
# on by default from 1.30) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


# ------------------------------------------------------------------ the Containerfile


def containerfile_stages(text: str) -> list[dict]:
    """The stages of a Containerfile: each {name, base, instructions: [(KEYWORD, arguments)]},
    comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[dict] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            words = arguments.split()
            stages.append({"base": words[0], "name": words[2] if len(words) == 3 and words[1].upper() == "AS" else None, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, arguments))
    return stages


def stage_values(stage: dict, keyword: str) -> list[str]:
    return [arguments for kw, arguments in stage["instructions"] if kw == keyword]


def stage_env(stage: dict, base: dict[str, str]) -> dict[str, str]:
    """The environment after the stage's ENV lines, `$NAME` expanded as the builder does."""
    env = dict(base)
    for arguments in stage_values(stage, "ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), value)
    return env


STAGES = containerfile_stages(CONTAINERFILE.read_text())
BUILD = next(stage for stage in STAGES if stage["name"] == "build")
RUNTIME = STAGES[-1]
WHEEL_COMMAND = next(run for run in stage_values(BUILD, "RUN") if "pip wheel" in run)
INSTALL_COMMAND = next(run for run in stage_values(BUILD, "RUN") if "venv" in run and "pip install" in run)
USER_ID, GROUP_ID = (int(part) for part in stage_values(RUNTIME, "USER")[-1].split(":"))
VOLUMES = [volume for arguments in stage_values(RUNTIME, "VOLUME") for volume in json.loads(arguments)]
IMAGE_ENV = stage_env(RUNTIME, {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"})
IMAGE_CONFIG = Path(IMAGE_ENV["MONITORING_SIDECAR_CONFIG"])
# What the runtime stage copies from the build context: container path -> repository path.
IMAGE_FILES = {Path(words[-1]): REPO / words[0] for words in (a.split() for a in stage_values(RUNTIME, "COPY")) if not words[0].startswith("--")}


def test_the_image_runs_as_a_non_root_user_with_its_volumes_under_tini():
    assert USER_ID != 0 and GROUP_ID != 0, "USER is numeric and not root, so runAsNonRoot can check it"
    config = load_config(IMAGE_FILES[IMAGE_CONFIG], IMAGE_FILES[Path(IMAGE_ENV["MONITORING_SIDECAR_ROUTES"])])
    socket_dir = str(Path(config.sources["local"].settings.unix).parent)
    assert sorted(VOLUMES) == sorted([config.storage.data_dir, socket_dir]), "the data directory and the socket's are the volumes"
    created = re.findall(r"install -d -o (\d+) -g (\d+) -m (\d+) (\S+)", " ".join(stage_values(RUNTIME, "RUN")))
    assert {path: (int(uid), int(gid)) for uid, gid, _mode, path in created} == {volume: (USER_ID, GROUP_ID) for volume in VOLUMES}
    assert "install -y --no-install-recommends tini" in " ".join(stage_values(RUNTIME, "RUN"))
    entrypoint = json.loads(stage_values(RUNTIME, "ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["/usr/bin/tini", "--"] and entrypoint[2] == "monitoring-sidecar"
    assert json.loads(stage_values(RUNTIME, "CMD")[-1]) == ["run"]
    # The build stage makes the venv the runtime stage takes, and checks the hot path is in it.
    venv = INSTALL_COMMAND.split("python -m venv ")[1].split()[0]
    assert f"--from=build {venv} {venv}" in stage_values(RUNTIME, "COPY")
    assert any('--version | grep -F "(native hot path: built)"' in run for run in stage_values(BUILD, "RUN"))
    # A local build's extension, caches and venv never enter the context.
    ignored = (REPO / ".containerignore").read_text().split()
    assert {".venv", "**/*.so", "native/target", "**/__pycache__", ".git"} <= set(ignored)


def test_the_image_default_config_is_the_pods():
    assert IMAGE_FILES[IMAGE_CONFIG] == KUBERNETES / "base" / "sidecar.yaml"
    assert IMAGE_FILES[Path(IMAGE_ENV["MONITORING_SIDECAR_ROUTES"])] == KUBERNETES / "base" / "routes.d"


class ScratchRoot:
    """Container paths mapped into a scratch directory every user may traverse (pytest's
    tmp_path is under a 0700 directory), to be run as the image's user."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="sidecar-image-"))
        self.path.chmod(0o755)
        self.mapping: dict[str, Path] = {}

    def map(self, container_path: str, name: str) -> Path:
        self.mapping[container_path] = self.path / name
        return self.path / name

    def host(self, text: str) -> str:
        """`text` with every mapped container path (a whole path or its prefix) made the host's."""
        for container_path in sorted(self.mapping, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(container_path)}(?=[/\s\"',]|$)", str(self.mapping[container_path]), text, flags=re.M)
        return text

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def interpreter_for(uid: int, gid: int) -> str:
    """A Python 3.11+ outside any home directory, as the image's is, that the image's user can run."""
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", candidate, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"],
            capture_output=True,
        )
        if Path(candidate).exists() and probe.returncode == 0:
            return candidate
    pytest.fail("no Python 3.11 or later that a non-root user can run (/usr/bin/python3 with python3-venv)")


@pytest.fixture(scope="module")
def image():
    """The image's venv, built and installed by the Containerfile's lines, in a scratch root."""
    if os.geteuid() != 0:
        pytest.skip("runs the image as its user on a read-only root: needs root (a mount namespace, setuid)")
    for tool in ("unshare", "setpriv", "findmnt", "tini"):
        assert shutil.which(tool), f"{tool} is needed (util-linux, and tini from tests/debian-packages.txt: make debian-packages)"
    root = ScratchRoot()
    try:
        for container_path, name in (("/src", "src"), ("/dist", "dist"), ("/opt/monitoring-sidecar", "opt"), ("/etc/monitoring-sidecar", "etc")):
            root.map(container_path, name)
        for volume in VOLUMES:
            root.map(volume, "volume-" + volume.strip("/").replace("/", "-"))
        # The build context the build stage copies: the repository's tracked files under each source.
        tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
        for arguments in stage_values(BUILD, "COPY"):
            *sources, destination = arguments.split()
            if sources[0].startswith("--from"):
                continue
            for source in sources:
                for name in (n for n in tracked if n == source or n.startswith(source + "/")):
                    target = Path(root.host(destination)) / (Path(name).name if name == source else Path(name).relative_to(source))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / name, target)
        python = interpreter_for(USER_ID, GROUP_ID)
        # As in the build stage: nothing of this test's own Python (PYTHONPATH names the checkout).
        build_env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        for command in (WHEEL_COMMAND, INSTALL_COMMAND):
            shell_command = root.host(command).replace("python -m ", f"{python} -m ", 1)
            result = subprocess.run(["sh", "-c", shell_command], capture_output=True, text=True, timeout=900, cwd=root.path, env=build_env)
            assert result.returncode == 0, f"{shell_command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        # The runtime stage: its files from the context, its volumes owned by its user.
        for container_path, source in IMAGE_FILES.items():
            target = Path(root.host(str(container_path)))
            target.parent.mkdir(parents=True, exist_ok=True)
            for file in [source] if source.is_file() else sorted(source.iterdir()):
                destination = target if source.is_file() else target / file.name
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_text(root.host(file.read_text()))
        for volume in VOLUMES:
            directory = Path(root.host(volume))
            directory.mkdir(parents=True)
            os.chown(directory, USER_ID, GROUP_ID)
            directory.chmod(0o770)
        yield root
    finally:
        root.remove()


class RunningSidecar:
    """A sidecar process (its stdout and stderr in files) and its HTTP view, once it is ready."""

    def __init__(self, argv: list[str], env: dict, cwd: Path, logs: Path):
        self.stdout_path, self.stderr_path = logs / "sidecar.stdout", logs / "sidecar.stderr"
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"))

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the sidecar exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            found = re.search(r"HTTP view on http://127\.0\.0\.1:(\d+)/", self.log())
            return found and " ready: " in self.log() and int(found.group(1))

        self.http_port = wait_until(ready, 30, "the sidecar to be ready")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout_path.read_text().splitlines() if line.startswith("{")]

    def http(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"no exit within 30 s of SIGTERM:\n{self.log()[-3000:]}") from None


def event(source: str, level: str, message: str) -> bytes:
    return json.dumps({"source": source, "type": "event", "timestamp": "2026-12-03T10:00:00.000Z", "data": {"level": level, "message": message}}).encode() + b"\n"


def send_unix(path: str, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        client.recv(1)  # the sidecar closes once it has read everything


@pytest.mark.slow
def test_the_image_runs_as_its_user_on_a_read_only_root_and_drains_on_sigterm(image):
    venv = Path(image.host("/opt/monitoring-sidecar"))
    version = subprocess.run([str(venv / "bin" / "monitoring-sidecar"), "--version"], capture_output=True, text=True, check=True)
    if shutil.which("cargo"):
        assert "(native hot path: built)" in version.stdout, version.stdout
    writable = [image.host(volume) for volume in VOLUMES]
    # Every mount the scratch root is on, and /, read-only for this process alone; the volumes
    # are bind mounts of their own, writable; then the image's user runs ENTRYPOINT + CMD.
    script = (
        'set -e; for dir in "$@"; do mount --bind "$dir" "$dir"; done; '
        f'for mount in / $(findmnt -n -o TARGET --target {shlex.quote(str(image.path))}); do mount -o remount,bind,ro "$mount"; done; '
        f'if touch {shlex.quote(str(image.path / "probe"))} 2>/dev/null; then echo "the root is writable" >&2; exit 97; fi; '
        f"exec setpriv --reuid={USER_ID} --regid={GROUP_ID} --clear-groups -- "
        + shlex.join(json.loads(stage_values(RUNTIME, "ENTRYPOINT")[-1]) + json.loads(stage_values(RUNTIME, "CMD")[-1]))
    )
    env = {name: image.host(value) for name, value in IMAGE_ENV.items()}
    # Loopback and a free port in place of the pod's 0.0.0.0:17001; tini is not PID 1 here.
    env.update(MONITORING_SIDECAR_HTTP="127.0.0.1:0", TINI_SUBREAPER="1")
    logs = Path(tempfile.mkdtemp(prefix="sidecar-image-logs-"))
    try:
        running = RunningSidecar(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *writable], env, image.path, logs)
        try:
            assert running.http("/readyz")[0] == 200 and running.http("/healthz")[0] == 200
            config = load_config(Path(env["MONITORING_SIDECAR_CONFIG"]), Path(env["MONITORING_SIDECAR_ROUTES"]))
            path = config.sources["local"].settings.unix
            mode = os.stat(path)
            assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660 and (mode.st_uid, mode.st_gid) == (USER_ID, GROUP_ID)
            send_unix(path, event("demo", "info", "not routed") + event("demo", "error", "routed to the console"))
            delivered = wait_until(lambda: running.output(), 10, "the message on stdout")
            assert [m["data"]["message"] for m in delivered] == ["routed to the console"]
            assert delivered[0]["host"] and delivered[0]["received_at"]
        finally:
            code = running.stop()
        log = running.log()
        assert code == 0, log[-3000:]
        assert "shutdown complete" in log and "lost 0" in log, log[-3000:]
        assert not re.search(r"level=(warning|error|critical)|Traceback|Read-only file system", log), log[-3000:]
        data_dir = Path(config.storage.data_dir)
        assert [p.name for p in data_dir.iterdir()] == ["console"] and data_dir.joinpath("console").stat().st_uid == USER_ID
    finally:
        shutil.rmtree(logs, ignore_errors=True)


# ------------------------------------------------------------------ the Kubernetes manifests


def makefile_variable(name: str) -> str:
    return re.search(rf"^{name} := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


@pytest.fixture(scope="session")
def kustomize() -> str:
    """The kustomize the Makefile pins, in this venv's bin/ (as `make test` installs it)."""
    version = makefile_variable("KUSTOMIZE_VERSION")
    assert sys.prefix != sys.base_prefix, "run the tests from the project's venv (make test): kustomize goes into its bin/"
    binary = Path(sys.prefix) / "bin" / "kustomize"
    if binary.exists() and subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout.strip() == version:
        return str(binary)
    go = shutil.which("go") or "/usr/local/go/bin/go"
    assert Path(go).exists(), "Go is needed to install kustomize (the Makefile's $(KUSTOMIZE) target)"
    subprocess.run([go, "install", f"sigs.k8s.io/kustomize/kustomize/v5@{version}"], env={**os.environ, "GOBIN": str(binary.parent)}, check=True, timeout=900)
    assert subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout.strip() == version
    return str(binary)


def render(kustomize: str, directory: Path) -> list[dict]:
    result = subprocess.run([kustomize, "build", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one(resources: list[dict], kind: str, name_part: str = "") -> dict:
    found = [r for r in resources if r["kind"] == kind and name_part in r["metadata"]["name"]]
    assert len(found) == 1, f"one {kind} named like {name_part!r}, got {[r['metadata']['name'] for r in found]}"
    return found[0]


def quantity(text) -> int:
    """A Kubernetes quantity in bytes (or cores for CPU, times 1000 for m)."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "m": 1, "": 1000}
    number, unit = re.fullmatch(r"(\d+)([KMG]i|m|)", str(text)).groups()
    return int(number) * units[unit]


@pytest.fixture(scope="module")
def overlay(kustomize) -> list[dict]:
    return render(kustomize, KUBERNETES / "overlays" / "example")


@pytest.mark.parametrize("directory", ["base", "overlays/example"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_validate_against_the_kubernetes_schemas(kustomize, directory, version):
    for resource in render(kustomize, KUBERNETES / directory):
        # A kind without a schema is an error here, not kubernetes-validate's warning.
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_manifests_do_not_validate_before_native_sidecars(overlay):
    deployment = one(overlay, "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


def pod_config(resources: list[dict], directory: Path):
    """The sidecar's config as the pod sees it, written out of the ConfigMaps, and loaded."""
    config_map = one(resources, "ConfigMap", "monitoring-sidecar-config")
    routes = one(resources, "ConfigMap", "monitoring-sidecar-routes")
    (directory / "routes.d").mkdir(parents=True)
    (directory / "sidecar.yaml").write_text(config_map["data"]["sidecar.yaml"])
    for name, text in routes["data"].items():
        (directory / "routes.d" / name).write_text(text)
    return load_config(directory / "sidecar.yaml", directory / "routes.d")


def test_the_pod_runs_the_sidecar_as_a_native_sidecar_sized_for_its_config(overlay, tmp_path):
    deployment = one(overlay, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    config = pod_config(overlay, tmp_path)
    (sidecar_container,) = pod["initContainers"]
    (app,) = pod["containers"]
    assert sidecar_container["restartPolicy"] == "Always", "a native sidecar: started before, stopped after the app"
    assert sidecar_container["image"].endswith(f"/monitoring-sidecar:{sidecar.__version__}")
    mounts = {m["mountPath"]: m["name"] for m in sidecar_container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[str(IMAGE_CONFIG.parent)] == "sidecar-config" and mounts[IMAGE_ENV["MONITORING_SIDECAR_ROUTES"]] == "sidecar-routes"
    # Routes from a ConfigMap updated in place (no hash suffix), the main file's hashed.
    assert volumes["sidecar-routes"]["configMap"]["name"] == "example-monitoring-sidecar-routes"
    assert re.fullmatch(r"example-monitoring-sidecar-config-\w{10}", volumes["sidecar-config"]["configMap"]["name"])
    assert one(overlay, "ConfigMap", "monitoring-sidecar-config")["data"]["sidecar.yaml"] == (KUBERNETES / "base" / "sidecar.yaml").read_text()

    # The disk buffer on an emptyDir whose sizeLimit is its cap plus each log's spare and
    # recycled segment files (DiskLog.segment_bytes), and not much more.
    data = volumes[mounts[config.storage.data_dir]]["emptyDir"]
    size_limit = quantity(data["sizeLimit"])
    overhead = sum(2 * min(SEGMENT_BYTES, max(4096, spec.delivery.queue.max_bytes // 16)) for spec in config.specs)
    assert config.storage.max_bytes + overhead <= size_limit <= config.storage.max_bytes * 1.1
    assert quantity(sidecar_container["resources"]["requests"]["ephemeral-storage"]) >= size_limit

    # The SDKs' socket on an emptyDir both containers mount, named by MONITORING_SIDECAR.
    socket_path = config.sources["local"].settings.unix
    app_mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}
    socket_dir = str(Path(socket_path).parent)
    assert mounts[socket_dir] == app_mounts[socket_dir] and "emptyDir" in volumes[mounts[socket_dir]]
    assert {e["name"]: e.get("value") for e in app["env"]}["MONITORING_SIDECAR"] == f"unix:{socket_path}"

    # Probes on the HTTP view's port.
    (port,) = sidecar_container["ports"]
    assert port["containerPort"] == config.http.port and config.http.host == "0.0.0.0"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar_container[probe]["httpGet"] == {"path": path, "port": port["name"]}

    # The grace period: the app's preStop, 10 s for the app itself, the sidecar's whole
    # shutdown budget; and the budget leaves the drain its full time.
    shutdown = config.shutdown
    assert shutdown.budget >= shutdown.connection_grace + shutdown.drain_timeout + min(2.0, shutdown.budget / 5)
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 10 + shutdown.budget

    # Locked down: no root, no privileges, nothing written outside the volumes.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == GROUP_ID, "the socket's group, which every container of the pod is in"
    assert pod["automountServiceAccountToken"] is False
    for container in (sidecar_container, app):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsUser"] != 0
        resources = container["resources"]
        assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
    assert (sidecar_container["securityContext"]["runAsUser"], sidecar_container["securityContext"]["runAsGroup"]) == (USER_ID, GROUP_ID)
    assert quantity(sidecar_container["resources"]["requests"]["cpu"]) <= quantity(sidecar_container["resources"]["limits"]["cpu"])
    assert one(overlay, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("directory", ["base", "overlays/example"])
def test_the_sidecar_config_in_the_configmaps_passes_check(kustomize, directory, tmp_path):
    resources = render(kustomize, KUBERNETES / directory)
    pod_config(resources, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(tmp_path / "sidecar.yaml"), "--routes", str(tmp_path / "routes.d")],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "source local (tcp): unix:/run/monitoring/sidecar.sock" in result.stdout
    if directory != "base":
        assert "70-example-worker.yaml" in result.stdout and "10-warnings.yaml" in result.stdout


def test_the_example_worker_shows_its_job_in_the_view(overlay, tmp_path):
    """The pod of the example overlay on this machine: the ConfigMaps written out as the kubelet
    mounts them (the container paths in the config mapped into tmp_path), the sidecar on them,
    worker.py run as the app container's command and environment say, for one job."""
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    config = pod_config(overlay, tmp_path / "config")
    mapped = {config.storage.data_dir: tmp_path / "data", str(Path(config.sources["local"].settings.unix).parent): tmp_path / "run"}
    text = (tmp_path / "config" / "sidecar.yaml").read_text()
    for container_path, host_path in mapped.items():
        host_path.mkdir()
        text = text.replace(container_path, str(host_path))
    (tmp_path / "config" / "sidecar.yaml").write_text(text)
    env = {**os.environ, "MONITORING_SIDECAR_CONFIG": str(tmp_path / "config" / "sidecar.yaml"), "MONITORING_SIDECAR_ROUTES": str(tmp_path / "config" / "routes.d"), "MONITORING_SIDECAR_HTTP": "127.0.0.1:0"}
    env.pop("MONITORING_SIDECAR_TOKEN", None)
    running = RunningSidecar([sys.executable, "-m", "sidecar", "run"], env, tmp_path, tmp_path)
    try:
        worker_volume = next(v for v in pod["volumes"] if v["name"] == "worker")["configMap"]["name"]
        worker = tmp_path / "worker.py"
        worker.write_text(one(overlay, "ConfigMap", worker_volume)["data"]["worker.py"])
        command = app["command"]
        assert command == ["python", "/opt/example/worker.py"]
        app_env = {e["name"]: e["value"] for e in app["env"]}
        for container_path, host_path in mapped.items():
            app_env["MONITORING_SIDECAR"] = app_env["MONITORING_SIDECAR"].replace(container_path, str(host_path))
        result = subprocess.run(
            [sys.executable, str(worker)], env={**app_env, "EXAMPLE_JOBS": "1", "EXAMPLE_STEP_SECONDS": "0", "PATH": os.environ["PATH"]},
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0 and "(9 sent, 0 dropped so far)" in result.stdout, result.stdout + result.stderr
        job_id = re.search(r"(job-0-\d+) done", result.stdout).group(1)

        def job_listed():
            status, body = running.http("/api/jobs")
            return status == 200 and [j for j in body["jobs"] if j["job_id"] == job_id]

        (job,) = wait_until(job_listed, 10, "the job in /api/jobs")
        assert job["status"] == "completed" and job["sources"] == ["example-worker"]
        # The overlay's route: the job's progress and spans on the console (kubectl logs).
        printed = wait_until(lambda: [m for m in running.output() if m["source"] == "example-worker"] if len(running.output()) >= 7 else None, 10, "the job on the console")
        assert sorted(m["type"] for m in printed) == ["progress"] * 5 + ["span"] * 2
    finally:
        code = running.stop()
    assert code == 0, running.log()[-3000:]


# ------------------------------------------------------------------ the systemd unit


def unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value the unit gives it, in order (systemd keys may repeat)."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def test_the_systemd_unit_runs_a_dynamic_user_on_a_read_only_system():
    unit = unit_settings(SYSTEMD_UNIT.read_text())
    service = {key: values[-1] for (section, key), values in unit.items() if section == "Service"}
    expected = {
        "DynamicUser": "yes", "ProtectSystem": "strict", "StateDirectory": "monitoring-sidecar", "NoNewPrivileges": "yes",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "PrivateUsers": "yes", "CapabilityBoundingSet": "",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native", "KillSignal": "SIGTERM",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "UMask": "0077",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert unit[("Service", "SystemCallFilter")] == ["@system-service", "~@privileged"]
    # The example config's places are the unit's directories, and SIGTERM's drain fits its stop timeout.
    config = load_config(REPO / "deploy" / "systemd" / "sidecar.yaml", None)
    assert config.storage.data_dir == "/var/lib/" + service["StateDirectory"]
    (files,) = config.specs
    assert files.settings.base_path == "/var/log/" + service["LogsDirectory"]
    assert float(service["TimeoutStopSec"]) >= config.shutdown.budget + 5
    run = shlex.split(service["ExecStart"])
    assert run[1:] == ["run", "--config", "/etc/monitoring-sidecar/sidecar.yaml", "--routes", "/etc/monitoring-sidecar/routes.d"]
    assert service["ConfigurationDirectory"].split() == ["monitoring-sidecar", "monitoring-sidecar/routes.d"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_and_rates_it_ok(tmp_path):
    # verify wants ExecStart's program to exist: a copy of the unit naming a real one.
    program = tmp_path / "bin" / "monitoring-sidecar"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / "monitoring-sidecar.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/opt/monitoring-sidecar/bin/", f"{program.parent}/"))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr  # an unknown key is only a warning
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout).group(1))
    assert exposure <= 2.0, security.stdout[-2000:]
