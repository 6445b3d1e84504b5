"""A TCP proxy with known delays, for checking the latency benchmark against a known truth.

`DelayProxy(target, delay_s)` listens on a free loopback port in a thread of its own (a trio
loop) and forwards each connection to `target` ("host:port"), every chunk `delay_s` after it was
read, in each direction, in order. `stall_after(connections, after_s, stall_s)` holds all traffic
once: `after_s` after the `connections`-th connection was accepted, for `stall_s`, everything
due to be forwarded meanwhile waits for the end of the stall (as a network that stops, then
resumes). `stalled` is the stall's (start, end) in trio's clock once it was armed; `late`, for
each chunk, how long after it was due the proxy began to forward it (its own timer's lateness).
"""

from __future__ import annotations

import math

import trio

from tests.trio_thread import TrioThread, serve_loopback

CHUNK = 1 << 16


class DelayProxy:
    def __init__(self, target: str, delay_s: float) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.delay_s = delay_s
        self.port = 0
        self.accepted = 0
        self.forwarded = 0  # chunks
        self.late: list[float] = []  # per chunk: s between when it was due and when it went out
        self.stalled: tuple[float, float] | None = None
        self._stall_plan: tuple[int, float, float] | None = None
        self._loop = TrioThread(self._listen, "delay proxy")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stall_after(self, connections: int, after_s: float, stall_s: float) -> None:
        """Stall every direction of every connection for `stall_s`, once, `after_s` after the
        `connections`-th connection was accepted (call before the load connects)."""
        self._stall_plan = (connections, after_s, stall_s)

    def __enter__(self) -> DelayProxy:
        self._loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.stop()

    async def _listen(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve_loopback(self, self._serve, task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        plan = self._stall_plan
        if plan is not None and self.accepted == plan[0] and self.stalled is None:
            start = trio.current_time() + plan[1]
            self.stalled = (start, start + plan[2])
        async with client, await trio.open_tcp_stream(*self.target) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._direction, client, server)
                nursery.start_soon(self._direction, server, client)

    def _release_at(self, due: float) -> float:
        """When a chunk due at `due` goes out: at `due`, or at the end of the stall it is in."""
        if self.stalled is not None and self.stalled[0] <= due < self.stalled[1]:
            return self.stalled[1]
        return due

    async def _direction(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def read() -> None:
            async with send:
                while data := await _receive(src):
                    try:
                        await send.send((trio.current_time(), data))
                    except trio.BrokenResourceError:  # the other side is gone
                        return

        async def write() -> None:
            async with receive:
                async for at, data in receive:
                    due = self._release_at(at + self.delay_s)
                    # the stall may be armed or begin while this chunk waits for its time
                    while (later := self._release_at(due)) != due or trio.current_time() < due:
                        due = later
                        await trio.sleep_until(due)
                    self.late.append(trio.current_time() - due)
                    try:
                        await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    self.forwarded += 1
            try:
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(CHUNK)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""
