"""A trio loop in a thread of its own, for test helpers (proxies) that serve while the test
runs in plain threads or in a trio run of its own."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio


class TrioThread:
    """Runs `serve(task_status)` in a new thread's trio loop from `start()` (which returns once
    it called `task_status.started()`, or raises what stopped it) until `stop()`."""

    def __init__(self, serve: Callable[..., Awaitable[Any]], what: str) -> None:
        self._serve = serve
        self._what = what
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the {self._what} did not start: {self._error!r}")

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None:
            try:
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run in the thread's loop, its result returned here."""
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    async def _main(self) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._serve)
                    self._ready.set()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise


async def serve_loopback(owner: Any, handler: Callable[[trio.SocketStream], Awaitable[Any]],
                         task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `handler` on a free loopback port, set as `owner.port` before it is started."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    owner.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
