"""The client SDK's plumbing for one connection's stream: opening it (TCP, TLS, the hello and
the welcome within a time bound), telling a failed attempt worth retrying from one that never
will succeed, reading frames, and writing a resend while reading what the broker sends.

Split from broker/client.py (2026-12-06): these are the steps that touch a socket and hold no
state between connections; the link (broker/client_link.py) decides when to connect, owns the
connection once it is open, and keeps what outlives it (the requests in flight, the cursor).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

import protocol as wire
from broker.client_errors import (
    _NO_SUCH_NAME,
    _NOT_TLS_REASONS,
    ClientError,
    ConnectionLost,
    NotTls,
    NotTrusted,
    UnknownHost,
)

RECEIVE_BYTES = 65536  # the most one read of the connection takes
# A piece of a write (WRITE_PIECE_BYTES at most) not taken within WRITE_STALL_S plus its time
# at SLOWEST_LINK_BPS (the broker stopped reading, the path drops everything) drops the
# connection (`send_steadily`).
WRITE_STALL_S = 10.0
SLOWEST_LINK_BPS = 512 * 1024
WRITE_PIECE_BYTES = 64 * 1024


async def open_session(host: str, port: int, tls: ssl.SSLContext | None,
                       conn: wire.Connection, hello: bytes,
                       limit: float) -> tuple[trio.abc.Stream, wire.Welcome]:
    """Open a connection to `host:port` (in TLS with the context `tls`), say `hello` (made by
    `conn`) and read the welcome, within `limit` seconds; the stream and the welcome, with
    `conn` open for the session. The broker's refusal raises ClientError; a broker that does
    not answer in time, or answers with something else, ConnectionLost; a failed connect its
    own error. The stream is closed if it fails."""
    stream: trio.abc.Stream | None = None
    try:
        # A broker that accepts but never answers (stopped with SIGSTOP, a balancer with no
        # backend behind it) must not hold the attempt, and the reconnect timeout, for ever.
        with trio.fail_after(limit):
            stream = await trio.open_tcp_stream(host, port)
            if tls is not None:
                stream = trio.SSLStream(stream, tls, server_hostname=host)
            await stream.send_all(hello)
            try:
                welcome = await next_frame(stream, conn)
            except wire.RemoteProtocolError as exc:
                raise ConnectionLost(f"it does not speak homing's protocol ({exc.message}, "
                                     "before a welcome): is this the broker's port?") from None
        if isinstance(welcome, wire.Error):
            raise ClientError.of(welcome)
        if not isinstance(welcome, wire.Welcome):
            raise ConnectionLost(f"expected welcome, got {type(welcome).__name__}")
    except BaseException as exc:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectionLost(f"no welcome within {limit:g} s") from None
        raise
    # Not welcome.max_body: `send` checks the bodies it may refuse (_check_body); a resend,
    # or a cid of the caller's, may repeat a message accepted under a larger limit.
    conn.max_frame_bytes = welcome.max_frame
    return stream, welcome


def failed_attempt(exc: BaseException, *, first: bool, host: str, port: int) -> BaseException:
    """What to retry after an attempt that failed with `exc`, a stream or protocol error, or
    ConnectionLost. Raises, not to be retried, a broker certificate our TLS context does not
    trust, a broker that does not speak TLS, and on the `first` connection a host name that
    does not exist."""
    cause = exc.__cause__ if str(exc) == "" and exc.__cause__ is not None else exc
    if first and isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME:
        raise UnknownHost(f"cannot reach {host}:{port}: no such host "
                          f"({cause.strerror or cause})") from None
    if isinstance(cause, ssl.SSLCertVerificationError):
        raise NotTrusted(f"TLS: the broker's certificate is not trusted: "
                         f"{cause.verify_message or cause}") from None
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
        raise NotTls(f"TLS: {host}:{port} did not answer in TLS ({cause.reason}):"
                     f" it serves plaintext there, so connect without TLS, or start it "
                     f"with --tls-cert and --tls-key") from None
    return _attempt_error(cause)


def _attempt_error(exc: BaseException) -> BaseException:
    """What to say of a failed attempt. trio's stream errors say nothing themselves (their cause
    does), and its `all attempts to connect to H:P failed` keeps what failed (connection
    refused, no route to host) in its cause's group: say those."""
    group = exc.__cause__
    if isinstance(exc, OSError) and isinstance(group, BaseExceptionGroup):
        reasons = dict.fromkeys(os.strerror(e.errno) if e.errno else str(e)
                                for e in group.exceptions if isinstance(e, OSError))
        if reasons:
            return OSError("; ".join(reasons))
    return exc


async def send_steadily(stream: trio.abc.Stream, data: bytes) -> bool:
    """Write `data` in pieces of WRITE_PIECE_BYTES, each within WRITE_STALL_S plus its time at
    SLOWEST_LINK_BPS; False, the rest unwritten, at the first piece not taken in time.

    What the bound is for is a write that makes no progress (a broker that stopped reading, a
    path that drops everything). Until 2026-12-06 it bounded the whole write: over a live link
    slower than SLOWEST_LINK_BPS a frame bigger than the socket buffers was dropped mid-way,
    and written again on the next connection to meet the same bound, for ever."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_PIECE_BYTES):
        piece = view[start:start + WRITE_PIECE_BYTES]
        with trio.move_on_after(WRITE_STALL_S + len(piece) / SLOWEST_LINK_BPS) as stalled:
            await stream.send_all(piece)
        if stalled.cancelled_caught:
            return False
    return True


async def write_reading(stream: trio.abc.Stream, data: bytes, early: deque[bytes]) -> bool:
    """Write `data` (`send_steadily`: False, the write stalled and stopped), the requests
    resent on a new connection, while reading what the broker sends meanwhile into `early`
    (for the reader, which starts after); whether it was written whole. The broker reads
    at most --max-inflight-requests ahead of the answers it writes: with thousands resent,
    a resend that read nothing until it was written waited for the broker, which waited
    for its answers to be read, until the client gave up. A read that fails stops the
    reading alone: the reader meets the same end of the stream.

    A broker that closes the connection as the resend is written (a bye: replaced; a
    closing error; answers, then EOF) breaks the write: what it sent is read to the end of
    the stream, and the reader hands it over (a replaced client must not reconnect and
    replace the other). Raises the write's error only if the broker sent nothing."""
    broken: OSError | trio.BrokenResourceError | None = None
    taken = True

    async def read() -> None:
        try:
            while chunk := await stream.receive_some(RECEIVE_BYTES):
                early.append(chunk)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        early.append(b"")  # EOF: the reader ends there

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                taken = await send_steadily(stream, data)
            except (OSError, trio.BrokenResourceError) as exc:
                broken = exc  # the read goes on to the end of the stream
            else:
                nursery.cancel_scope.cancel()  # between reads: nothing read is lost
    except BaseExceptionGroup as group:  # the write's own error (`read` raises none)
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0],
                                                         trio.Cancelled):
            raise group.exceptions[0] from None
        raise
    if broken is not None and not early:
        raise broken
    return taken


async def next_frame(stream: trio.abc.Stream, conn: wire.Connection,
                     early: deque[bytes] | None = None,
                     heard: Callable[[], None] | None = None) -> Any:
    """The next frame from `stream` (from the bytes in `early` first, read before), or None at
    EOF. `heard()` is called at each read of the stream: bytes of a frame still coming are a
    sign of life too (a big delivery over a slow link)."""
    while True:
        event = conn.next_event()
        if event is wire.CLOSED:
            return None
        if event is not wire.NEED_DATA:
            return event
        if early:
            data = early.popleft()
        else:
            data = await stream.receive_some(RECEIVE_BYTES)
            if heard is not None:
                heard()
        conn.receive_data(data)
