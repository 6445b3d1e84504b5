"""Streams the SDK is given in place of its TCP stream, for faults injected below it and for
counting what it writes (tests monkeypatch `trio.open_tcp_stream` to wrap the real one)."""

from __future__ import annotations

import trio


class WrappedStream(trio.abc.Stream):
    """A stream that passes everything to `inner`; subclasses change what they need."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class ResetAfterWelcome(WrappedStream):
    """A TCP stream whose second write (the reconnect's resend, right after welcome) fails as
    a reset would, once (while `armed`): a network fault, injected below the SDK."""

    armed = False

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.writes = 0

    async def send_all(self, data) -> None:
        self.writes += 1
        if self.writes == 2 and ResetAfterWelcome.armed:
            ResetAfterWelcome.armed = False
            await self.inner.aclose()
            raise trio.BrokenResourceError("reset right after welcome")
        await self.inner.send_all(data)
