"""A TCP proxy that misbehaves on command, as the networks between a service and the broker do.

`open_fault_proxy(target)` (in the test's trio run) or `ThreadedFaultProxy(target)` (a trio loop
in a thread of its own, for a blocking client) listens on a free loopback port and forwards each
connection to `target` ("host:port"), byte for byte, until told otherwise:

- `stall(direction, new=True)`: stop forwarding "up" (client to broker), "down" or "both",
  without closing anything: the proxy stops reading, so the bytes wait in the kernel's buffers
  and the sender's writes block once they are full, as on a path that drops every packet, no
  FIN, no RST. Connections accepted meanwhile are stalled too (a path down), or with
  `new=False` forwarded (a NAT box that forgot the connections it had). `resume()` forwards
  again what was held, in order.
- `cut_after(nbytes, direction, reset=False)`: each connection open now forwards `nbytes` more
  in `direction`, then both its sides are closed (FIN; RST with `reset`): a balancer cutting a
  connection mid-frame. Connections opened later are not cut.
- `reset()`: every connection open now is closed with RST on both sides (SO_LINGER 0).
- `trickle(nbytes, every_s)`: forward at most `nbytes` per `every_s` in each direction;
  `trickle(None)` ends it.

`accepted` counts connections; `forwarded[direction]` bytes forwarded; `open` the connections
being forwarded. Nothing here is timed against a deadline: tests wait on these by polling.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from tests.trio_thread import TrioThread, serve_loopback

CHUNK = 1 << 16
DIRECTIONS = ("up", "down")


class _Pipe:
    """One proxied connection: the client's side, the broker's side, what is left to forward
    before a cut."""

    def __init__(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        self.client, self.server = client, server
        self.budget: dict[str, int | None] = {"up": None, "down": None}
        self.flowing = {d: _set_event() for d in DIRECTIONS}
        self.reset_on_cut = False
        self.scope = trio.CancelScope()

    def close(self, reset: bool) -> None:
        if reset:
            for stream in (self.client, self.server):
                try:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
                except OSError:
                    pass
        self.scope.cancel()  # `_serve` closes both sides on its way out


class FaultProxy:
    """The proxy's state and its commands; see the module. Commands are plain calls made from
    the trio run the proxy serves in."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = 0
        self.accepted = 0
        self.forwarded = {"up": 0, "down": 0}
        self.open: set[_Pipe] = set()
        self._stalled_new: tuple[str, ...] = ()  # the directions new connections start held
        self._trickle: tuple[int, float] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stall(self, direction: str = "both", *, new: bool = True) -> None:
        held = _directions(direction)
        for pipe in self.open:
            _hold(pipe, held)
        if new:
            self._stalled_new = held

    def resume(self) -> None:
        self._stalled_new = ()
        for pipe in self.open:
            for d in DIRECTIONS:
                pipe.flowing[d].set()

    def cut_after(self, nbytes: int, direction: str, *, reset: bool = False) -> None:
        for pipe in self.open:
            pipe.budget[direction] = nbytes
            pipe.reset_on_cut = reset
            if nbytes == 0:
                pipe.close(reset)

    def reset(self) -> None:
        for pipe in list(self.open):
            pipe.close(reset=True)

    def trickle(self, nbytes: int | None, every_s: float = 0.01) -> None:
        self._trickle = None if nbytes is None else (nbytes, every_s)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve_loopback(self, self._serve, task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        pipe = _Pipe(client, server)
        _hold(pipe, self._stalled_new)
        self.open.add(pipe)
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, pipe, "up", client, server)
                    nursery.start_soon(self._pump, pipe, "down", server, client)
        finally:
            self.open.discard(pipe)
            for stream in (client, server):
                await trio.aclose_forcefully(stream)

    async def _pump(self, pipe: _Pipe, direction: str, src: trio.SocketStream,
                    dst: trio.SocketStream) -> None:
        while True:
            await pipe.flowing[direction].wait()  # a stall: read nothing, the kernel holds it
            size = CHUNK if self._trickle is None else self._trickle[0]
            try:
                data = await src.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            await pipe.flowing[direction].wait()  # stalled while that read waited: hold it
            if (budget := pipe.budget[direction]) is not None:
                data = data[:budget]  # cut while that read waited: forward no more than asked
            if not data:
                try:
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                return
            try:
                await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pipe.close(reset=False)
                return
            self.forwarded[direction] += len(data)
            if budget is not None:
                pipe.budget[direction] = budget - len(data)
                if budget == len(data):
                    pipe.close(pipe.reset_on_cut)
                    return
            if self._trickle is not None:
                await trio.sleep(self._trickle[1])


def _hold(pipe: _Pipe, directions: tuple[str, ...]) -> None:
    for d in directions:
        if pipe.flowing[d].is_set():
            pipe.flowing[d] = trio.Event()


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


def _directions(direction: str) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction is up, down or both, not {direction!r}")
    return (direction,)


@asynccontextmanager
async def open_fault_proxy(target: str) -> AsyncIterator[FaultProxy]:
    """A FaultProxy to `target` serving in the caller's trio run while the block runs."""
    proxy = FaultProxy(target)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


class ThreadedFaultProxy:
    """A FaultProxy in a thread of its own (a trio loop), for tests in plain threads: each
    command is run in the proxy's loop."""

    def __init__(self, target: str) -> None:
        self.proxy = FaultProxy(target)
        self._loop = TrioThread(self.proxy.serve, "fault proxy")

    @property
    def address(self) -> str:
        return self.proxy.address

    def __getattr__(self, name: str):
        attr = getattr(self.proxy, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._loop.run_sync(lambda: attr(*a, **kw))

    def __enter__(self) -> ThreadedFaultProxy:
        self._loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.stop()
