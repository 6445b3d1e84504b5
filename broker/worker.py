"""One long-lived thread that runs blocking calls for trio tasks, one call at a time.

The committer runs every batch (the LMDB write and its fsync) here, hundreds of times a second
under load. `trio.to_thread.run_sync` does the same job for any caller: it takes a thread from
trio's cache and names it for each call (two `prctl`s), wraps the call for cancellation and
contextvars, and reports back through a second callback. Measured on the 2-core VM of
docs/BENCHMARKS.md with an empty call, that cost 125 us of CPU per call (114 us with both
threads on one core); this thread's queue-and-reschedule hand-off 84 us (22 us on one core).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_STOP = object()


class WorkerThread:
    """Start with `start()` from trio, `await run(fn, *args)`, and `stop()` when done.

    `run` is `submit` then `wait`; the two halves let a task start a call, do other work while
    the thread runs it, and then collect its result. Waiting cannot be cancelled: a call that
    started runs to its end and its caller gets the result (as
    `trio.to_thread.run_sync(..., abandon_on_cancel=False)`), which the committer needs, since
    a batch it started may have become durable.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[Any] | None = None  # each start makes its own
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the thread; call from the trio thread whose tasks will `run` on it."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was started already")
        self._token = trio.lowlevel.current_trio_token()
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, args=(self._calls,), name=self.name,
                                        daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the thread and return its result (or raise its exception)."""
        return await self.wait(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> Call:
        """Queue `fn(*args)` for the thread (calls run one at a time, in submission order)."""
        if self._thread is None or self._calls is None:
            raise RuntimeError(f"{self.name} is not running")
        call = Call()
        self._calls.put((fn, args, call))
        return call

    async def wait(self, call: Call) -> Any:
        """Wait for a submitted call to end; return its result (or raise its exception)."""
        if not call.ended:
            call.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if call.failed:
            raise call.result
        return call.result

    def stop(self) -> None:
        """Let the thread end after the call it is running (if any); does not wait for it."""
        if self._thread is not None and self._calls is not None:
            self._calls.put(_STOP)
            self._thread = None

    def _serve(self, calls: queue.SimpleQueue[Any]) -> None:
        token = self._token
        while (item := calls.get()) is not _STOP:
            fn, args, call = item
            try:
                call.result = fn(*args)
            except BaseException as exc:
                call.failed, call.result = True, exc
            try:
                token.run_sync_soon(_end, call)
            except trio.RunFinishedError:  # the trio run ended meanwhile: nobody to tell
                return


class Call:
    """A call submitted to a WorkerThread.

    The worker writes `result` and `failed`, then hands the call back to the trio thread, where
    alone `ended` and `task` change: a waiter that sees `ended` sees the result too.
    """

    __slots__ = ("ended", "failed", "result", "task")

    def __init__(self) -> None:
        self.ended = False
        self.failed = False
        self.result: Any = None
        self.task: trio.lowlevel.Task | None = None  # the task waiting for it, if any


def _end(call: Call) -> None:
    """Runs in the trio thread once the worker finished `call`: wake its waiter, if any."""
    call.ended = True
    if call.task is not None:
        trio.lowlevel.reschedule(call.task)
