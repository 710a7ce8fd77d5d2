"""JSONL files, safe on NFS: one write() per batch on an O_APPEND descriptor.

Paths come from a template such as `{source}.jsonl`; the values put into it come from the wire,
so each is reduced to `[A-Za-z0-9._-]` and the resolved path must stay inside `base_path`, also
through symlinked directories. A path that can never be written (a directory or a symlink where
the file should be, a file where a directory should be) costs the messages bound for it alone,
counted by reason; every other path of the batch, and every other source, keeps flowing.
"""

import errno
import os
import time
from typing import Literal

import attrs
import trio

from sidecar.batch import Batch
from sidecar.backends.base import Backend, PartialDelivery, PermanentError, RetryableError
from sidecar.naming import HOST, PLACEHOLDERS, safe_component, template_fields
from sidecar.units import ByteSize, Duration

# Errors that say this path can never be written as it stands, whatever the retries: the
# messages bound for it are dropped with this reason, and the other paths are written.
_UNUSABLE_PATH = {
    errno.EISDIR: "path_is_directory",
    errno.ELOOP: "path_is_symlink",  # O_NOFOLLOW: a symlink in place of the file
    errno.ENOTDIR: "path_not_directory",  # a file where a directory of the path should be
    errno.EEXIST: "path_not_directory",  # makedirs: the directory's name is taken by a file
    errno.ENAMETOOLONG: "name_too_long",
}


class UnusablePath(Exception):
    """This path cannot be written: `reason` is the drop reason."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre", "gpfs", "beegfs"})


def is_network_filesystem(path: str, mounts: str | None = None) -> bool:
    """Whether `path` is on a network filesystem, from the longest matching mount point in
    /proc/self/mounts; unknown counts as network, to be safe."""
    path = os.path.realpath(path)
    if mounts is None:
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
                mounts = handle.read()
        except OSError:
            return True
    entries = [line.split()[:3] for line in mounts.splitlines()]
    best, kind = "", "unknown"
    for _device, mount_point, fstype in (e for e in entries if len(e) == 3):
        mount_point = mount_point.replace("\\040", " ")
        if _within(mount_point, path) and len(mount_point) >= len(best):
            best, kind = mount_point, fstype
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse") or kind == "unknown"


def _within(base: str, path: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


@attrs.frozen
class FilesystemSettings:
    base_path: str
    path: str = "{source}.jsonl"
    create_base_path: bool = False
    fsync: Literal["batch", "interval", "never"] = "interval"
    fsync_interval: Duration = 1.0
    rotate_bytes: ByteSize = 0  # 0: never rotate
    rotate_keep: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    max_open_files: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    # Where writes run: `thread` (a worker thread, so a hung NFS server stalls this backend only),
    # `inline` (in the event loop, for local disks), `auto` (thread on network filesystems).
    io: Literal["auto", "thread", "inline"] = "auto"

    def __attrs_post_init__(self):
        template_fields(self.path)
        base = os.path.abspath(self.base_path)
        sample = os.path.normpath(os.path.join(base, self.path.format(**{p: "x" for p in PLACEHOLDERS})))
        if not _within(base, sample) or sample == base:
            raise ValueError(f"path {self.path!r} must name a file inside base_path {self.base_path!r}")


class FilesystemBackend(Backend):
    type_name = "filesystem"
    Settings = FilesystemSettings

    def __init__(self, settings: FilesystemSettings, *, label: str):
        super().__init__(settings, label=label)
        self.base = os.path.abspath(settings.base_path)
        self._fields = template_fields(settings.path)
        self._per_message = bool(self._fields & {"type", "date"})
        self._paths: dict[tuple, str] = {}
        self._files: dict[str, int] = {}  # path -> descriptor, oldest first
        self._sizes: dict[str, int] = {}
        self._last_fsync = time.monotonic()
        self._in_thread = settings.io == "thread" or (settings.io == "auto" and is_network_filesystem(self.base))

    def path_for(self, source: str, kind: str = "", date: str = "") -> str:
        key = (source, kind, date)
        path = self._paths.get(key)
        if path is None:
            values = {"source": safe_component(source), "type": safe_component(kind), "date": safe_component(date), "host": safe_component(HOST)}
            path = os.path.normpath(os.path.join(self.base, self.settings.path.format(**values)))
            if not _within(self.base, path) or path == self.base:
                raise PermanentError(f"path for source {source!r} escapes {self.base}", reason="path_escape")
            if len(self._paths) > 10_000:
                self._paths.clear()
            self._paths[key] = path
        return path

    async def open(self) -> None:
        if not os.path.isdir(self.base):
            if not self.settings.create_base_path:
                raise RetryableError(f"base_path {self.base} does not exist (not mounted?)")
            await trio.to_thread.run_sync(lambda: os.makedirs(self.base, exist_ok=True))

    async def write_batch(self, source: str, batch: Batch) -> None:
        lines = batch.lines
        if not self._per_message:
            payloads = [(self.path_for(source), range(len(lines)), b"\n".join(lines) + b"\n")]
        else:
            writes: dict[str, list[int]] = {}
            for index, message in enumerate(batch.messages()):
                path = self.path_for(source, message["type"], message["timestamp"][:10])
                writes.setdefault(path, []).append(index)
            payloads = [(path, indices, b"\n".join([lines[i] for i in indices]) + b"\n") for path, indices in writes.items()]
        if self._in_thread:
            # Not abandoned on cancel: a hung NFS write blocks this backend only, and is never
            # written twice by a retry racing it.
            unusable = await trio.to_thread.run_sync(self._write_all, payloads)
        else:
            # A local disk answers in microseconds: a thread hop would cost more than the write.
            unusable = self._write_all(payloads)
        if unusable:
            rejected = {index: problem.reason for indices, problem in unusable for index in indices}
            raise PartialDelivery("; ".join(str(problem) for _indices, problem in unusable), rejected)

    def _write_all(self, payloads: list[tuple[str, list[int], bytes]]) -> list[tuple[list[int], UnusablePath]]:
        """Write every payload; returns those whose path cannot be written, with the reason."""
        unusable = []
        try:
            for path, indices, payload in payloads:
                try:
                    self._append(path, payload)
                except UnusablePath as problem:
                    unusable.append((indices, problem))
                except OSError as exc:
                    if exc.errno not in _UNUSABLE_PATH:
                        raise
                    self._forget(path)
                    unusable.append((indices, UnusablePath(path, _UNUSABLE_PATH[exc.errno], exc.strerror or str(exc))))
            if self.settings.fsync == "batch" or (
                self.settings.fsync == "interval" and time.monotonic() - self._last_fsync >= self.settings.fsync_interval
            ):
                for fd in self._files.values():
                    os.fsync(fd)
                self._last_fsync = time.monotonic()
        except OSError as exc:
            self._close_all()
            raise RetryableError(f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)}): {exc.filename or ''}") from exc
        return unusable

    def _forget(self, path: str) -> None:
        """A path that failed: its descriptor, if it had one, is closed (rotation may have
        moved it away half-way)."""
        if path in self._files:
            try:
                self._close(path)
            except OSError:
                pass  # closed either way; the write's own error is what is reported

    def _append(self, path: str, payload: bytes) -> None:
        fd = self._files.get(path)
        limit = self.settings.rotate_bytes
        if fd is not None and limit and self._sizes[path] + len(payload) > limit and self._sizes[path] > 0:
            self._close(path)
            self._rotate(path)
            fd = None
        if fd is None:
            fd = self._open(path)
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._sizes[path] += len(payload)

    def _open(self, path: str) -> int:
        directory = os.path.dirname(path)
        if directory != self.base:
            os.makedirs(directory, exist_ok=True)
            # O_NOFOLLOW guards the file's own name; a symlinked directory on the way is checked
            # here, once per open, so no template value leads a write out of base_path.
            if not _within(os.path.realpath(self.base), os.path.realpath(directory)):
                raise UnusablePath(path, "path_escape", f"a symlinked directory leads out of {self.base}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        if len(self._files) >= self.settings.max_open_files:
            self._close(next(iter(self._files)))
        self._files[path] = fd
        self._sizes[path] = os.fstat(fd).st_size
        limit = self.settings.rotate_bytes
        if limit and self._sizes[path] >= limit:
            self._close(path)
            self._rotate(path)
            return self._open(path)
        return fd

    def _rotate(self, path: str) -> None:
        # path.1 is the newest rotated file; rotation assumes one writer per file.
        keep = self.settings.rotate_keep
        for index in range(keep - 1, 0, -1):
            older = f"{path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{path}.{index + 1}")
        os.replace(path, f"{path}.1")

    def _close(self, path: str) -> None:
        fd = self._files.pop(path)
        self._sizes.pop(path, None)
        try:
            if self.settings.fsync != "never":
                os.fsync(fd)
        finally:
            os.close(fd)

    def _close_all(self) -> None:
        for path in list(self._files):
            try:
                self._close(path)
            except OSError:
                pass  # the descriptor is closed either way; the write error is what is reported

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_all)
