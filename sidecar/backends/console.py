"""Human-readable lines on stdout, for `make run` and for watching a source by eye."""

import sys
from typing import Literal

import attrs

from sidecar.backends.base import Attempt, Backend, RetryableError

# Terminal control characters from the wire must not reach the terminal as such.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def _clean(text) -> str:
    return str(text).translate(_CONTROL)


def _summary(message: dict) -> str:
    data = message["data"]
    kind = message["type"]
    if kind == "event":
        return f"{data['level'].upper():<8} {data['message']}"
    if kind == "metric":
        unit = f" {data['unit']}" if data.get("unit") else ""
        tags = " " + ",".join(f"{k}={v}" for k, v in data["tags"].items()) if data.get("tags") else ""
        return f"{data['name']}={data['value']}{unit}{tags}"
    if kind == "progress":
        return f"job {data['job_id']} {data['percent']}% {data['status']}"
    if kind == "resource":
        return " ".join(f"{k}={v}" for k, v in data.items() if v is not None)
    if data["phase"] == "start":
        return f"span {data['name']} started"
    return f"span {data['name']} {data['status']} after {data['duration_ms']:.1f} ms"


def format_line(message: dict) -> str:
    extra = []
    context = message.get("context") or {}
    extra.extend(f"{k}={v}" for k, v in context.items())
    if "trace_id" in message:
        extra.append(f"trace={message['trace_id'][:8]}")
    tail = f"  [{' '.join(extra)}]" if extra else ""
    return _clean(f"{message['timestamp']} {message['source']:<16} {message['type']:<8} {_summary(message)}{tail}")


@attrs.frozen
class ConsoleSettings:
    stream: Literal["stdout", "stderr"] = "stdout"
    format: Literal["text", "json"] = "text"


class ConsoleBackend(Backend):
    type_name = "console"
    Settings = ConsoleSettings

    async def write_batch(self, attempt: Attempt) -> None:
        batch = attempt.batch
        if self.settings.format == "json":
            payload = b"\n".join(batch.lines) + b"\n"
        else:
            payload = "".join(format_line(m) + "\n" for m in batch.messages()).encode("utf-8", "replace")
        stream = sys.stdout if self.settings.stream == "stdout" else sys.stderr
        try:
            await self.run_blocking(self._write, stream.buffer, payload)
        except OSError as exc:
            raise RetryableError(f"cannot write to {self.settings.stream}: {exc}") from exc

    @staticmethod
    def _write(stream, payload: bytes) -> None:
        stream.write(payload)
        stream.flush()
