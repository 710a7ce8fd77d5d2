"""Watches the main config file and routes.d/ for changes by content.

Polling content, not inotify or mtimes: a Kubernetes ConfigMap update swaps a `..data` symlink
(no event on the files themselves), editors replace files by rename, and NFS has no events at
all; reading a few small files once a second sees all of them.

Only whole files are loaded. After a change the watcher waits until the files have stopped
changing for `reload.settle_delay`, until the newest of them was last written at least that
long ago, and until each changed file ends with a newline, as every editor and `echo` writes
it (a file without one is taken as it is once it has stood unchanged for `INCOMPLETE_GRACE`).
A writer that pauses longer than that in the middle of a file cannot be told from one that
has finished: write drop-ins whole, by renaming a finished file into place.
"""

import hashlib
import logging
import time
from pathlib import Path

import attrs
import trio

from sidecar.config.loader import DEFAULT_CONFIG, route_files
from sidecar.config.settings import ReloadSettings

log = logging.getLogger("sidecar.watcher")

# How long a changed file without a final newline may stand before it is loaded all the same.
INCOMPLETE_GRACE = 5.0


@attrs.frozen
class FileState:
    """What one config file is now: its content digest (or why it has none), size, write time,
    and whether it ends with a newline."""

    digest: str
    size: int = 0
    mtime: float = 0.0
    complete: bool = True


def file_state(path: Path, max_size: int) -> FileState:
    try:
        stat = path.stat()
        if stat.st_size > max_size:
            # Too large to load: the loader says so; reading it every poll would cost more.
            return FileState(f"oversize:{stat.st_size}:{stat.st_mtime_ns}", stat.st_size, stat.st_mtime)
        content = path.read_bytes()
    except OSError as exc:
        return FileState(f"unreadable: {exc.strerror}")
    return FileState(hashlib.sha256(content).hexdigest(), len(content), stat.st_mtime, not content or content.endswith(b"\n"))


def fingerprint(config_path: Path | None, routes_dir: Path | None, max_size: int = ReloadSettings().max_file_size) -> dict[str, FileState]:
    """What the configuration is now: each file's state, by path."""
    main = config_path or DEFAULT_CONFIG
    files = {str(main): file_state(main, ReloadSettings().max_file_size)}
    files.update((str(path), file_state(path, max_size)) for path in route_files(routes_dir))
    return files


def changed_files(before: dict[str, FileState], after: dict[str, FileState]) -> list[str]:
    """Files added, removed or changed in content."""
    return sorted(name for name in before.keys() | after.keys() if (before.get(name) and before[name].digest) != (after.get(name) and after[name].digest))


def still_being_written(states: dict[str, FileState], names: list[str], settle_delay: float, now: float) -> str | None:
    """Why the changed files `names` should not be loaded yet, or None when they look whole."""
    for name in names:
        state = states.get(name)
        if state is None:
            continue  # removed: nothing to wait for
        age = now - state.mtime
        if age < settle_delay:
            return f"{name} was written {age:.2f}s ago"
        if not state.complete and age < INCOMPLETE_GRACE:
            return f"{name} does not end with a newline yet"
    return None


class ConfigWatcher:
    def __init__(self, config_path: Path | None, routes_dir: Path | None, settings: ReloadSettings, on_change):
        self.config_path = config_path
        self.routes_dir = routes_dir
        self.settings = settings
        self.on_change = on_change  # async callable(reason: str)
        self._requested = trio.Event()
        self._request_reason = ""

    def request_reload(self, reason: str) -> None:
        """Reload now, changed or not (SIGHUP, an HTTP request)."""
        self._request_reason = reason
        self._requested.set()

    async def _fingerprint(self) -> dict[str, FileState]:
        return await trio.to_thread.run_sync(fingerprint, self.config_path, self.routes_dir, self.settings.max_file_size)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        seen = await self._fingerprint()
        task_status.started()
        while True:
            with trio.move_on_after(self.settings.poll_interval):
                await self._requested.wait()
            if self._requested.is_set():
                self._requested = trio.Event()
                seen = await self._fingerprint()
                await self.on_change(self._request_reason)
                continue
            current = await self._fingerprint()
            changed = changed_files(seen, current)
            if not changed:
                continue
            current = await self._settled(current, seen)
            changed = changed_files(seen, current)
            seen = current
            if changed:
                await self.on_change("changed: " + ", ".join(changed))

    async def _settled(self, current: dict[str, FileState], seen: dict[str, FileState]) -> dict[str, FileState]:
        """Wait until the changed files are whole (see the module's docstring); their state then."""
        reported = None
        while True:
            await trio.sleep(max(self.settings.settle_delay, 0.05))
            settled = await self._fingerprint()
            if settled != current:
                current = settled
                continue
            # File times are the wall clock's; compared with the wall clock.
            waiting = still_being_written(current, changed_files(seen, current), self.settings.settle_delay, time.time())
            if waiting is None:
                return current
            if waiting != reported:
                log.info("reload waits: %s", waiting)
                reported = waiting

