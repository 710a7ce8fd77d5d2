"""JSONL files under a base directory, written the way NFS needs: one write() per payload on an
O_APPEND descriptor, a bounded pool of open descriptors, rotation by size, fsync by policy. Plain
blocking calls (no trio): the filesystem backend runs them inline or in a worker thread."""

import errno
import os
import time

# Errors that say this path can never be written as it stands, whatever the retries: the
# messages bound for it are dropped with this reason, and the other paths are written.
UNUSABLE_PATH = {
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
        if within(mount_point, path) and len(mount_point) >= len(best):
            best, kind = mount_point, fstype
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse") or kind == "unknown"


def within(base: str, path: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


class JsonlFiles:
    """Appends to files under `base`; `settings` gives rotate_bytes, rotate_keep,
    max_open_files, fsync and fsync_interval (a FilesystemSettings)."""

    def __init__(self, base: str, settings):
        self.base = base
        self.settings = settings
        self._files: dict[str, int] = {}  # path -> descriptor, oldest first
        self._sizes: dict[str, int] = {}
        self._last_fsync = time.monotonic()

    def write_all(self, payloads: list[tuple[str, list[int], bytes]]) -> list[tuple[list[int], UnusablePath]]:
        """Write every (path, message indexes, payload); returns those whose path cannot be
        written, with the reason. Any other OSError closes every file and is raised."""
        unusable = []
        try:
            for path, indices, payload in payloads:
                try:
                    self._append(path, payload)
                except UnusablePath as problem:
                    unusable.append((indices, problem))
                except OSError as exc:
                    if exc.errno not in UNUSABLE_PATH:
                        raise
                    self.forget(path)
                    unusable.append((indices, UnusablePath(path, UNUSABLE_PATH[exc.errno], exc.strerror or str(exc))))
            if self.settings.fsync == "batch" or (
                self.settings.fsync == "interval" and time.monotonic() - self._last_fsync >= self.settings.fsync_interval
            ):
                for fd in self._files.values():
                    os.fsync(fd)
                self._last_fsync = time.monotonic()
        except OSError:
            self.close_all()
            raise
        return unusable

    def forget(self, path: str) -> None:
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
            if not within(os.path.realpath(self.base), os.path.realpath(directory)):
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

    def close_all(self) -> None:
        for path in list(self._files):
            try:
                self._close(path)
            except OSError:
                pass  # the descriptor is closed either way; the write error is what is reported
