"""The client SDK for code that is not trio (a Django or Flask view, a cron script, a pool of
worker threads, an asyncio service): a blocking client whose trio run has a thread of its own.

    from broker.client_blocking import connect

    with connect("127.0.0.1:7717", token, device="shop-web") as client:
        result = client.send("Your book is back", to="member-42", cid="hold-991")

`connect` starts one daemon thread, which runs `open_client` under `trio.run` and stays in its
block until `close`. Each method hands its call to that run (`trio.from_thread.run` with the
run's TrioToken) and blocks the calling thread until the answer. The methods are the
`Client`'s own, made here from them (`_blocking`), so they take the same arguments, return the
same results and raise the same exceptions (the exception itself, not a wrapper).

Rules it keeps:
- The `Client`'s code runs in that one trio thread only, as in a trio program: a
  BlockingClient may be shared by any number of threads, whose calls are in flight at once on
  its one connection, as a trio program's tasks' are.
- A calling thread interrupted while it waits (KeyboardInterrupt on Ctrl-C) cancels its call
  in the trio thread, as a trio cancel would, and the exception goes on: a `next_delivery` so
  interrupted takes no delivery that nobody is handed.
- Once `close` was called, or the run ended, every call raises ClientClosed. In a process
  forked after `connect`, which has no copy of the thread, every call raises RuntimeError.
- The callbacks (`on_unreachable`, `on_inbox_reset`) run in the trio thread: a call to the
  BlockingClient from one raises RuntimeError (trio's: it would wait on its own thread).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import trio

import protocol as wire
from broker.client import DEFAULT_SERVER, Client, ClientClosed, open_client

__all__ = ["BlockingClient", "connect"]


class _Call:
    """One call in the trio thread, as its calling thread sees it: whether it is over, and its
    cancel scope, for the calling thread to cancel it when it stops waiting."""

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.cancelled = False  # asked before the scope existed: the call cancels itself
        self.over = False

    def cancel(self) -> None:  # in the trio thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


async def _in_scope(call: _Call, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)`, awaited if it is a coroutine, in a scope `call` may cancel."""
    try:
        with trio.CancelScope() as call.scope:
            if call.cancelled:
                call.scope.cancel()
            result = fn(*args, **kwargs)
            return await result if hasattr(result, "__await__") else result
    finally:
        call.over = True


async def _next_delivery(client: Client, timeout: float | None) -> wire.Deliver | None:
    """The next delivery, or None when none came within `timeout` s (a receive cancelled by
    its timeout takes none: trio's channels promise it)."""
    with trio.move_on_after(math.inf if timeout is None else timeout):
        return await client.deliveries().receive()
    return None


def _blocking(method: Callable[..., Any]) -> Callable[..., Any]:
    """The BlockingClient method that runs `Client.<method>` in the client's trio thread and
    waits for it; `functools.wraps` gives it the method's name, docstring and signature (its
    `__wrapped__`), which help() and `inspect.signature` show."""

    @functools.wraps(method)
    def call(self: BlockingClient, *args: Any, **kwargs: Any) -> Any:
        return self._run(method, self._client, *args, **kwargs)

    # Named as what it is (a repr, a traceback), not as the Client's coroutine function.
    call.__module__, call.__qualname__ = __name__, f"BlockingClient.{method.__name__}"
    return call


def _state(name: str) -> property:
    """The `Client`'s attribute `name`, read-only, as it is now: the trio thread alone
    changes it, by replacing it whole, so any thread may read it."""
    return property(lambda self: getattr(self._client, name),
                    doc=f"The Client's `{name}` (docs/CLIENT.md).")


class BlockingClient:
    """One device's connection to the broker, for code that blocks; build it with `connect`.

    Safe to share between threads. Its methods are `Client`'s (docs/CLIENT.md, "Methods"),
    but `deliveries()`, an iterator that blocks, and `next_delivery(timeout)`; `close()` ends
    it (and leaving `with`)."""

    def __init__(self) -> None:
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # set while the run takes calls
        self._scope: trio.CancelScope | None = None  # the open_client block's
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()  # the process whose thread runs the client (not a fork's)
        self._error: BaseException | None = None  # what ended the run, for `close` to raise
        self._lock = threading.Lock()

    # -- the thread ---------------------------------------------------------------------------

    def _start(self, server: str, token: str, device: str, options: dict[str, Any]) -> None:
        """Start the trio thread and wait until the client is connected; raise, in this
        thread, what `open_client` raised (ClientError, ConnectionLost, ValueError, ...)."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(server, token, device, options, ready),
            name=f"homing-client-{device}", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._stop()  # a Ctrl-C while connecting, or the connect failed: the run ends
            self._thread.join()
            raise

    def _serve(self, server: str, token: str, device: str, options: dict[str, Any],
               ready: Future[None]) -> None:
        """The thread's body: the trio run, and what it ended with."""
        try:
            trio.run(self._open, server, token, device, options, ready)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                self._error = exc
        finally:
            self._token = None
            if not ready.done():  # cancelled while connecting (a Ctrl-C in `connect`)
                ready.set_exception(ClientClosed("the client was closed while connecting"))

    async def _open(self, server: str, token: str, device: str, options: dict[str, Any],
                    ready: Future[None]) -> None:
        """Hold `open_client`'s block open until `close` cancels it (its `finally` says bye)."""
        with trio.CancelScope() as self._scope:
            self._token = trio.lowlevel.current_trio_token()
            if self._closed:  # `_stop` ran before the token was set, and did not see it
                self._scope.cancel()
            async with open_client(server, token, device, **options) as client:
                self._client = client
                ready.set_result(None)
                await trio.sleep_forever()

    def _stop(self) -> None:
        """Make every later call raise ClientClosed, and end the run (it says bye first)."""
        self._closed = True
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._scope.cancel)
            except trio.RunFinishedError:
                pass

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` run in the trio thread; its result, or its exception raised
        here as itself. A call made once the client is closing, or cut short by the end of the
        run, raises ClientClosed."""
        token = self._token
        if self._closed or token is None:
            raise ClientClosed("the client is closed")
        self._check_process()
        call = _Call()
        try:
            return trio.from_thread.run(_in_scope, call, fn, args, kwargs, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise ClientClosed("the client is closed") from None
        except BaseException:
            if not call.over:  # this thread stopped waiting (Ctrl-C): so does the call
                try:
                    token.run_sync_soon(call.cancel)
                except trio.RunFinishedError:
                    pass
            raise

    def _check_process(self) -> None:
        """RuntimeError in a process forked from the one that connected: the fork has no copy
        of the client's thread, so a call would wait for ever (a pre-fork server's workers)."""
        if os.getpid() != self._pid:
            raise RuntimeError(f"this client was connected in process {self._pid}, before a "
                               f"fork: connect in this process (gunicorn's post_fork hook, or "
                               f"at first use)")

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client (it says bye to the broker, for up to 1 s) and end its thread;
        calls still waiting, and any made later, raise ClientClosed, and a `deliveries()`
        loop ends. Idempotent, from any thread. Raises, once, what ended the client's run
        otherwise, as leaving `open_client` does (an `on_inbox_reset` that raised). In a
        forked process, a no-op: the client and its thread are the parent's."""
        if os.getpid() != self._pid:
            return
        self._stop()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- incoming -----------------------------------------------------------------------------

    def next_delivery(self, timeout: float | None = None) -> wire.Deliver | None:
        """The next delivery, in inbox order, each once per process; None if none came within
        `timeout` seconds (None: wait for one), so a loop can do other work between. Raises
        ClientClosed once the client is closed and the deliveries it received are taken, and
        what stopped the client once it gave up (ConnectionLost, Replaced, ClientError)."""
        try:
            return self._run(_next_delivery, self._client, timeout)
        except trio.EndOfChannel:
            raise ClientClosed("the client is closed") from None

    def deliveries(self) -> Iterator[wire.Deliver]:
        """The deliveries, in inbox order, each once per process, as an iterator that blocks
        until the next comes; ack them with `ack` or `done`. It ends when the client is closed
        (by another thread, say), and raises what stopped the client once it gave up. Several
        threads may iterate at once: each delivery goes to one of them. ClientError "invalid"
        on a requests-only client (`deliver=False`), ClientClosed on a closed one."""
        self._run(self._client.deliveries)
        return self._iterate()

    def _iterate(self) -> Iterator[wire.Deliver]:
        while True:
            try:
                yield self.next_delivery()
            except ClientClosed:
                return

    # -- the Client's requests, each as it is there -----------------------------------------

    send = _blocking(Client.send)
    ack = _blocking(Client.ack)
    done = _blocking(Client.done)
    read = _blocking(Client.read)
    history = _blocking(Client.history)
    receipts = _blocking(Client.receipts)
    create = _blocking(Client.create)
    create_group = _blocking(Client.create_group)
    create_channel = _blocking(Client.create_channel)
    invite = _blocking(Client.invite)
    set_role = _blocking(Client.set_role)
    join = _blocking(Client.join)
    leave = _blocking(Client.leave)
    remove = _blocking(Client.remove)
    subscribe = _blocking(Client.subscribe)
    mute = _blocking(Client.mute)
    revoke_tokens = _blocking(Client.revoke_tokens)
    members = _blocking(Client.members)
    conversations = _blocking(Client.conversations)
    presence = _blocking(Client.presence)
    typing = _blocking(Client.typing)
    ping = _blocking(Client.ping)
    stats = _blocking(Client.stats)
    next_push = _blocking(Client.next_push)
    receipts_pushed = _blocking(Client.receipts_pushed)

    # -- the Client's state, read as it is now ------------------------------------------------

    welcome = _state("welcome")  # the broker's last welcome (docs/CLIENT.md, "Connecting")
    user = _state("user")
    device = _state("device")
    reconnects = _state("reconnects")  # sessions opened after the first
    inbox_resets = _state("inbox_resets")  # times the inbox went back (a restore)


def connect(server: str = DEFAULT_SERVER, token: str = "", device: str = "cli",
            **options: Any) -> BlockingClient:
    """Connect and return a BlockingClient (a context manager: leaving `with` closes it).

    `options` are `open_client`'s keyword arguments (tls, reconnect, reconnect_timeout,
    max_pushes, on_unreachable, on_inbox_reset, start, deliver), with the same meaning; the
    callbacks run in the client's trio thread. Raises here what `open_client` raises: ClientError
    for a session refused for good (`unauthorized`), ConnectionLost once the broker was not
    reached within `reconnect_timeout`, ValueError for a `server` that is not HOST:PORT."""
    client = BlockingClient()
    client._start(server, token, device, options)
    return client
