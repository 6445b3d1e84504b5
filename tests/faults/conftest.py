"""Fault-suite fixtures: brokers as child processes or in-process, raw wire clients, and a tally.

Every child process started here is killed in a `finally`. Each test records which faults it
injected and how often (`tally.add(name, n)`); at the end of the run the tally and each test's
outcome are written as JSON to $HOMING_FAULT_SUMMARY (default: <tmp>/homing-fault-summary.json),
the source of the table in docs/OPERATIONS.md (tests/fault_tally.py).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import defaultdict
from pathlib import Path

import pytest
import trio

import protocol as wire
from tests.harness import running_broker
from tests.procs import BrokerProcess

LONG_SCALE = float(os.environ.get("HOMING_LONG_SCALE", "1.0"))


def scaled(n: int, minimum: int = 1) -> int:
    """`n` scaled by HOMING_LONG_SCALE (for long variants)."""
    return max(minimum, int(n * LONG_SCALE))


class Tally:
    """What one test tried: fault name -> how many times."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, fault: str, n: int = 1) -> None:
        self.counts[fault] += n


@pytest.fixture
def tally(request):
    """What the test tried, tallied by tests/fault_tally.py (the plugin tests/conftest.py loads)
    into $HOMING_FAULT_SUMMARY."""
    t = Tally(request.node.nodeid)
    request.node._fault_tally = t
    return t


@pytest.fixture
def broker_process(tmp_path):
    """A factory of child brokers; all killed at the end of the test."""
    made: list[BrokerProcess] = []

    def make(*flags: str, data: Path | None = None, start: bool = True,
             **kw) -> BrokerProcess:
        bp = BrokerProcess(data or tmp_path / f"data{len(made)}", *flags, **kw)
        made.append(bp)
        if start:
            bp.start()
        return bp

    try:
        yield make
    finally:
        for bp in made:
            bp.kill()


# -- in-process broker ---------------------------------------------------------------------------

@pytest.fixture
async def harness(tmp_path):
    async with running_broker(tmp_path / "data") as h:
        yield h


# -- a raw wire client ---------------------------------------------------------------------------

class PlayedBroker:
    """The broker's side of one accepted connection, on the real protocol connection: for a
    test that plays a broker of another version, or in a state a real one is seldom caught in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = wire.Connection(wire.Role.SERVER)

    async def next_frame(self):
        """The client's next frame, or wire.CLOSED."""
        while (event := self.conn.next_event()) is wire.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def send(self, *frames) -> None:
        await self.stream.send_all(b"".join(self.conn.send(f) for f in frames))


class RawClient:
    """A minimal protocol client over a trio stream, for tests that misbehave on purpose."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = wire.Connection(wire.Role.CLIENT)
        self.welcome: wire.Welcome | None = None

    @classmethod
    async def connect(cls, server: str, token: str | None = None, device: str = "raw",
                      ssl_context=None, max_frame: int | None = None) -> RawClient:
        host, port = server.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
        c = cls(stream)
        if token is not None:
            await c.hello(token, device, max_frame)
        return c

    async def hello(self, token: str, device: str = "raw",
                    max_frame: int | None = None, **fields) -> wire.Welcome:
        """`fields`: the hello's other fields (`start`, `deliver`)."""
        await self.send(wire.Hello(versions=(1,), token=token, device=device, id=0,
                                   max_frame=max_frame, **fields))
        frame = await self.next()
        if not isinstance(frame, wire.Welcome):
            raise AssertionError(f"expected welcome, got {frame!r}")
        self.welcome = frame
        self.conn.max_frame_bytes = frame.max_frame
        return frame

    async def send(self, frame) -> None:
        await self.stream.send_all(self.conn.send(frame))

    async def next(self):
        """The next frame, or None at EOF (or reset)."""
        while True:
            event = self.conn.next_event()
            if event is wire.CLOSED:
                return None
            if event is not wire.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)

    async def reply(self, request_id: int):
        """The next frame carrying `request_id` (pushes in between are skipped)."""
        while True:
            frame = await self.next()
            if frame is None:
                raise AssertionError("connection closed before the reply")
            if getattr(frame, "id", None) == request_id:
                return frame

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def replies(c: RawClient, ids) -> dict:
    """{id: reply frame} for every id in `ids` (pushes in between are skipped)."""
    want, out = set(ids), {}
    while want:
        f = await c.next()
        assert f is not None, f"closed with {len(want)} replies missing"
        if getattr(f, "id", None) in want:
            out[f.id] = f
            want.discard(f.id)
    return out


async def raw_bytes_exchange(server: str, data: bytes, *, read_s: float = 2.0) -> bytes:
    """Send `data` on a fresh connection and return what comes back until EOF or `read_s`."""
    host, port = server.rsplit(":", 1)
    got = bytearray()
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            return bytes(got)
        with trio.move_on_after(read_s):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                got += chunk
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(got)


def rst_close(stream: trio.SocketStream) -> None:
    """Close a socket with RST (SO_LINGER 0): a client vanishing without bye or FIN."""
    import struct

    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def mounts_allowed() -> bool:
    return shutil.which("mount") is not None and os.geteuid() == 0


def tls_pair(tmp_path):
    """A trustme CA, and a certificate and key for 127.0.0.1 written to tmp_path."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, cert_path, key_path
