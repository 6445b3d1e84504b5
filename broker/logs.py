"""structlog setup: JSON lines in production, readable console output on a terminal.

Shared context keys are constants so every module binds the same names.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections import deque

import structlog

CONN = "conn"
USER = "user"
DEVICE = "device"
CONV = "conv"
LSN = "lsn"
PEER = "peer"


# Log lines held for a sink that does not take them (a full pipe) before lines are lost
# (`--log-buffer-bytes`).
DEFAULT_BUFFER_BYTES = 1 << 20
DRAIN_AT_EXIT_S = 2.0  # how long an exit waits for the held lines to be written
# A warning whose cause comes once per client of a crowd (thousands reconnecting after a
# restart, refused at a connection limit) is logged at most this often (`Repeated`).
REPEAT_EVERY_S = 10.0


class LossyStream:
    """The log's stream, whose failures lose lines instead of failing or stopping the broker.

    A log line that cannot be written (stderr redirected to a full disk, /dev/full, a pipe whose
    reader went away) must not stop the broker: the write raised from deep inside a send's
    handling or a commit's fan-out, and the broker exited. Nor may a sink that stops taking
    lines (a pipe whose reader is alive but reads nothing: a hung log shipper, a paused
    `| less`): the write blocked the broker's only thread once the pipe was full, and it
    answered nobody. So lines are written by a thread of their own; up to `max_bytes` of them
    wait for a slow sink, whole lines past that are lost, and `log_lines_dropped` counts them
    once the sink takes lines again.
    """

    # __weakref__: structlog's lock, weakly keyed
    __slots__ = ("__weakref__", "_closed", "_cond", "_held", "_held_bytes", "_line", "_thread",
                 "_writing", "dropped", "max_bytes", "stream")

    def __init__(self, stream, max_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.dropped = 0  # lines lost since the last log_lines_dropped
        self._line: list[str] = []  # the pieces of the line being printed
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._writing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # no longer the log's: its writer ends once it has nothing held

    def write(self, text: str) -> int:
        self._line.append(text)
        return len(text)

    def flush(self) -> None:
        """The end of a line (structlog prints a line, then flushes): hand it to the writer."""
        if not self._line:
            return
        line = "".join(self._line).encode("utf-8", "backslashreplace")
        self._line.clear()
        with self._cond:
            if self._held_bytes + len(line) > self.max_bytes and self._held:
                self.dropped += 1
                return
            self._held.append(line)
            self._held_bytes += len(line)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="homing-log",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held:
                    if self._closed:  # a line printed later starts a writer again
                        self._thread = None
                        return
                    self._cond.wait()
                lines = list(self._held)
                self._held.clear()
                self._writing = True
            try:
                written = self._write(b"".join(lines))
                with self._cond:
                    self._held_bytes -= sum(map(len, lines))
                    if not written:
                        self.dropped += len(lines)
                        continue
                    dropped, self.dropped = self.dropped, 0
                if dropped:  # the sink took lines again: say how many were lost
                    get_logger().warning("log_lines_dropped", lines=dropped,
                                         buffer_bytes=self.max_bytes)
            finally:
                with self._cond:  # (after the line above is held: a drain waits for it)
                    self._writing = False
                    self._cond.notify_all()

    def _write(self, data: bytes) -> bool:
        """Write `data` to the sink; False if it was lost. Whatever the sink raises, the writer
        goes on (until 2026-12-05 an exception other than OSError and ValueError ended its
        thread, silently, and every later line was lost)."""
        # Straight to the file descriptor: a daemon thread blocked inside the text stream's
        # buffer would hold its lock, and the interpreter's flush of stderr at exit would abort.
        if self.stream is None:  # started without a stderr (`2>&-`): nowhere to write
            return False
        try:
            fd = self.stream.fileno()
        except Exception:  # no descriptor (a StringIO), or closed
            fd = None
        try:
            if fd is None:
                self.stream.write(data.decode("utf-8"))
                self.stream.flush()
                return True
            while data:
                data = data[os.write(fd, data):]
        except Exception:  # OSError (a full disk), ValueError (closed), a sink's own bug
            return False
        return True

    def drain(self, timeout: float = DRAIN_AT_EXIT_S) -> bool:
        """Wait until the lines held are written, `timeout` seconds at most (a stalled sink);
        True if they were."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._held and not self._writing, timeout)

    def close(self) -> None:
        """This stream is no longer the log's (`configure` made another): its writer thread
        ends once it has written what it holds."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def busy(self) -> bool:
        """Whether it holds lines, or its writer thread is still running."""
        with self._cond:
            return bool(self._held) or self._thread is not None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False


_streams: list[LossyStream] = []


class Repeated:
    """A warning said once for many occurrences: the first at once, then at most one per
    `every_s`, each saying how many came since the line before (its own included).

    A restart at --max-handshakes 50 with 3,000 devices reconnecting logged 784
    `handshakes_full` warnings, a line per refused connection; the operator needs to know that
    the limit is being met and how often, not each time. `total` counts them all, for
    `broker_stats`; the occurrences after the last line are in the next one.
    """

    __slots__ = ("_due", "_unsaid", "every_s", "total")

    def __init__(self, every_s: float = REPEAT_EVERY_S) -> None:
        self.every_s = every_s
        self.total = 0
        self._unsaid = 0
        self._due = float("-inf")

    def count(self, now: float) -> int | None:
        """Count one at monotonic time `now`; the number to log with it if a line is due, else
        None."""
        self.total += 1
        self._unsaid += 1
        if now < self._due:
            return None
        self._due = now + self.every_s
        said, self._unsaid = self._unsaid, 0
        return said


def drain(timeout: float = DRAIN_AT_EXIT_S) -> None:
    """Write the log lines still held (before anything else is written to stderr, and at
    exit), waiting `timeout` seconds at most for a sink that takes nothing."""
    for stream in _streams:
        stream.drain(timeout)


atexit.register(drain)


def configure(level: str = "info", fmt: str = "auto", stream=None,
              buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
    """Route structlog events to `stream` (stderr) as JSON, or as console text on a TTY;
    up to `buffer_bytes` of lines wait for a sink that is slow to take them."""
    drain()
    for old in _streams:  # (until 2026-12-05 each kept a writer thread parked for good)
        old.close()
    stream = LossyStream(stream or sys.stderr, buffer_bytes)
    # The old ones stay while they hold lines (printed by loggers cached before), so that an
    # exit drains them too.
    _streams[:] = [old for old in _streams if old.busy()] + [stream]
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
    # Libraries log through the standard library (trio, were its accept loop to meet an error
    # broker/listen.py does not take): their records become events of ours, so the output
    # stays one format.
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
