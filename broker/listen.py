"""The broker's listening sockets, bound before anything else is done.

`homing serve` binds its address first, before it makes or opens the data directory, so that a
port already taken (or not ours to bind) fails the start having created nothing; it listens
only once the store is open, so a connection made while the projections rebuild is refused
(and retried by clients) rather than left unanswered in the backlog. The sockets are made as
`trio.open_tcp_listeners` makes them: one per address the host resolves to, SO_REUSEADDR,
IPv6 sockets IPv6-only.

`Listener` answers a connection the broker has no file descriptor for (its open-file limit,
or the system's, reached: `accept` fails with EMFILE or ENFILE) with a closing
`limit_exceeded`, through a descriptor it keeps in reserve, instead of leaving it in the
backlog unanswered while trio logs a traceback every 100 ms (docs/OPERATIONS.md, "Limits");
the other failures of `accept` for want of something (ENOMEM, ENOBUFS, descriptors with none in
reserve) are told to the broker (`accept_failed`) and tried again 100 ms later, as trio's loop
would, without its traceback.
It also takes the connections waiting in the backlog at each turn of the accept loop, as many
as the broker has room for (`room`) up to ACCEPT_BURST, where trio's takes one a turn: behind
thousands of devices reconnecting after a restart, each turn a round of every busy session, a
monitor's connection waited in the backlog for as many rounds as connections came before it
(docs/OPERATIONS.md, "A restart with thousands of devices online"). With no room it looks
again every ROOM_POLL_S, and tells the broker (`on_crowded`) that connections wait meanwhile,
so that it gives up the places held past handshake.CHECK_CROWDED_S.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections import deque
from collections.abc import Callable

import trio

BACKLOG = 0xFFFF  # as trio's default: the kernel caps it at net.core.somaxconn
ROOM_POLL_S = 0.005  # how often a listener with no room looks again (`Listener.accept`)
# The most connections taken from the backlog at one turn of the accept loop (`Listener`): each
# costs about 25 us to accept and start, so a full burst holds the event loop about 6 ms, and
# the connections queued behind a crowd are all taken within a few turns.
ACCEPT_BURST = 256


def bind(host: str | None, port: int) -> list[socket.socket]:
    """Sockets bound to `port` on each address of `host` (None: every interface), not yet
    listening; OSError (socket.gaierror for a host that does not resolve) if one cannot be."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    unsupported: list[OSError] = []
    try:
        for family, type_, proto, _, address in addresses:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except BaseException:
                sock.close()
                raise
            bound.append(sock)
    except BaseException:
        close(bound)
        raise
    if not bound:
        raise OSError(errno.EAFNOSUPPORT, f"no socket can be made for {host}") from (
            unsupported[0] if unsupported else None)
    return bound


def listen(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Start listening on `sockets` (from `bind`), as trio listeners owning them."""
    listeners = []
    for sock in sockets:
        sock.listen(BACKLOG)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
# What `accept` fails with when the system is short of something (trio's own list): tried
# again after ACCEPT_RETRY_S, as trio's loop would, but told to the broker (`on_failed`)
# instead of trio's logger, where each was a traceback.
ACCEPT_SHORT = (*OUT_OF_FILES, errno.ENOMEM, errno.ENOBUFS)
ACCEPT_RETRY_S = 0.1


class Listener(trio.abc.Listener[trio.SocketStream]):
    """A trio SocketListener (trio does not let us subclass it) that refuses, rather than
    leaves waiting, the connections it has no file descriptor for. It holds one descriptor in
    reserve (`/dev/null`); when `accept` fails for want of descriptors, it gives that one up,
    accepts the connection waiting, writes `refusal` to it (a closing `limit_exceeded`; None
    on a TLS port, whose clients expect TLS: the connection is closed without a word), reads
    what the client sent already (so that the close is a FIN, not a reset that could drop the
    refusal in transit), closes it and takes the reserve again. `on_refused()` is called for
    each (counted and logged by the broker). It refuses only a connection that is waiting
    while descriptors are still lacking: a failed `accept` with an empty backlog waits for
    the next connection with the reserve kept, so that one is welcomed if sessions closed
    meanwhile. Without a reserve (it could not be had, or not taken back yet: it is tried
    again at each `accept`), and when `accept` fails for want of memory (ENOMEM, ENOBUFS),
    `on_failed(error)` is called and `accept` tried again ACCEPT_RETRY_S later; until
    2026-12-07 those errors went to trio's loop, which logged a traceback through the
    standard library at each of its retries, every 100 ms."""

    def __init__(self, listener: trio.SocketListener, refusal: bytes | None,
                 on_refused: Callable[[], None],
                 on_failed: Callable[[OSError], None] = lambda exc: None,
                 room: Callable[[], int] = lambda: 1,
                 on_taken: Callable[[], None] = lambda: None,
                 on_crowded: Callable[[], None] = lambda: None) -> None:
        self._inner = listener
        self.socket = listener.socket
        self._refusal = refusal
        self._on_refused = on_refused
        self._on_failed = on_failed
        self._room = room  # connections the broker takes now (`_take_waiting`)
        self._on_taken = on_taken  # called for each connection handed out, before its task
        self._on_crowded = on_crowded  # no room, and connections wait in the backlog
        self._spare = _reserve()
        # Connections taken from the backlog with the last one accepted (`_take_waiting`),
        # handed out by the next calls without a turn of the event loop each.
        self._taken: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._taken:
            self._on_taken()
            return self._taken.popleft()
        while self._room() <= 0:  # the connections wait in the backlog meanwhile
            if _backlog_waiting(self.socket):  # the broker may give them room
                self._on_crowded()
            await trio.sleep(ROOM_POLL_S)
        waiting = False  # a connection is known to wait in the backlog
        while True:
            if self._spare is None:  # not had, or not taken back: descriptors may be free now
                self._spare = _reserve()
            try:
                stream = await self._inner.accept()
                self._take_waiting()
                self._on_taken()
                return stream
            except OSError as exc:
                if exc.errno not in ACCEPT_SHORT:
                    raise
                if exc.errno not in OUT_OF_FILES or self._spare is None:
                    self._on_failed(exc)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
            # Linux fails `accept` for want of a descriptor before it looks at the backlog, so
            # the failure says nothing of a connection waiting: wait for one, and try again
            # (descriptors may be free by then) before refusing it.
            if waiting:
                await self._refuse_one()
                waiting = False
            else:
                await trio.lowlevel.wait_readable(self.socket)
                waiting = True

    def _take_waiting(self) -> None:
        """Accept, without waiting, the connections already in the backlog, as many as the
        broker has room for (`room()`, the one just accepted included; ACCEPT_BURST at most):
        the others wait there, unrefused, as they did. trio's accept is a turn of the event
        loop for each, so with every session busy (a crowd catching up after a restart) the
        backlog drained one connection a round of them all. Any error (none waiting, no
        descriptor left) ends the burst; the next `accept` meets it as ever. Uses the stdlib
        socket under trio's (its private layout, 0.35): without it, one a turn as before."""
        raw = getattr(self.socket, "_sock", None)
        if not isinstance(raw, socket.socket):
            return
        more = min(ACCEPT_BURST, self._room()) - 1
        while len(self._taken) < more:
            try:
                sock, _ = raw.accept()
            except OSError:  # BlockingIOError: none waiting; EMFILE: `accept` says so next
                return
            self._taken.append(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def _refuse_one(self) -> None:
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = await self.socket.accept()
        except OSError:
            sock = None
        try:
            if sock is not None:
                with sock:
                    fd = sock.fileno()
                    try:
                        if self._refusal is not None:
                            os.write(fd, self._refusal)
                        while os.read(fd, 65536):
                            pass
                    except OSError:  # BlockingIOError once read, or the peer gone
                        pass
                    self._on_refused()
        finally:
            self._spare = _reserve()

    async def aclose(self) -> None:
        while self._taken:  # taken from the backlog, never handed to a connection's task
            self._taken.popleft().socket.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        await self._inner.aclose()


def _backlog_waiting(sock: trio.socket.SocketType) -> bool:
    """Whether a connection waits in `sock`'s listen backlog (it is readable), at once."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def close(sockets: list[socket.socket]) -> None:
    """Close sockets that never got to listen."""
    for sock in sockets:
        sock.close()
