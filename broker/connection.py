"""One accepted connection, from accept to close, around its session (broker/session.py).

`handle` is the task `Broker.serve` starts for each accepted stream: it wraps it in TLS on a
TLS port, refuses it past --max-handshakes, runs the handshake (broker/handshake.py) and then
the session; and whatever happened, it detaches the session from the broker, lingers for the
peer's EOF where the peer may still be sending, closes the stream, and logs the one
`connection_closed` line the connection has.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog
import trio

import protocol as wire
from broker import handshake
from broker.errors import CloseReason, wire_error
from broker.hellos import address_key
from broker.session import Session
from storage.errors import StorageError

if TYPE_CHECKING:
    from broker.server import Broker

LINGER_S = 1.0  # how long a connection we end waits for the peer's EOF (see _linger)
LINGER_BYTES = 1 << 20  # and how much of what it still sends is read and dropped meanwhile
# Ends where the peer has stopped sending already: nothing to wait for.
# A failed hello past --auth-fail-rate is not waited for either (broker/hellos.py): its
# refusal is all it has to read, and a peer sending garbage still would hold the connection
# up to LINGER_S each time (a client that wrote on after it may get a reset for an answer).
_NO_LINGER = (None, CloseReason.PEER_EOF, CloseReason.PEER_BYE, CloseReason.BROKEN,
              CloseReason.AUTH_THROTTLED)


async def handle(broker: Broker, stream: trio.abc.Stream) -> None:
    """Serve one accepted connection until it ends, and close it."""
    broker.arriving -= 1  # counted by the listener (Broker._room)
    conn_id = next(broker.conn_ids)
    host, peer = _peer_name(stream)
    tls = None
    if broker.tls is not None:  # its first byte is looked at before TLS starts (check_tls)
        stream = tls = trio.SSLStream(stream, broker.tls, server_side=True,
                                      https_compatible=False)
    session = Session(broker, stream, conn_id, peer)
    session.address = address_key(host)  # its failed hellos' count (broker/hellos.py)
    session.tls_unchecked = broker.tls is not None
    attached = False
    past = None
    try:
        if broker.handshaking >= broker.config.max_handshakes:
            past = await handshake.past_limit(broker, session)
            if not (past.check or (past.spoke and _place_for(broker))):
                session.reason = CloseReason.LIMIT
                if (refused := broker.handshakes_full.count(time.monotonic())) is not None:
                    session.log.warning("handshakes_full", handshaking=broker.handshaking,
                                        limit=broker.config.max_handshakes, refused=refused)
                if session.tls_unchecked:  # in TLS if it speaks TLS, as ever (1 s at most)
                    with trio.move_on_after(1):
                        if not await handshake.check_tls(session):
                            return
                await handshake.refuse(session, None, wire.ErrorCode.LIMIT_EXCEEDED,
                                       "too many connections waiting for their hello; "
                                       "retry later")
                return
        broker.handshaking += 1
        try:
            attached = await handshake.run(broker, session, past)
        except StorageError as exc:  # a read of the store failed: say so, and end
            session.reason = CloseReason.STORAGE
            session.log.error("hello_failed", reason=str(exc))
            await handshake.refuse(session, None, *wire_error(exc))
        finally:
            if not session.place_given_up:  # else given up already (`_place_for`)
                broker.handshaking -= 1
        if attached:
            await session.run_open()
    except Exception:
        session.log.exception("connection_failed")
        session.reason = session.reason or CloseReason.BROKEN
    finally:
        session.flush_due_own_ack()
        _detach(broker, session)  # attached or not: the hub knows whether it holds it
        session.ended()  # before the close: its fd number may be reused at once
        said_nothing = session.tls_unchecked  # a TLS port and not a byte from the peer
        if said_nothing:  # TLS never began: closing it would begin it
            session.stream = session.stream.transport_stream
        stream = session.stream  # the TCP stream, if the TLS check answered in the clear
        if session.reason not in _NO_LINGER and not said_nothing:
            with trio.CancelScope(shield=True), trio.move_on_after(LINGER_S):
                await _linger(stream)
        with trio.CancelScope(shield=True), trio.move_on_after(handshake.PARTING_S):
            try:
                await stream.aclose()  # TLS: its close_notify, then the socket's close
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # closed all the same (trio closes the socket when TLS fails)
        if tls is not None:
            _let_go(tls)
        said = structlog.get_context(session.log)  # user and device, once the hello named them
        # Requests a stop left unanswered past --max-inflight-requests: named only if any.
        left = {"passed_over": session.passed_over} if session.passed_over else {}
        # (Not a failed hello past --auth-fail-rate: its address's `auth_throttled` counts
        # it.)
        if session.reason is not CloseReason.AUTH_THROTTLED:
            session.log.info(
                "connection_closed", user=said.get("user"), device=said.get("device"),
                reason=(session.reason or CloseReason.PEER_EOF).value,
                duration_s=round(time.monotonic() - session.opened, 3),
                frames_in=session.frames_in, frames_out=session.frames_out,
                frames_rejected=session.frames_rejected, **left)


def _place_for(broker: Broker) -> bool:
    """Whether a connection that spoke past --max-handshakes has a place: a silent
    connection's, given up to it (broker/awaiting.py); False if none has been silent long
    enough. Not a place freed while it spoke: a crowd reconnecting after a restart, let in so,
    came back sooner but held the event loop longer, and a monitor's check beside it was
    refused (tests/faults/test_storm.py: 4 of 127 checks, in one of three storms)."""
    if broker.handshaking < broker.config.max_handshakes:
        return False  # refused as before: the crowd's retries are spaced by their backoff
    now = time.monotonic()
    silent = broker.awaiting.give_up_one(now)
    if silent is None:
        return False
    broker.handshaking -= 1  # its place, taken by `session` (which counts it as its own)
    if (given_up := broker.places_given_up.count(now)) is not None:
        silent.log.warning("handshake_given_up", address=silent.address,
                           waited_s=round(now - silent.opened, 1), given_up=given_up,
                           handshaking=broker.handshaking + 1,
                           limit=broker.config.max_handshakes)
    return True


def _detach(broker: Broker, session: Session) -> None:
    hub, user = broker.hub, session.user
    if hub.holds(session):  # the device's own session, not one that replaced it
        broker.committer.device_gone(user, session.device)
    last = hub.detach(session)  # the user's last delivering session
    if (last or not session.delivers) and user and not hub.user_count(user):
        for buckets in broker.user_buckets:
            buckets.gone(user)
    if last:
        broker.presence.announce(user, False)


def _let_go(stream: trio.SSLStream) -> None:
    """`stream` is closed (or never began TLS): break the cycle trio's SSLStream makes with
    itself (its handshake's `_Once` holds its bound `_do_handshake`), which held its OpenSSL
    state, about 24 KiB, after each TLS connection's end until the cyclic GC came, rare in
    `homing serve` (--gc-young-threshold, and a long connection's stream is in the oldest
    generation). Every use of a closed SSLStream raises ClosedResourceError before it would
    call the handshake; one that never began TLS is not used again (`handle`)."""
    once = getattr(stream, "_handshook", None)
    if once is not None and hasattr(once, "_afn"):  # trio's private layout (0.35): else leave it
        once._afn = None
        once._args = ()


async def _linger(stream: trio.abc.Stream) -> None:
    """We end this connection while the peer may still be sending: half-close it (after the
    last frames, a closing error or bye, already written), then read and drop what comes until
    the peer's EOF. Closing a socket with unread input resets the connection, and a reset can
    make the peer's kernel throw away those last frames before the peer has read them."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        left = LINGER_BYTES
        while left > 0:
            data = await stream.receive_some(65536)
            if not data:
                return
            left -= len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def _peer_name(stream: trio.abc.Stream) -> tuple[str, str]:
    """The peer's host, and its `peer` for the log (host:port)."""
    inner = getattr(stream, "transport_stream", stream)
    try:
        host, port = inner.socket.getpeername()[:2]
        return host, f"{host}:{port}"
    except (AttributeError, OSError):
        return "?", "?"
