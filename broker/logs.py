"""structlog setup: JSON lines in production, readable console output on a terminal.

Shared context keys are constants so every module binds the same names.
"""

from __future__ import annotations

import logging
import sys

import structlog

CONN = "conn"
USER = "user"
DEVICE = "device"
CONV = "conv"
LSN = "lsn"
PEER = "peer"


class LossyStream:
    """The log's stream, whose failures lose lines instead of failing what logged them.

    A log line that cannot be written (stderr redirected to a full disk, /dev/full, a pipe whose
    reader went away) must not stop the broker: the write raised from deep inside a send's
    handling or a commit's fan-out, and the broker exited.
    """

    __slots__ = ("__weakref__", "stream")  # structlog keeps a lock per stream, weakly keyed

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    """Route structlog events to `stream` (stderr) as JSON, or as console text on a TTY."""
    stream = LossyStream(stream or sys.stderr)
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (trio's accept loop when it runs out of file
    # descriptors, ...): their records become events of ours, so the output stays one format.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(level.upper())


class _ToStructlog(logging.Handler):
    """A stdlib logging handler that emits each record as a structlog event."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger("homing")
        method = getattr(log, record.levelname.lower(), log.warning)
        extra = {"exc_info": record.exc_info} if record.exc_info else {}
        method(record.getMessage(), logger=record.name, **extra)


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    """A bound logger carrying `context`."""
    return structlog.get_logger("homing").bind(**context)
