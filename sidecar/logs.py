"""Structured log lines on stderr, one event per line: logfmt (`time level=... logger=...
msg="..."`) or JSON lines (`--log-format json`); and the two guards that keep what clients send
from flooding them."""

import datetime as dt
import json
import logging
import sys
import time

import orjson

from sidecar.redaction import without_secrets


def _time(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        text = without_secrets(text)  # an error may quote a connection string or a URL
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{_time(record)} level={record.levelname.lower()} logger={record.name} msg="{escaped}"'


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, and exc_info (the traceback's text)
    when the record has one; for log collectors that read JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _time(record), "level": record.levelname.lower(), "logger": record.name, "msg": without_secrets(record.getMessage())}
        if record.exc_info:
            line["exc_info"] = without_secrets(self.formatException(record.exc_info))
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:  # a lone surrogate, from the wire: escaped, as the standard library does
            return json.dumps(line, default=str)


FORMATTERS = {"text": LogfmtFormatter, "json": JsonFormatter}


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[log_format]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """Log at most once per interval per key, saying how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key, message: str, *args) -> None:
        now = time.monotonic()
        if len(self._last) > 10_000:  # keys may come from the wire (sources): stay bounded
            self._last.clear()
            self._suppressed.clear()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            message += f" (and {held} more since the last report)"
        self.logger.warning(message, *args)


class DistinctErrorLog:
    """Log a bug's traceback the first time it is met at one place in the code, then count it:
    one hostile client repeating an input that trips a bug must not flood the log."""

    def __init__(self, logger: logging.Logger, limit: int = 1000):
        self.logger = logger
        self.limit = limit
        self.seen: dict[tuple, int] = {}

    def log(self, exception: BaseException, message: str, *args) -> None:
        key = _where(exception)
        seen = self.seen.get(key, 0)
        if seen == 0 and len(self.seen) < self.limit:
            self.logger.error(message + " (its traceback is logged this once)", *args, exc_info=exception)
        if key in self.seen or len(self.seen) < self.limit:
            self.seen[key] = seen + 1


def _where(exception: BaseException) -> tuple:
    """An exception's type and the place it was raised."""
    frame = exception.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return (type(exception).__name__,)
    return (type(exception).__name__, frame.tb_frame.f_code.co_filename, frame.tb_lineno)
