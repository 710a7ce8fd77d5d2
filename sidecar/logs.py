"""Structured log lines on stderr: `time level=... logger=... msg="..."`, one event per line;
and the two guards that keep what clients send from flooding them."""

import datetime as dt
import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z level={record.levelname.lower()} logger={record.name} msg="{escaped}"'


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
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
