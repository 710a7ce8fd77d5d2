"""JSONL files, safe on NFS: one write() per batch on an O_APPEND descriptor.

Paths come from a template such as `{source}.jsonl`; the values put into it come from the wire,
so each is escaped into one file name (sidecar.naming: `a/b` is `a%2Fb`, distinct sources get
distinct files) and the resolved path must stay inside `base_path`, also through symlinked
directories. A path that can never be written (a directory or a symlink where
the file should be, a file where a directory should be) costs the messages bound for it alone,
counted by reason; every other path of the batch, and every other source, keeps flowing.
"""

import errno
import os
from typing import Literal

import attrs

from sidecar.backends.base import Attempt, Backend, PartialDelivery, PermanentError, Place, RetryableError
from sidecar.bounded import ForgetfulCache
from sidecar.backends.jsonl_files import JsonlFiles, is_network_filesystem, within
from sidecar.naming import FILE_NAME, HOST, PLACEHOLDERS, escaped, template_fields
from sidecar.units import ByteSize, Duration


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
        if not within(base, sample) or sample == base:
            raise ValueError(f"path {self.path!r} must name a file inside base_path {self.base_path!r}")


def render_path(base: str, template: str, source: str, kind: str = "", date: str = "") -> str | None:
    """The file for these wire values under the absolute `base`; None if it would lie outside."""
    values = {"source": escaped(source, FILE_NAME), "type": escaped(kind, FILE_NAME), "date": escaped(date, FILE_NAME), "host": escaped(HOST, FILE_NAME)}
    path = os.path.normpath(os.path.join(base, template.format(**values)))
    return path if within(base, path) and path != base else None


def file_place(settings: FilesystemSettings, source: str, kind: str, moment) -> Place | None:
    path = render_path(os.path.abspath(settings.base_path), settings.path, source, kind, f"{moment:%Y-%m-%d}")
    return None if path is None else Place(f"file {path}", path)


class FilesystemBackend(Backend):
    type_name = "filesystem"
    Settings = FilesystemSettings
    place_of = staticmethod(file_place)

    def __init__(self, settings: FilesystemSettings, *, label: str):
        super().__init__(settings, label=label)
        self.base = os.path.abspath(settings.base_path)
        self._fields = template_fields(settings.path)
        self._per_message = bool(self._fields & {"type", "date"})
        self._paths = ForgetfulCache()  # (source, type, date) -> path
        self.files = JsonlFiles(self.base, settings)
        self._in_thread = settings.io == "thread" or (settings.io == "auto" and is_network_filesystem(self.base))

    def path_for(self, source: str, kind: str = "", date: str = "") -> str:
        key = (source, kind, date)
        path = self._paths.get(key)
        if path is None:
            path = render_path(self.base, self.settings.path, source, kind, date)
            if path is None:
                raise PermanentError(f"path for source {source!r} escapes {self.base}", reason="path_escape")
            self._paths.remember(key, path)
        return path

    async def open(self) -> None:
        # Also the probe while the circuit is open: on a network filesystem a hung server must
        # stall this backend's thread, not the event loop.
        present = await self.run_blocking(os.path.isdir, self.base) if self._in_thread else os.path.isdir(self.base)
        if not present:
            if not self.settings.create_base_path:
                raise RetryableError(f"base_path {self.base} does not exist (not mounted?): mount or create it, or set create_base_path: true")
            await self.run_blocking(os.makedirs, self.base, 0o777, True)

    async def write_batch(self, attempt: Attempt) -> None:
        source, lines = attempt.source, attempt.batch.lines
        if not self._per_message:
            payloads = [(self.path_for(source), range(len(lines)), b"\n".join(lines) + b"\n")]
        else:
            writes: dict[str, list[int]] = {}
            for index, message in enumerate(attempt.batch.messages()):
                path = self.path_for(source, message["type"], message["timestamp"][:10])
                writes.setdefault(path, []).append(index)
            payloads = [(path, indices, b"\n".join([lines[i] for i in indices]) + b"\n") for path, indices in writes.items()]
        try:
            if self._in_thread:  # a hung NFS server stalls this backend only
                unusable = await self.run_blocking(self.files.write_all, payloads)
            else:  # a local disk answers in microseconds: a thread hop would cost more than the write
                unusable = self.files.write_all(payloads)
        except OSError as exc:
            raise RetryableError(f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)}): {exc.filename or ''}") from exc
        if unusable:
            rejected = {index: problem.reason for indices, problem in unusable for index in indices}
            raise PartialDelivery("; ".join(str(problem) for _indices, problem in unusable), rejected)

    async def aclose(self) -> None:
        await self.run_blocking(self.files.close_all)
