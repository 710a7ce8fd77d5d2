"""A throwaway PostgreSQL server for the tests and the benchmark.

`PostgresServer` runs initdb into a temporary directory, listens on 127.0.0.1 at a free port
(unix sockets stay in the temporary directory), with fsync off, and password (SCRAM) auth over
TCP for the test role, so a wrong password is a real authentication failure. `stop()`/`start()`
restart the same data directory (outage tests); `close()` stops it and removes everything.

As root, the server binaries run as the `postgres` OS user (PostgreSQL refuses to run as root).

    from tests.services.postgres import postgres_server  # noqa: F401   (the session fixture)
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
ROLE = "sidecar"
PASSWORD = "Pg-t3st-S3cret-9f2c"  # distinctive, so tests can grep logs for it
DATABASE = "monitoring"


def find_bin_dir() -> Path:
    override = os.environ.get("PG_BIN_DIR")
    for candidate in ((override,) if override else ()) + BIN_DIRS:
        if candidate and Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError("PostgreSQL server binaries (initdb) not found; install the Debian package postgresql")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self, *, log_statements: bool = False):
        self.bin = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sockets"
        self.logfile = self.root / "server.log"
        self.port = 0
        self.log_statements = log_statements
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL will not run as root; the temp tree must belong to the server's user.
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.socket_dir.mkdir()
        if self._as_user:
            shutil.chown(self.socket_dir, "postgres", "postgres")

    # ------------------------------------------------------------------ lifecycle

    def _run(self, *command, check=True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as_user, *map(str, command)], check=check, capture_output=True, text=True, **kwargs)

    def init(self) -> "PostgresServer":
        pwfile = self.root / "pwfile"
        pwfile.write_text("admin-not-used\n")
        if self._as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            self.bin / "initdb", "-D", self.data, "-U", "postgres", "-E", "UTF8", "--locale=C",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--no-sync",
        )
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                # A commit is written to the WAL before it returns (no flush: fsync is off), so a
                # server killed with `-m immediate` keeps what it acknowledged, as a real one does.
                "fsync = off\nsynchronous_commit = on\nfull_page_writes = off\n"
                "max_connections = 40\nshared_buffers = 64MB\n"
                "password_encryption = 'scram-sha-256'\n"
                + ("log_statement = 'all'\n" if self.log_statements else "")
            )
        return self

    def start(self, timeout: float = 30.0) -> "PostgresServer":
        """Start (or restart) on the same data directory; the port stays the same after the first start."""
        attempts = 3 if not self.port else 1
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            result = self._run(
                self.bin / "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", int(timeout),
                "-o", f"-p {self.port}", "start", check=False,
            )
            if result.returncode == 0:
                return self
        raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{result.stderr}\n{self.server_log()[-3000:]}")

    def stop(self, mode: str = "fast") -> None:
        """`mode`: pg_ctl's; `immediate` is a crash as far as clients can tell."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run(self.bin / "pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def close(self) -> None:
        if self.data.exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ access

    def admin_dsn(self, dbname: str = DATABASE) -> str:
        """The superuser over the unix socket (trust): for set-up and inspection only."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def url(self, password: str = PASSWORD, dbname: str = DATABASE, user: str = ROLE) -> str:
        """What a sidecar config holds: the test role over TCP with a password."""
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str, *params, dbname: str = DATABASE):
        """Run one statement as the superuser; returns the rows when it has any."""
        import psycopg

        with psycopg.connect(self.admin_dsn(dbname), autocommit=True) as conn:
            cursor = conn.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else None

    def setup_role(self) -> "PostgresServer":
        from psycopg import sql

        self.admin(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(PASSWORD)).as_string(None),
            dbname="postgres",
        )
        self.admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(ROLE)).as_string(None), dbname="postgres")
        return self

    def create_database(self, name: str) -> str:
        """A fresh database owned by the test role, for a test that wants a clean slate."""
        from psycopg import sql

        self.admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(ROLE)).as_string(None), dbname="postgres")
        return name


def start_server(**kwargs) -> PostgresServer:
    server = PostgresServer(**kwargs)
    try:
        return server.init().start().setup_role()
    except BaseException:
        server.close()
        raise


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the test session; tests that stop it must start it again."""
    try:
        find_bin_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server = start_server()
    try:
        yield server
    finally:
        server.close()


def wait_ready(server: PostgresServer, timeout: float = 30.0) -> None:
    """Until the server accepts connections (after start())."""
    deadline = time.monotonic() + timeout
    while server._run(server.bin / "pg_isready", "-h", "127.0.0.1", "-p", server.port, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("PostgreSQL did not become ready")
        time.sleep(0.1)
