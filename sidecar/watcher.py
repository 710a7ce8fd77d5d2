"""Watches the main config file and routes.d/ for changes by content.

Polling content, not inotify or mtimes: a Kubernetes ConfigMap update swaps a `..data` symlink
(no event on the files themselves), editors replace files by rename, and NFS has no events at
all; reading a few small files once a second sees all of them.
"""

import hashlib
import logging
from pathlib import Path

import trio

from sidecar.config import DEFAULT_CONFIG, ReloadSettings, route_files

log = logging.getLogger("sidecar.watcher")


def fingerprint(config_path: Path | None, routes_dir: Path | None) -> tuple:
    """What the configuration is now: a digest per file, or the error reading it."""

    def digest(path: Path) -> str:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            return f"unreadable: {exc.strerror}"

    files = [(str(config_path or DEFAULT_CONFIG), digest(config_path or DEFAULT_CONFIG))]
    files.extend((str(path), digest(path)) for path in route_files(routes_dir))
    return tuple(files)


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

    async def _fingerprint(self) -> tuple:
        return await trio.to_thread.run_sync(fingerprint, self.config_path, self.routes_dir)

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
            if current == seen:
                continue
            # Wait for the writer to finish: several files, or one written in steps.
            while True:
                await trio.sleep(self.settings.settle_delay)
                settled = await self._fingerprint()
                if settled == current:
                    break
                current = settled
            changed = sorted({name for name, _ in set(current) ^ set(seen)})
            seen = current
            await self.on_change("changed: " + ", ".join(changed))
