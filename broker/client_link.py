"""The client SDK's link to the broker: the one object that owns the connection and what keeps
it going, for `Client` (broker/client.py) to make its requests through.

It holds the connection of the moment (stream, protocol connection, the lock writes take
turns on), the requests in flight (broker/client_inflight.py), the last welcome, and the
client's fate (stopped for good, or closed). Its task connects, serves the connection (the
reader: frames in, answers to their requests, deliveries and pushes to the inbox; the
heartbeat), and after a drop reconnects with backoff and resends what is safe to repeat, until
it is closed or gives up.

Split from broker/client.py (2026-12-06) where the state parts: everything here changes with
the connection (a drop, a welcome, a resend), and the request methods only make a frame and
wait for its answer. The cursor of deliveries (broker/client_inbox.py) is not the link's: it
outlives connections and the caller's acks move it; the link hands it what the reader receives
and consults it at each welcome. Opening one stream (TCP, TLS, hello, welcome) is in
broker/client_stream.py.
"""

from __future__ import annotations

import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

import protocol as wire
from broker.client_errors import (
    BrokerUnavailable,
    ClientClosed,
    ClientError,
    ConnectionLost,
    NotTls,
    NotTrusted,
    Replaced,
    UnknownHost,
)
from broker.client_inbox import Inbox, InboxReset
from broker.client_inflight import DROPPED, InFlight, Request, fail_requests, lacks, refusal
from broker.client_stream import (
    failed_attempt,
    next_frame,
    open_session,
    send_steadily,
    write_reading,
)

# Refusals worth reconnecting after: the broker stopping, a timeout, a connection limit (its
# handshake slots are full while many clients reconnect at once, or too many connections),
# its store unreadable for now (its reader table full of other processes' readers).
RETRYABLE = frozenset({"shutting_down", "timeout", "limit_exceeded", "unavailable"})
DEAD_AFTER_HEARTBEATS = 3
CONNECT_TIMEOUT_S = 10.0  # for one attempt: TCP connect, TLS, hello and welcome
# The shortest attempt, when less of reconnect_timeout is left: giving up can come this late.
MIN_ATTEMPT_S = 0.5
STABLE_AFTER_S = 5.0  # a session that ended sooner is followed by the backoff, not at once


class Link:
    """One client's connection to the broker, kept up across drops; see the module."""

    def __init__(self, host: str, port: int, token: str, device: str, *,
                 tls: ssl.SSLContext | None, reconnect: bool, reconnect_timeout: float | None,
                 on_unreachable: Callable[[str], None] | None,
                 on_inbox_reset: Callable[[InboxReset], None] | None,
                 start: str, deliver: bool, inbox: Inbox) -> None:
        self.host, self.port = host, port
        self.token, self.device, self.tls = token, device, tls
        # Where the device starts if the broker has no cursor for it (hello.start): asked in
        # the first hello only. From its welcome on the client has a cursor, and a reconnect
        # resumes from it (a device still without a mark, its inbox empty at the start, is
        # sent entry 1 on, which is after the start all the same).
        self.start = start
        # False: every hello, the reconnects' too, asks for a requests-only session
        # (hello.deliver, PROTOCOL.md §9): no deliveries, no pushes, the device's delivering
        # session left alone (Client checks it is a bool).
        self.deliver = deliver
        self.reconnect, self.reconnect_timeout = reconnect, reconnect_timeout
        self.on_unreachable, self.on_inbox_reset = on_unreachable, on_inbox_reset
        self.inbox = inbox
        self.welcome: wire.Welcome | None = None
        # The last welcome, and a connection opened with it that checks frames made while
        # disconnected (`check_offline`).
        self._checker: tuple[wire.Welcome, wire.Connection] | None = None
        self.connected = trio.Event()
        self.inflight = InFlight()
        self.stream: trio.abc.Stream | None = None
        self.conn: wire.Connection | None = None
        self.send_lock = trio.Lock()
        # What the broker sent while this client wrote its resend after a reconnect
        # (`write_reading`), read then so that neither side waits on the other, and handed to
        # the reader first.
        self._early: deque[bytes] = deque()
        self.closed = False
        self._close_done = trio.Event()  # aclose did what it does
        self._last_rx = time.monotonic()
        self.fatal: BaseException | None = None
        # What the sessions handed over (new deliveries, pushes, answers), and the closing
        # error that ended the last one: a session that ends soon, having served nothing, is
        # a failed attempt (`_serve`).
        self._served = 0
        self._closed_by: ClientError | None = None
        self.user: str | None = None
        # Sessions opened after the first (welcomed, the waiting requests written to them);
        # an attempt that failed, one whose resend broke after the welcome too, is none.
        self.reconnects = 0

    # -- requests -----------------------------------------------------------------------------

    async def request(self, make, *, resend: bool = True,
                      done_if_resent: str | None = None, needs: str | None = None,
                      required: bool = False) -> Any:
        """Send the frame `make(id)` and return its reply; raise its error. `done_if_resent`
        names the refusal that, for a request resent after a reconnect, means its first try
        took effect (the reply is then None). `needs`: the welcome cap without which it is
        not repeated (`Request.needs`); `required`: nor sent at all (ClientError "invalid",
        checked against the last welcome while disconnected)."""
        self.check_usable()
        if required and self.welcome is not None and needs not in self.welcome.caps:
            raise lacks(needs)
        rid, req = self.inflight.add(make, resend, needs, required)
        try:
            await self.write_frame(req.frame, req)
            await req.event.wait()
        finally:
            self.inflight.discard(rid)
        if req.error is not None:
            if (req.resent and isinstance(req.error, ClientError)
                    and req.error.name == done_if_resent):
                return None
            raise req.error
        return req.reply

    def check_usable(self) -> None:
        """Raise what stopped the client for good, or ClientClosed once it was closed."""
        if self.fatal is not None:
            raise self.fatal
        if self.closed:
            raise ClientClosed("the client is closed")

    def check_offline(self, frame: Any) -> None:
        """While disconnected: the checks a connection would make of `frame` (its fields, the
        last welcome's body and frame limits), so that a request the broker would refuse is
        refused now, as when connected, and not when the reconnect sends it."""
        welcome = self.welcome
        if welcome is None:
            return
        checker = self._checker
        if checker is None or checker[0] is not welcome:
            conn = wire.Connection(wire.Role.CLIENT, max_frame_bytes=wire.MAX_FRAME_LIMIT,
                                   max_body_bytes=wire.MAX_FRAME_LIMIT)
            conn.send(wire.Hello(versions=(welcome.version,), token="t", device="d"))
            conn.receive_data(wire.encode_frame(wire.to_wire(welcome)))
            conn.next_event()  # the welcome: the checker is open
            conn.max_frame_bytes = welcome.max_frame  # bodies: `send` checks (_check_body)
            checker = self._checker = (welcome, conn)
        try:
            checker[1].send(frame)
        except wire.LocalProtocolError as exc:
            if (refused := refusal(exc, frame, welcome)) is not None:
                raise refused from None

    async def write_frame(self, frame: Any, req: Request | None = None) -> bool:
        """Send now if connected; if not, the frame is (re)sent after the reconnect (raise what
        stopped the client, or ClientClosed, once no connection will take it: closed while it
        waited for its turn to write). True when
        it was written to a connection (the broker may have it, even if the write failed);
        then `req.sent` is set, before the write begins, so that a drop meanwhile fails a
        request that is not to be repeated rather than leave it waiting."""
        self.check_usable()
        if self.stream is None or self.conn is None:
            self.check_offline(frame)
            return False
        try:
            data = self.conn.send(frame)
        except wire.LocalProtocolError as exc:
            if (refused := refusal(exc, frame, self.welcome)) is not None:
                raise refused from None
            return False  # bye or a closing error came: the connection is done; resent later
        stream = self.stream
        was = (req.sent, req.caps) if req is not None else None
        if req is not None:
            req.sent, req.caps = True, self.welcome.caps if self.welcome is not None else ()
        async with self.send_lock:
            if self.stream is not stream:
                # The connection went while we waited: nothing was written. A request that
                # the drop has not failed goes out with the next connection.
                if req is not None and was is not None:
                    req.sent, req.caps = was
                # Closed or stopped meanwhile: no connection will take it (an ack returned as
                # if written).
                self.check_usable()
                return False
            # Whole or not at all: a cancel in the middle of the write would leave half a
            # frame on the stream, and the broker would take what follows as the rest of it.
            # So a cancel takes effect once the frame is out. A write that stops making
            # progress (a broker that stopped reading) drops the connection, and with it the
            # half frame: the reader reconnects and resends.
            with trio.CancelScope(shield=True):
                try:
                    taken = await send_steadily(stream, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    taken = True  # the reader notices, reconnects and resends
            if not taken:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
        return True

    # -- the connection -----------------------------------------------------------------------

    async def _connect_once(self, limit: float = CONNECT_TIMEOUT_S) -> None:
        # The broker's limits are the ones that count: it checks the bodies we send against
        # its --max-body-bytes and names its max_frame in welcome. Ours would only refuse what
        # a broker set up for bigger messages sends and accepts.
        # Until the welcome, frames of HELLO_MAX_FRAME_BYTES (PROTOCOL.md §3.2): another
        # service on the port (an SSH or HTTP banner) is told at once, not taken for the
        # length prefix of a frame of a gigabyte and waited for.
        conn = wire.Connection(wire.Role.CLIENT, max_frame_bytes=wire.HELLO_MAX_FRAME_BYTES,
                               max_body_bytes=wire.MAX_FRAME_LIMIT)
        try:
            hello = conn.send(wire.Hello(
                versions=(wire.PROTOCOL_VERSION,), token=self.token, device=self.device,
                start=self.start if self.welcome is None and self.start != "first" else None,
                deliver=self.deliver))
        except wire.LocalProtocolError as exc:  # a malformed token or device name
            raise refusal(exc) or exc from None
        stream, welcome = await open_session(self.host, self.port, self.tls, conn, hello, limit)
        self.welcome, self.user = welcome, welcome.user
        self._last_rx = time.monotonic()
        flushed: list[Request] = []
        try:
            if self.deliver:  # a requests-only client has no cursor of its own to go back
                if self.inbox.went_back(welcome):
                    self._inbox_went_back(welcome)  # on_inbox_reset may raise: close the stream
                self.inbox.welcomed(welcome)
            async with self.send_lock:
                if self.closed:  # closed while we connected: serve nothing
                    raise ClientClosed("the client is closed")
                # Published under the lock, with the pending requests looked at in the same
                # step: one made before is sent here (it saw no connection), one made after
                # waits for the lock and sends itself. Neither is sent twice.
                self.stream, self.conn = stream, conn
                self._early.clear()  # the last connection's, never to be read
                out = []
                if (upto := self.inbox.ack_to_resend(welcome)) is not None:
                    out.append(conn.send(wire.Ack(upto=upto)))
                self.inflight.resend(conn, welcome, out, flushed)
                if out:
                    data = b"".join(out)
                    # Bounded as every other write: a broker that stops reading right after
                    # its welcome must not hold the connection task (and every request).
                    if not await write_reading(stream, data, self._early):
                        raise ConnectionLost("the broker did not take the resend")
                    # It took it all, however long that took on a slow link: the heartbeat
                    # counts from here, not from the welcome.
                    self._last_rx = time.monotonic()
        except BaseException:  # cancelled, or the new connection broke: do not keep it
            self.stream = self.conn = None
            # The requests not to be repeated that this resend carried may have gone out.
            fail_requests([r for r in flushed if not r.repeatable()], ConnectionLost, DROPPED)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise
        self.connected.set()

    def _inbox_went_back(self, welcome: wire.Welcome) -> None:
        """The inbox went back (the broker was restored from a backup): the inbox starts over
        from the welcome's cursor, the durable acks waiting to be resent past it are refused
        (StaleDelivery), and `on_inbox_reset` is told."""
        reset = self.inbox.start_over(welcome)
        self.inflight.fail_acks_above(welcome.acked)
        if self.on_inbox_reset is not None:
            self.on_inbox_reset(reset)

    def _dropped(self) -> None:
        self.stream = self.conn = None
        self.connected = trio.Event()
        self.inflight.dropped()

    async def _try_connect(self, left: float | None, first: bool) -> BaseException | None:
        """Connect once, within `left` seconds (None: CONNECT_TIMEOUT_S); the error to retry
        after, or None when connected.

        Refusals that will not change by retrying (any error but those of RETRYABLE: such as
        unauthorized or an unsupported version; a broker certificate our TLS context does not
        trust, a broker that does not speak TLS, and on the `first` connection a host name
        that does not exist) are raised.
        """
        limit = CONNECT_TIMEOUT_S if left is None else max(MIN_ATTEMPT_S, min(CONNECT_TIMEOUT_S,
                                                                              left))
        try:
            await self._connect_once(limit)
        except ClientError as exc:
            if exc.name not in RETRYABLE:
                raise
            return exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                wire.ProtocolError, ConnectionLost) as exc:
            return failed_attempt(exc, first=first, host=self.host, port=self.port)
        return None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve the connection, reconnect, until closed or refused for good. However
        it ends (cancelled before open_client could hand the client over, say), the connection
        it holds is closed."""
        try:
            await self._connections(task_status)
        finally:
            stream, self.stream, self.conn = self.stream, None, None
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)

    def _time_left(self, started: float) -> float | None:
        """Seconds left of `reconnect_timeout` since `started` (None: no timeout)."""
        if self.reconnect_timeout is None:
            return None
        return self.reconnect_timeout - (time.monotonic() - started)

    async def _connections(self, task_status) -> None:
        # reconnect_timeout counts from `started`: the client's start, or the end of the last
        # session that served it. A session the broker ends soon, having served nothing (a
        # broker that welcomes the device, then closes with `unavailable` as it cannot read its
        # deliveries), is a failed attempt as a refusal is: each welcome restarted the clock,
        # and such a broker was reconnected to for ever.
        delay, started, first = 0.05, time.monotonic(), True
        told = False  # on_unreachable called for this outage
        while not self.closed:
            try:
                error = await self._try_connect(self._time_left(started), first)
            except (ClientError, NotTrusted, NotTls, UnknownHost) as exc:
                self.fail(exc)
                if first:
                    task_status.started()
                return
            if self.closed:  # closed by the caller meanwhile (the attempt failed with it)
                return
            if error is None:
                if self.closed or self.stream is None:  # closed as the connection opened
                    return
                if first:
                    task_status.started()
                    first = False
                else:
                    self.reconnects += 1
                opened = time.monotonic()
                error = await self._serve()
                if self.fatal is not None or self.closed:  # refused for good, or closed by us
                    return
                if not self.reconnect:
                    self.fail(ConnectionLost("the connection dropped"))
                    return
                if error is None:  # it served: a new outage begins
                    started, told = time.monotonic(), False
                    if started - opened >= STABLE_AFTER_S:
                        delay = 0.05
                        continue
                    # It ended soon after it opened: back off as after a failed attempt,
                    # rather than reconnect in a tight loop.
                    await trio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
            left = self._time_left(started)
            if not self.reconnect or (left is not None and left <= 0):
                self.fail(self._gave_up(error))
                if first:
                    task_status.started()
                return
            if self.on_unreachable is not None and not told:
                told = True
                self.on_unreachable(self._outage(error))
            pause = delay * (0.5 + random.random())
            # The last pause ends with the timeout: one more (short) attempt, then give up.
            await trio.sleep(pause if left is None else min(pause, left))
            delay = min(delay * 2, 2.0)

    async def _serve(self) -> BaseException | None:
        """Serve the open connection until it ends. None if the session served this client
        (it lasted STABLE_AFTER_S, or handed over a new delivery, a push or an answer); else
        what ended it: the broker's closing error, or the drop."""
        opened, served = time.monotonic(), self._served
        self._closed_by = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, self.welcome.heartbeat)
                await self._reader()
                nursery.cancel_scope.cancel()
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                 wire.ProtocolError):
            pass
        stream = self.stream
        self._dropped()
        if stream is not None:  # the broker's end, or a failed read: closed now, not by the GC
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        if self._served != served or time.monotonic() - opened >= STABLE_AFTER_S:
            return None
        closed_by = self._closed_by
        return _Closed(str(closed_by) if closed_by is not None else "the connection dropped",
                       closed_by)

    def _outage(self, error: BaseException) -> str:
        """What went wrong, for on_unreachable and for giving up: a broker that refused or
        closed the session was reached, and is not said to be out of reach."""
        where = f"{self.host}:{self.port}"
        if isinstance(error, _Closed):
            return f"{where} closed the session before serving anything: {error}"
        if isinstance(error, ClientError):
            return f"{where} refused the session: {error}"
        return f"cannot reach {where}: {error}"

    def _gave_up(self, error: BaseException) -> ConnectionLost:
        """The error the client stops with after `error`, the last attempt's."""
        said = self._outage(error)
        if not isinstance(error, ClientError | _Closed):
            return ConnectionLost(said)
        if self.reconnect:
            said += f" (gave up after {self.reconnect_timeout:g} s)"
        return BrokerUnavailable(said, error.error if isinstance(error, _Closed) else error)

    async def _heartbeat(self, every: int) -> None:
        """Ping every `every` s; drop a connection from which no byte came for 3 x `every` (a
        frozen broker, a path that drops everything): looked at every `every` s, so noticed
        3 to 4 heartbeats after the last byte."""
        every = max(1, every)
        while True:
            await trio.sleep(every)
            if time.monotonic() - self._last_rx > DEAD_AFTER_HEARTBEATS * every:
                stream = self.stream
                if stream is not None:
                    await trio.aclose_forcefully(stream)  # the reader fails and we reconnect
                return
            if not await self._write_quietly(wire.Ping()):
                return

    def _heard(self) -> None:
        """Bytes came from the broker: the link lives (`_heartbeat`), even in the middle of a
        frame. Until 2026-12-06 only whole frames counted, and a delivery that took longer
        than three heartbeats to arrive over a slow link was dropped mid-way, for ever."""
        self._last_rx = time.monotonic()

    async def _write_quietly(self, frame: Any) -> bool:
        """Write a frame of our own (a ping, a pong); False once the client stopped or closed,
        which is not the heartbeat's or the reader's error to raise."""
        try:
            await self.write_frame(frame)
        except (ConnectionLost, ClientError):
            return False
        return True

    async def _reader(self) -> None:
        stream, conn, early = self.stream, self.conn, self._early
        while True:
            frame = await next_frame(stream, conn, early, self._heard)
            if frame is None:
                return
            if isinstance(frame, wire.Bye):
                if frame.reason == wire.BYE_REPLACED:
                    self.fail(Replaced(f"device {self.device!r} connected again elsewhere; "
                                       "this client stopped (use one device name per process)"))
                return
            if isinstance(frame, wire.Deliver):
                # A requests-only client of a broker without the cap drops them: unacked,
                # they wait for the device's next delivering session.
                if self.deliver and self.inbox.is_new(frame):
                    self._served += 1
                    await self.inbox.queue(frame)
            elif isinstance(frame, wire.Receipt | wire.Status | wire.TypingNotice):
                if not self.deliver:
                    continue  # as deliveries (a broker without the cap): none can be taken
                self.inbox.pushed(frame)
                self._served += 1
            elif isinstance(frame, wire.Error):
                if frame.close:
                    error = ClientError.of(frame)
                    # too_large: a delivery above the broker's own max_frame (the SDK asks for
                    # no less), which a reconnect would meet again at once.
                    if frame.name in ("unauthorized", "unsupported_version", "too_large"):
                        self.fail(error)
                    self._closed_by = error
                    return
                req = self.inflight.get(frame.id) if frame.id is not None else None
                if req is not None:
                    req.error = ClientError.of(frame)
                    self._served += 1
                    req.event.set()
            elif isinstance(frame, wire.Ping):
                if not await self._write_quietly(wire.Pong(id=frame.id)):
                    return
            else:
                req = self.inflight.get(getattr(frame, "id", None))
                if req is not None:
                    req.reply = frame
                    self._served += 1
                    req.event.set()

    def fail(self, exc: BaseException) -> None:
        """Stop the client for good with `exc`: the requests waiting raise it, and the
        deliveries and pushes end with it once those received are taken."""
        self.fatal = exc
        self.inflight.fail(exc)
        self.inbox.stop()
        self.connected.set()

    async def aclose(self) -> None:
        """Say bye, close the connection, and end the deliveries quietly (Client.aclose)."""
        if self.closed:
            await self._close_done.wait()
            return
        self.closed = True
        stream, conn = self.stream, self.conn
        self.stream = self.conn = None
        try:
            if self.fatal is None and stream is not None and conn is not None:
                with trio.move_on_after(1):
                    try:
                        data = conn.send(wire.Bye(reason="client closing"))
                        async with self.send_lock:
                            await stream.send_all(data)
                    except (wire.ProtocolError, trio.BrokenResourceError,
                            trio.ClosedResourceError, OSError):
                        pass
        finally:
            # Whatever ended the bye, and with no await but the shielded one: in a cancelled
            # scope (the `finally:` of a task being cancelled) the close stopped at its first
            # checkpoint, the connection left open and every waiting task waiting for ever.
            self.inflight.close(ClientClosed, "the client was closed before the broker answered")
            self.inbox.stop()
            try:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
            finally:
                self._close_done.set()


class _Closed(Exception):
    """A session that ended soon, having served nothing; `error`: the broker's closing error
    (None: the connection just ended)."""

    def __init__(self, message: str, error: ClientError | None) -> None:
        super().__init__(message)
        self.error = error
