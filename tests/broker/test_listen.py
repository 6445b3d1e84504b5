"""broker/listen.py's `Listener` in this process, on real sockets, at a real open-file limit
(lowered for the test and put back): what it does when it has no descriptor in reserve."""

from __future__ import annotations

import os
import resource
import socket

import trio

import protocol as wire
from broker import listen
from tests.faults.conftest import RawClient
from tests.harness import running_broker


def _fill() -> list[int]:
    """Every descriptor the open-file limit leaves, taken (on /dev/null)."""
    taken: list[int] = []
    while True:
        try:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return taken


def _release(taken: list[int]) -> None:
    while taken:
        os.close(taken.pop())


async def test_a_reserve_not_had_at_the_start_is_taken_once_descriptors_are_free():
    """A Listener made while no descriptor was free (so without its reserve) takes one at an
    `accept` once descriptors are free, and refuses the next connection past the limit
    rather than leave it to trio's 100 ms retries. (Found in review: a reserve once lost, at
    the start or not taken back after a refusal, was never tried again: every connection past
    the limit from then on waited in the backlog while trio logged a traceback every 100 ms.)"""
    [inner] = listen.listen(listen.bind("127.0.0.1", 0))
    port = inner.socket.getsockname()[1]
    refused: list[int] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    taken: list[int] = []
    clients: list[socket.socket] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, hard))
        taken = _fill()
        listener = listen.Listener(inner, b"refused", lambda: refused.append(1))
        assert listener._spare is None  # made with no descriptor free
        _release(taken)
        with trio.fail_after(5):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            stream = await listener.accept()  # a welcome one: the reserve is taken meanwhile
            taken = _fill()
            os.close(taken.pop())  # one free descriptor, for the client past the limit
            late = socket.create_connection(("127.0.0.1", port))
            clients.append(late)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listener.accept)
                while not refused:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            late.settimeout(5)
            assert late.recv(100) == b"refused"
            assert late.recv(100) == b""  # closed
        await stream.aclose()
        await listener.aclose()
    finally:
        _release(taken)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.close()


async def test_accept_failing_for_want_of_descriptors_is_a_warning_of_ours(tmp_path, caplog):
    """A broker whose `accept` fails with EMFILE and no descriptor in reserve (its open-file
    limit lowered below the descriptors it holds, so the reserve, once given up for a refusal,
    cannot be taken back) logs `accept_failed` (a structlog warning with errno and a count,
    once per 10 s), counts it for `stats`, and tries again every 100 ms; once descriptors are
    free it welcomes the connection that waited. Until 2026-12-07 trio's loop logged a
    traceback through the standard library ("trio.serve_listeners") every 100 ms. ENOMEM and
    ENOBUFS, which no test can provoke at will, take the same path (listen.ACCEPT_SHORT)."""
    async with running_broker(tmp_path / "data") as h:
        port = h.broker.port
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        client = socket.socket()  # its descriptor taken before the limit is lowered
        client.setblocking(False)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # below every socket's
            try:
                client.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            with trio.fail_after(10):
                while h.broker.accept_failures.total < 3:  # a retry each 100 ms
                    await trio.sleep(0.05)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        [said] = [e for e in h.logs if e.get("event") == "accept_failed"]
        assert said["log_level"] == "warning" and said["errno"] == "EMFILE", said
        assert said["failed"] == 1 and said["retry_s"] == listen.ACCEPT_RETRY_S, said
        assert not [r for r in caplog.records if r.name.startswith("trio")], caplog.records
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
        c = RawClient(stream)
        with trio.fail_after(10):
            welcome = await c.hello(h.token("alice"))
            await c.aclose()
        assert isinstance(welcome, wire.Welcome)
        async with h.client("ops", role="monitor", deliver=False) as ops:
            assert (await ops.stats()).accept_failed >= 3
