"""broker/listen.py's `Listener` in this process, on real sockets, at a real open-file limit
(lowered for the test and put back): what it does when it has no descriptor in reserve."""

from __future__ import annotations

import os
import resource
import socket

import trio

from broker import listen


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
