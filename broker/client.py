"""The client SDK: a trio API to homing that survives network drops and broker restarts.

    async with open_client("127.0.0.1:7717", token, device="shop-1") as client:
        result = await client.send("Your book is back", to="member-42")
        async for d in client.deliveries():
            print(d.body)
            await client.ack(d.inbox_seq)

What it promises:
- `send` returns only once the broker made the message durable. Every send carries a client
  message id (`cid`); after a drop the SDK reconnects (exponential backoff with jitter) and
  resends every unanswered send with its original cid, so a drop costs neither a message nor a
  duplicate (the broker answers a repeated cid with the first result, `dup=True`).
- Deliveries resume after the last acked inbox_seq; deliveries already handed to the caller in
  this process are not handed over twice, and acks made while disconnected are sent again.
  A broker restored from an older backup (its inbox went back) is met by starting over from
  its cursor: deliveries of the old inbox still queued are dropped, `on_inbox_reset` is told,
  and an ack or `done` of one the caller still holds raises StaleDelivery, acking nothing.
- `create` carries a cid as `send` does, and is repeated after a drop in the same way (the
  broker answers a repeated cid with the conversation it created first), where the broker's
  welcome has the `create_cid` cap. Requests that are not safe to repeat (`revoke_tokens`, a
  create to a broker without that cap) fail with `ConnectionLost` on a drop; a create with the
  caller's own cid is not sent to a broker without the cap (ClientError "invalid").
- Once the client gives up (past the reconnect timeout the broker unreachable, refusing each
  session, or closing each one before it served anything; replaced; refused), its
  requests and its deliveries raise that error; a request the protocol's field checks refuse
  raises ClientError "invalid" at once, unsent (while disconnected: against the last welcome).
- `open_client(..., deliver=False)` is a requests-only client of its device: sent no deliveries
  and no pushes, it ends no client of the device and none ends it (a broker with the
  `requests_only` cap); its deliveries, acks and pushes raise ClientError "invalid" at once.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

import protocol as wire
from broker.client_errors import (
    _NO_SUCH_NAME,
    _NOT_TLS_REASONS,
    UNSURE,
    BrokerUnavailable,
    ClientClosed,
    ClientError,
    ConnectionLost,
    NotTls,
    NotTrusted,
    Replaced,
    StaleDelivery,
    UnknownHost,
)
from protocol import (
    ConvEntry,
    ConvList,
    Deliver,
    MemberList,
    Page,
    PageMessage,
    Receipt,
    ReceiptList,
    Result,
    Status,
    TypingNotice,
    Welcome,
    fields,
)

# The frames a service gets back, named in docs/CLIENT.md, are importable from the SDK itself
# (`from broker.client import Receipt`) to tell pushes apart and type the answers; so are the
# exceptions it raises, defined in broker/client_errors.py.
__all__ = [
    "DEFAULT_SERVER",
    "UNSURE",
    "BrokerUnavailable",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "ConvEntry",
    "ConvList",
    "Deliver",
    "Deliveries",
    "InboxReset",
    "MemberList",
    "NotTls",
    "NotTrusted",
    "Page",
    "PageMessage",
    "Receipt",
    "ReceiptList",
    "Replaced",
    "Result",
    "StaleDelivery",
    "Status",
    "TypingNotice",
    "UnknownHost",
    "Welcome",
    "new_cid",
    "open_client",
    "parse_server",
]

DEFAULT_SERVER = "127.0.0.1:7717"
# Refusals worth reconnecting after: the broker stopping, a timeout, a connection limit (its
# handshake slots are full while many clients reconnect at once, or too many connections),
# its store unreadable for now (its reader table full of other processes' readers).
RETRYABLE = frozenset({"shutting_down", "timeout", "limit_exceeded", "unavailable"})
DEAD_AFTER_HEARTBEATS = 3
DROPPED = "the connection dropped before the broker answered"
CONNECT_TIMEOUT_S = 10.0  # for one attempt: TCP connect, TLS, hello and welcome
# The shortest attempt, when less of reconnect_timeout is left: giving up can come this late.
MIN_ATTEMPT_S = 0.5
STABLE_AFTER_S = 5.0  # a session that ended sooner is followed by the backoff, not at once
# A frame not written within WRITE_STALL_S plus its time at SLOWEST_LINK_BPS (the broker
# stopped reading) drops the connection.
WRITE_STALL_S = 10.0
SLOWEST_LINK_BPS = 512 * 1024
RECEIVE_BYTES = 65536  # the most one read of the connection takes

_last_cid_ns = 0


def new_cid() -> str:
    """A fresh client message id: 32 hex digits, a time in ns then 64 random bits.

    The random part makes ids unique across processes and threads. The time part never repeats
    nor goes back in one thread while the clock does not step back, so later ids sort after
    earlier ones: sends land at the end of the broker's idempotency index (`idem`, keyed by
    cid then sender), and a commit holding many sends writes a page or two of that index rather
    than a scattered page per send, as random ids do (docs/DESIGN.md, "Projections").
    """
    global _last_cid_ns
    _last_cid_ns = max(time.time_ns(), _last_cid_ns + 1)
    return f"{_last_cid_ns:016x}{int.from_bytes(os.urandom(8), 'big'):016x}"


class InboxReset(NamedTuple):
    """What `on_inbox_reset` is told when the welcome's inbox head is below the inbox_seqs
    this client had or acked, or its ack below one the broker answered as on disk (the broker
    restored from an older backup): `before`, the highest inbox_seq it had or acked; `head`
    and `acked`, the restored inbox's head and this device's ack in it (delivery starts over
    after it); `dropped`, the deliveries of the old inbox still queued in the client, not
    handed over."""

    before: int
    head: int
    acked: int
    dropped: int


def parse_server(server: str) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT``."""
    if "://" in server:  # nats://, redis://, http://: the habit of other clients
        raise ValueError(f"server must be HOST:PORT, not a URL: {server!r} (homing speaks its "
                         "own protocol over TCP: give the host and port alone, and connect "
                         "with TLS by passing tls=, or --tls, not by a scheme)")
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server must be HOST:PORT, not {server!r}")
    if not 0 < int(port) <= 65535:  # getaddrinfo takes it modulo 65536: another port
        raise ValueError(f"server must be HOST:PORT with a PORT from 1 to 65535, not {server!r}")
    host = host.strip("[]")
    try:  # as the resolver will (an empty label, one over 63 characters: a UnicodeError there)
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"server must be HOST:PORT, not {server!r}: {host!r} is no host name "
                         "(a part between dots is empty or over 63 characters)") from None
    return host, int(port)


@dataclass
class _Request:
    frame: Any
    resend: bool
    event: trio.Event = field(default_factory=trio.Event)
    reply: Any = None
    error: BaseException | None = None
    sent: bool = False  # written to a connection at least once
    resent: bool = False  # written again after a reconnect, having been sent before
    # A welcome cap without which a request written to that connection is not to be repeated
    # (a create's cid, which a broker from before ignores); `caps`: the last such welcome's.
    needs: str | None = None
    caps: tuple[str, ...] = ()
    # `needs` is needed for the first write too: a create with the caller's own cid, which a
    # broker without the cap would ignore (a run again with it would make a second group).
    required: bool = False

    def repeatable(self, to: tuple[str, ...] | None = None) -> bool:
        """Whether, once written to a connection that dropped, it may go out again (to one
        whose welcome has the caps `to`, if given): the cap it needs, it needs of both
        brokers, the one that may have carried it out and the one the repeat would reach."""
        if not self.resend or self.needs is None:
            return self.resend
        return self.needs in self.caps and (to is None or self.needs in to)


class Client:
    """One device's connection to the broker; build it with `open_client`."""

    def __init__(self, server: str, token: str, device: str, *, tls: ssl.SSLContext | None,
                 reconnect: bool, reconnect_timeout: float | None, max_pushes: int,
                 on_unreachable: Callable[[str], None] | None = None,
                 on_inbox_reset: Callable[[InboxReset], None] | None = None,
                 start: str = "first", deliver: bool = True) -> None:
        self.host, self.port = parse_server(server)
        self.token, self.device, self.tls = token, device, tls
        # Where the device starts if the broker has no cursor for it (hello.start): asked in
        # the first hello only. From its welcome on the client has a cursor, and a reconnect
        # resumes from it (a device still without a mark, its inbox empty at the start, is
        # sent entry 1 on, which is after the start all the same).
        self.start = start
        # False: every hello, the reconnects' too, asks for a requests-only session
        # (hello.deliver, PROTOCOL.md §9): no deliveries, no pushes, the device's delivering
        # session left alone. deliveries(), ack(), done() and next_push() raise at once.
        # Checked here: the codec refuses any other value in the hello but None, which it
        # leaves off the wire, so that the broker opened a delivering session (replacing the
        # device's) while this client dropped what it was sent as a requests-only one.
        if not isinstance(deliver, bool):
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"hello: bad value for field 'deliver': {deliver!r} is not "
                              f"true or false")
        self.deliver = deliver
        self.reconnect, self.reconnect_timeout = reconnect, reconnect_timeout
        self.on_unreachable, self.on_inbox_reset = on_unreachable, on_inbox_reset
        self.welcome: wire.Welcome | None = None
        # The last welcome, and a connection opened with it that checks frames made while
        # disconnected (`_check_offline`).
        self._checker: tuple[wire.Welcome, wire.Connection] | None = None
        self.connected = trio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._stream: trio.abc.Stream | None = None
        self._conn: wire.Connection | None = None
        self._send_lock = trio.Lock()
        # Not bounded here: the broker's window bounds it (it sends no more unacked). A bound
        # below the window (65,536 against a --window above it) stopped the reader with the
        # answers behind the deliveries: a loop awaiting a call per delivery waited for ever.
        self._deliveries_in, deliveries_out = trio.open_memory_channel[wire.Deliver](math.inf)
        self._deliveries = Deliveries(self, deliveries_out)
        self._pushes: deque[Any] = deque(maxlen=max_pushes)
        self._push_event = trio.Event()
        self._yielded = 0  # highest inbox_seq received (queued for the caller or taken)
        self._acked = 0  # highest inbox_seq the caller acked
        self._durable = 0  # highest inbox_seq of an ack the broker said it holds on disk
        # The deliveries the caller took from `deliveries()` and that are not acked yet, in
        # order, each by what tells it from a delivery of another inbox (`_entry`: not its
        # body, which the caller may have dropped long before it acks), for `done` and to tell
        # one from before an inbox reset; those of them declared done; those of them from the
        # first not done on, in order, and the last before which every one taken is done
        # (`done` looks at each delivery once); the highest inbox_seq taken, since the last
        # reset; the acks `done` has under way, by (upto, durable), for a `done` that adds
        # nothing to one of them to wait for it rather than write it again.
        self._taken: OrderedDict[int, tuple] = OrderedDict()
        self._done: set[int] = set()
        self._undone: deque[int] = deque()
        self._ready = 0
        self._handed = 0
        self._acking: dict[tuple[int, bool], _Acking] = {}
        # What the broker sent while this client wrote its resend after a reconnect (`_resend`),
        # read then so that neither side waits on the other, and handed to the reader first.
        self._early: deque[bytes] = deque()
        self.inbox_resets = 0  # times the inbox went back (a broker restored from a backup)
        self._closed = False
        self._close_done = trio.Event()  # aclose did what it does
        self._last_rx = time.monotonic()
        self._fatal: BaseException | None = None
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

    async def _request(self, make, *, resend: bool = True,
                       done_if_resent: str | None = None, needs: str | None = None,
                       required: bool = False) -> Any:
        """Send the frame `make(id)` and return its reply; raise its error. `done_if_resent`
        names the refusal that, for a request resent after a reconnect, means its first try
        took effect (the reply is then None). `needs`: the welcome cap without which it is
        not repeated (`_Request.needs`); `required`: nor sent at all (ClientError "invalid",
        checked against the last welcome while disconnected)."""
        self._check_usable()
        if required and self.welcome is not None and needs not in self.welcome.caps:
            raise _lacks(needs)
        rid = next(self._ids)
        req = _Request(make(rid), resend, needs=needs, required=required)
        self._pending[rid] = req
        try:
            await self._write_frame(req.frame, req)
            await req.event.wait()
        finally:
            self._pending.pop(rid, None)
        if req.error is not None:
            if (req.resent and isinstance(req.error, ClientError)
                    and req.error.name == done_if_resent):
                return None
            raise req.error
        return req.reply

    def _check_usable(self) -> None:
        """Raise what stopped the client for good, or ClientClosed once it was closed."""
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed("the client is closed")

    def _check_delivers(self, what: str) -> None:
        """Raise ClientError "invalid" on a requests-only client (`deliver=False`): it is sent
        no deliveries and no pushes, and an ack on it is not its to make."""
        if not self.deliver:
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"{what}: this client takes no deliveries and no pushes "
                              f"(open_client(..., deliver=False)): open one that does, with "
                              f"the device's name, for them")

    def _check_offline(self, frame: Any) -> None:
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
            if (refusal := _refusal(exc, frame, welcome)) is not None:
                raise refusal from None

    async def _write_frame(self, frame: Any, req: _Request | None = None) -> bool:
        """Send now if connected; if not, the frame is (re)sent after the reconnect (raise what
        stopped the client, or ClientClosed, once no connection will take it: closed while it
        waited for its turn to write). True when
        it was written to a connection (the broker may have it, even if the write failed);
        then `req.sent` is set, before the write begins, so that a drop meanwhile fails a
        request that is not to be repeated rather than leave it waiting."""
        self._check_usable()
        if self._stream is None or self._conn is None:
            self._check_offline(frame)
            return False
        try:
            data = self._conn.send(frame)
        except wire.LocalProtocolError as exc:
            if (refusal := _refusal(exc, frame, self.welcome)) is not None:
                raise refusal from None
            return False  # bye or a closing error came: the connection is done; resent later
        stream = self._stream
        was = (req.sent, req.caps) if req is not None else None
        if req is not None:
            req.sent, req.caps = True, self.welcome.caps if self.welcome is not None else ()
        async with self._send_lock:
            if self._stream is not stream:
                # The connection went while we waited: nothing was written. A request that
                # the drop has not failed goes out with the next connection.
                if req is not None and was is not None:
                    req.sent, req.caps = was
                # Closed or stopped meanwhile: no connection will take it (an ack returned as
                # if written).
                self._check_usable()
                return False
            # Whole or not at all: a cancel in the middle of the write would leave half a
            # frame on the stream, and the broker would take what follows as the rest of it.
            # So a cancel takes effect once the frame is out. A write that does not finish in
            # time (a broker that stopped reading) drops the connection, and with it the half
            # frame: the reader reconnects and resends.
            limit = WRITE_STALL_S + len(data) / SLOWEST_LINK_BPS
            with trio.CancelScope(shield=True), trio.move_on_after(limit) as stalled:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the reader notices, reconnects and resends
            if stalled.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
        return True

    async def send(self, body: str | bytes, *, to: str | None = None, conv: str | None = None,
                   cid: str | None = None) -> wire.Result:
        """Send a message; returns the durable result {conv, seq, lsn, cid, dup}. Without a
        `cid` it gets a fresh one (`new_cid`); one of yours is sent as it is, so an empty one is
        refused ("invalid") rather than replaced by an id a retry would not find again.

        An error after which the message may have been accepted (ConnectionLost, Replaced, or
        a ClientError named in UNSURE) carries the cid as `.cid`: sent again with it, the
        message is a dup if it was accepted, and is not appended twice."""
        if cid is None:
            cid = new_cid()
            self._check_body(body)
        try:
            return await self._request(
                lambda i: wire.Send(id=i, cid=cid, body=body, to=to, conv=conv))
        except (ConnectionLost, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.name not in UNSURE:
                raise
            raise _with_cid(exc, cid) from exc.__cause__

    def _check_body(self, body: object) -> None:
        """ClientError "invalid", unsent, for a body over the broker's limit (its welcome's
        max_body), as the broker would answer. Only for a send with a fresh cid: one with the
        caller's cid may repeat a message accepted before the limit was lowered, which the
        broker answers as a dup (since 2026-12-05), as it does a resend after a reconnect."""
        limit = self.welcome.max_body if self.welcome is not None else None
        if limit is not None and not fields.body(body, limit):
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              "send: bad value for field 'body': "
                              f"{fields.explain(fields.body, body, limit)}")

    async def ack(self, upto: int | wire.Deliver, *, durable: bool = False) -> None:
        """Acknowledge deliveries up to inbox_seq `upto` (cumulative), or up to the delivery
        `upto` itself. An `upto` beyond the inbox entries this client knows of (the deliveries
        it had, the inbox head at welcome) raises ClientError "invalid": an ack past them
        would skip the deliveries still to come (an `inbox_seq` mixed up with a conversation's
        `seq`, say). Once the inbox went back (`on_inbox_reset`), one beyond the deliveries
        taken since raises StaleDelivery, as does a delivery from before that passed itself.

        Without `durable` it returns once the ack is written to the connection (or, while
        disconnected, kept to be sent on the next one): a broker that crashes before the ack
        reaches its disk delivers those entries again (at least once). With `durable=True` it
        returns once the broker holds the ack on disk (an `ack` with an id, answered `ok`:
        PROTOCOL.md §5.2), so they are not delivered to this device again; it is repeated
        after a drop (an ack is cumulative: a repeat changes nothing)."""
        self._check_usable()
        self._check_delivers("ack")
        seq = self._ack_target(upto, "ack")
        if not self.inbox_resets:
            known = max(self._yielded, self.welcome.head if self.welcome is not None else 0)
            if not 0 <= seq <= known:
                raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                                  f"ack: cannot ack {seq}: the last inbox entry this client "
                                  f"knows of is {known}")
        elif seq < 0:
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"ack: cannot ack {seq}")
        resets = self.inbox_resets
        if durable:
            await self._request(lambda i: wire.Ack(upto=seq, id=i))
        elif seq > self._acked:
            await self._write_frame(wire.Ack(upto=seq))
        if self.inbox_resets != resets:  # it went to the broker before the reset, or nowhere
            return
        if durable:
            self._durable = max(self._durable, seq)
        self._acked = max(self._acked, seq)
        # Acked, done or not: `done` is past them. Only now: an ack that failed (the client
        # stopped, a durable ack refused or cancelled) leaves them to `done` again.
        taken, undone = self._taken, self._undone
        while taken and next(iter(taken)) <= seq:
            self._done.discard(taken.popitem(last=False)[0])
        while undone and undone[0] <= seq:
            undone.popleft()

    def _ack_target(self, upto: int | wire.Deliver, what: str) -> int:
        """The inbox_seq that `ack` or `done` of `upto` names; StaleDelivery for a delivery
        from before the inbox went back, or (after it went back) an inbox_seq beyond those
        taken since, which names an entry of the restored inbox the caller has not got."""
        if not isinstance(upto, wire.Deliver):
            if self.inbox_resets and upto > max(self._handed, self._acked):
                raise StaleDelivery(what, upto)
            return upto
        seq = upto.inbox_seq
        # One taken since the reset and not acked is held; one acked is no matter.
        if self.inbox_resets and seq > self._acked and self._taken.get(seq) != _entry(upto):
            raise StaleDelivery(what, seq)
        return seq

    async def done(self, inbox_seq: int | wire.Deliver, *, durable: bool = False) -> None:
        """Declare the delivery `inbox_seq` (one taken from `deliveries()`, or that delivery
        itself) handled, and ack up to the last delivery before which every one taken is done:
        for a service that handles its deliveries in tasks of their own, which finish out of
        order. An `ack` of the latest would also ack those still being handled, lost should
        the process die. Returns without acking while an earlier one is not done; `durable`
        as for `ack`. When that ack fails (the call cancelled, a durable ack refused), the
        delivery stays done and unacked: `done` of it again acks again. A `done` whose ack
        another `done` is making (as durable, or more) waits for that one: it returns once
        that ack is made, raises its error, and makes the ack itself if it was cancelled."""
        self._check_usable()
        self._check_delivers("done")
        seq = self._ack_target(inbox_seq, "done")
        again = seq in self._done
        if seq in self._taken:
            self._done.add(seq)
            undone = self._undone
            while undone and undone[0] in self._done:  # each one leaves it once
                self._ready = undone.popleft()
            upto = self._ready if self._ready in self._taken else 0  # not acked yet
            # Done twice is a mistake, unless its ack is still to be made (it failed).
            if not again or upto >= seq:
                if upto:
                    await self._done_ack(upto, durable)
                return
        raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                          f"done: {seq} is not a delivery taken from deliveries() "
                          f"and not yet done")

    async def _done_ack(self, upto: int, durable: bool) -> None:
        """`ack(upto)` for `done`, once: `upto` only grows (it is `_ready`), so an ack under
        way that covers it is one of the same `upto`, as durable or more. Waits for that one
        and ends as it did; makes it if there is none, or that one was cancelled."""
        while (acking := self._acking.get((upto, True))
               or (None if durable else self._acking.get((upto, False)))) is not None:
            await acking.over.wait()
            if acking.made:
                return
            if acking.error is not None:
                raise acking.error
            self._check_usable()  # cancelled: made by the next one
        key = (upto, durable)
        acking = self._acking[key] = _Acking()
        try:
            await self.ack(upto, durable=durable)
            acking.made = True
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                acking.error = exc
            raise
        finally:
            if self._acking.get(key) is acking:
                del self._acking[key]
            acking.over.set()

    async def read(self, conv: str, upto: int) -> None:
        """Mark `conv` read up to conv seq `upto`."""
        await self._request(lambda i: wire.Read(conv=conv, upto=upto, id=i))

    async def history(self, conv: str, *, before: int | None = None, after: int | None = None,
                      limit: int = 50, order: str = "newest") -> wire.Page:
        """A page of `conv`'s messages."""
        return await self._request(lambda i: wire.History(
            id=i, conv=conv, before=before, after=after, limit=limit, order=order))

    async def receipts(self, conv: str, seq: int) -> wire.ReceiptList:
        """Who was delivered, and who read, message `seq` of `conv`, of its audience
        (`members`: the members other than its sender who were members when it was posted)."""
        return await self._request(lambda i: wire.Receipts(id=i, conv=conv, seq=seq))

    async def create(self, kind: str, name: str, members: tuple[str, ...] | list[str] = (),
                     open: bool = False, *, cid: str | None = None) -> str:
        """Create a group or channel; returns its conv id. `members` is a list of user ids:
        one str is refused (TypeError), as it would make a member of each of its letters.
        Like `send`, it carries a `cid` (a fresh one without yours) and is repeated after a
        drop: the broker answers a repeat with the conversation it created first. Pass your
        own `cid` (an order number, say) to make one conversation of calls in several runs.
        A broker whose welcome lacks the `create_cid` cap (one from before 2026-12-05) ignores
        the cid: a create written to it that a drop cuts off raises ConnectionLost, and one
        with your own `cid` is not sent to it (ClientError "invalid"), since a second call
        with it would make a second conversation."""
        if isinstance(members, str):
            raise TypeError(f"members is a list of user ids, not the str {members!r}: "
                            f"[{members!r}] for one member")
        own = cid is not None  # the caller's: it must be honoured, or nothing is created
        cid = new_cid() if cid is None else cid
        reply = await self._request(lambda i: wire.Create(
            id=i, kind=kind, name=name, members=tuple(members or ()), open=open, cid=cid),
            needs=wire.CAP_CREATE_CID, required=own)
        return reply.conv

    async def create_group(self, name: str, members=(), open: bool = False, *,
                           cid: str | None = None) -> str:
        return await self.create("group", name, members, open, cid=cid)

    async def create_channel(self, name: str, members=(), open: bool = False, *,
                             cid: str | None = None) -> str:
        return await self.create("channel", name, members, open, cid=cid)

    async def invite(self, conv: str, user: str, role: str = "member") -> None:
        await self._request(lambda i: wire.Invite(id=i, conv=conv, user=user, role=role))

    async def set_role(self, conv: str, user: str, role: str) -> None:
        """Make `user`, a member of `conv`, a plain "member" or an "admin" (by an owner or an
        admin). Resent after a reconnect like the others; stepping down yourself, whose resend
        is `forbidden` once the first try was carried out, then returns as done."""
        mine = self.welcome is not None and user == self.welcome.user and role == "member"
        await self._request(lambda i: wire.SetRole(id=i, conv=conv, user=user, role=role),
                            done_if_resent="forbidden" if mine else None)

    async def join(self, conv: str) -> None:
        await self._request(lambda i: wire.Join(id=i, conv=conv))

    async def leave(self, conv: str) -> None:
        """Leave `conv`. Resent after a reconnect, a leave the broker carried out the first time
        is answered `forbidden` (not a member any more): that is what leave asked for, so it
        returns instead of raising."""
        await self._request(lambda i: wire.Leave(id=i, conv=conv), done_if_resent="forbidden")

    async def remove(self, conv: str, user: str) -> None:
        """Take `user` out of `conv`, a group or channel (by an owner or an admin; owners are
        not removed). A user who is not a member is no error: so a remove the broker carried
        out before a reconnect returns when it is resent."""
        await self._request(lambda i: wire.Remove(id=i, conv=conv, user=user))

    async def subscribe(self, conv: str) -> None:
        await self._request(lambda i: wire.Subscribe(id=i, conv=conv))

    async def mute(self, conv: str, muted: bool = True) -> None:
        await self._request(lambda i: wire.Mute(id=i, conv=conv, muted=muted))

    async def revoke_tokens(self, user: str) -> int:
        """Revoke every token of `user` issued up to now (an admin token's right; others get
        `forbidden`). Returns `before`: tokens issued before that Unix second are refused from
        now on, and the user's sessions opened with one are closed with `unauthorized`; mint
        the user's new token once the clock has passed it. Not repeated after a reconnect (a
        repeat in a later second would also cut off tokens minted in between): a drop while it
        is on its way raises `ConnectionLost`, and asking again is safe."""
        reply = await self._request(lambda i: wire.Revoke(id=i, user=user), resend=False)
        return reply.before

    async def members(self, conv: str) -> wire.MemberList:
        """`conv`'s kind, name, and members by role (owners, admins, members)."""
        return await self._request(lambda i: wire.Members(id=i, conv=conv))

    async def conversations(self, *, after: str | None = None,
                            limit: int = 100) -> wire.ConvList:
        """A page of this user's conversations, in conv id order after `after`: each a
        `wire.ConvEntry` (kind, role, last_seq, read mark, muted, name; unread is
        `last_seq - read`). While `more`, page on with `after=` the last one's `conv`."""
        return await self._request(lambda i: wire.Convs(id=i, after=after, limit=limit))

    async def presence(self, conv: str) -> tuple[str, ...]:
        """The members of `conv` online now."""
        return (await self._request(lambda i: wire.Presence(id=i, conv=conv))).online

    async def typing(self, conv: str) -> None:
        await self._write_frame(wire.Typing(conv=conv))

    async def ping(self) -> None:
        await self._request(lambda i: wire.Ping(id=i))

    # -- incoming -------------------------------------------------------------------------------

    def deliveries(self) -> Deliveries:
        """The deliveries, in inbox order, each once per process; ack them with `ack`.
        ClientError "invalid" on a requests-only client (`deliver=False`)."""
        self._check_delivers("deliveries")
        return self._deliveries

    async def next_push(self) -> Any:
        """The next receipt, status or typing push (the oldest are dropped past `max_pushes`).
        Once the client stopped and the pushes received are taken, raises what stopped it
        (ClientClosed after a close). A checkpoint, as trio's own calls are, even when a push is
        waiting: several tasks looping over it take turns with a burst."""
        self._check_delivers("next_push")
        await trio.lowlevel.checkpoint()
        while not self._pushes:
            self._check_usable()
            await self._push_event.wait()  # several tasks may wait: each wakes, one takes it
        return self._pushes.popleft()

    def receipts_pushed(self, members: wire.MemberList) -> bool:
        """Whether this client is pushed the other members' delivered and read marks in the
        conversation `members` describes (the `members` answer): in a direct conversation and
        a group of at most the welcome's `receipt_audience` members, yes; in a channel and a
        bigger group only as an owner or admin (PROTOCOL.md §9); a requests-only client
        (`deliver=False`) in none. Where it is not, ask `receipts`. A broker that does not
        say its bound (from before 2026-12-05) is taken to push to every member of a group,
        as it did."""
        if not self.deliver:  # a requests-only client is pushed nothing (PROTOCOL.md §9)
            return False
        if members.kind == "direct":
            return True
        me = self.welcome.user if self.welcome is not None else self.user
        if me in members.owners or me in members.admins:
            return True
        if members.kind == "channel":
            return False
        bound = self.welcome.receipt_audience if self.welcome is not None else None
        size = len(members.owners) + len(members.admins) + len(members.members)
        return bound is None or size <= bound

    def _wake_push_waiters(self) -> None:
        self._push_event.set()
        self._push_event = trio.Event()

    # -- the connection -------------------------------------------------------------------------

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
            raise _refusal(exc) or exc from None
        stream: trio.abc.Stream | None = None
        try:
            # A broker that accepts but never answers (stopped with SIGSTOP, a balancer with no
            # backend behind it) must not hold the attempt, and the reconnect timeout, for ever.
            with trio.fail_after(limit):
                stream = await trio.open_tcp_stream(self.host, self.port)
                if self.tls is not None:
                    stream = trio.SSLStream(stream, self.tls, server_hostname=self.host)
                await stream.send_all(hello)
                try:
                    welcome = await _next_frame(stream, conn)
                except wire.RemoteProtocolError as exc:
                    raise ConnectionLost(f"it does not speak homing's protocol ({exc.message}, "
                                         "before a welcome): is this the broker's port?") from None
            if isinstance(welcome, wire.Error):
                raise ClientError(welcome.code, welcome.name, welcome.message)
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
        self.welcome, self.user = welcome, welcome.user
        self._last_rx = time.monotonic()
        # A restore after which as many entries arrived as it lost leaves the head where it
        # was; one that lost an ack it said was on disk is told by that.
        flushed: list[_Request] = []
        try:
            if self.deliver:  # a requests-only client has no cursor of its own to go back
                # Its own ack counts as had: `ack(welcome.head)` passes over a backlog not
                # yet sent, and sent again, cut to a restored head, it would ack new entries.
                if (welcome.head < max(self._yielded, self._acked)
                        or welcome.acked < self._durable):
                    self._inbox_went_back(welcome)  # on_inbox_reset may raise: close the stream
                self._yielded = max(self._yielded, welcome.acked)
            async with self._send_lock:
                if self._closed:  # closed while we connected: serve nothing
                    raise ClientClosed("the client is closed")
                # Published under the lock, with the pending requests looked at in the same
                # step: one made before is sent here (it saw no connection), one made after
                # waits for the lock and sends itself. Neither is sent twice.
                self._stream, self._conn = stream, conn
                self._early.clear()  # the last connection's, never to be read
                out = []
                if self._acked > welcome.acked:
                    out.append(conn.send(wire.Ack(upto=min(self._acked, welcome.head))))
                for req in sorted(self._pending.values(), key=lambda r: r.frame.id):
                    # Resent if safe to repeat; sent if never sent (made while disconnected).
                    if req.sent and not req.repeatable(welcome.caps):
                        # The drop failed most; one whose cap this broker lacks fails here.
                        _fail_requests([req], ConnectionLost, DROPPED)
                        continue
                    if req.required and req.needs not in welcome.caps:  # made while away
                        req.error = _lacks(req.needs)
                        req.event.set()
                        continue
                    req.resent, req.sent, req.caps = req.sent, True, welcome.caps
                    flushed.append(req)
                    try:
                        out.append(conn.send(req.frame))
                    except wire.LocalProtocolError as exc:  # made while disconnected
                        req.error = _refusal(exc, req.frame, welcome) or exc
                        req.event.set()
                if out:
                    data = b"".join(out)
                    # Bounded as every other write: a broker that stops reading right after
                    # its welcome must not hold the connection task (and every request).
                    with trio.move_on_after(WRITE_STALL_S + len(data) / SLOWEST_LINK_BPS) as st:
                        await self._resend(stream, data)
                    if st.cancelled_caught:
                        raise ConnectionLost("the broker did not take the resend")
        except BaseException:  # cancelled, or the new connection broke: do not keep it
            self._stream = self._conn = None
            # The requests not to be repeated that this resend carried may have gone out.
            _fail_requests([r for r in flushed if not r.repeatable()], ConnectionLost, DROPPED)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise
        self.connected.set()

    async def _resend(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Write `data`, the requests resent on a new connection, while reading what the broker
        sends meanwhile into `_early` (for the reader, which starts after). The broker reads
        at most --max-inflight-requests ahead of the answers it writes: with thousands resent,
        a resend that read nothing until it was written waited for the broker, which waited
        for its answers to be read, until the client gave up. A read that fails stops the
        reading alone: the reader meets the same end of the stream.

        A broker that closes the connection as the resend is written (a bye: replaced; a
        closing error; answers, then EOF) breaks the write: what it sent is read to the end of
        the stream, and the reader hands it over (a replaced client must not reconnect and
        replace the other). Raises the write's error only if the broker sent nothing."""
        early = self._early
        broken: OSError | trio.BrokenResourceError | None = None

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
                    await stream.send_all(data)
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

    def _inbox_went_back(self, welcome: wire.Welcome) -> None:
        """The inbox went back: the broker was restored from a backup (or serves another data
        directory). Its cursor is the truth now: start from what it says this device acked, or
        its new entries, at inbox_seqs this client saw before, would be dropped as seen, and
        the ack of what it had would skip them. The inbox_seqs of the old inbox name other
        entries now: its deliveries still queued are dropped (handed over, they were acked as
        the new entries), and an ack of one the caller holds is refused (StaleDelivery), the
        durable ones waiting to be resent too."""
        before = max(self._yielded, self._acked)
        dropped = 0
        while True:
            try:
                self._deliveries._channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            dropped += 1
        self.inbox_resets += 1
        self._yielded = self._acked = self._handed = self._durable = welcome.acked
        self._taken.clear()
        self._done.clear()
        self._undone.clear()
        self._ready = 0
        self._acking.clear()  # their inbox_seqs name other entries now
        for rid, req in list(self._pending.items()):
            if isinstance(req.frame, wire.Ack) and req.frame.upto > welcome.acked:
                del self._pending[rid]  # not resent below
                req.error = StaleDelivery("ack", req.frame.upto)
                req.event.set()
        if self.on_inbox_reset is not None:
            self.on_inbox_reset(InboxReset(before, welcome.head, welcome.acked, dropped))

    def _dropped(self) -> None:
        self._stream = self._conn = None
        self.connected = trio.Event()
        # One never sent is sent on the next connection; one sent may have been carried out.
        _fail_requests([r for r in self._pending.values() if r.sent and not r.repeatable()],
                       ConnectionLost, DROPPED)

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
            cause = exc.__cause__ if str(exc) == "" and exc.__cause__ is not None else exc
            if first and isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME:
                raise UnknownHost(f"cannot reach {self.host}:{self.port}: no such host "
                                  f"({cause.strerror or cause})") from None
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise NotTrusted(f"TLS: the broker's certificate is not trusted: "
                                 f"{cause.verify_message or cause}") from None
            if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
                raise NotTls(f"TLS: {self.host}:{self.port} did not answer in TLS ({cause.reason}):"
                             f" it serves plaintext there, so connect without TLS, or start it "
                             f"with --tls-cert and --tls-key") from None
            return _attempt_error(cause)
        return None

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve the connection, reconnect, until closed or refused for good. However
        it ends (cancelled before open_client could hand the client over, say), the connection
        it holds is closed."""
        try:
            await self._connections(task_status)
        finally:
            stream, self._stream, self._conn = self._stream, None, None
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
        while not self._closed:
            try:
                error = await self._try_connect(self._time_left(started), first)
            except (ClientError, NotTrusted, NotTls, UnknownHost) as exc:
                self._fail(exc)
                if first:
                    task_status.started()
                return
            if self._closed:  # closed by the caller meanwhile (the attempt failed with it)
                return
            if error is None:
                if self._closed or self._stream is None:  # closed as the connection opened
                    return
                if first:
                    task_status.started()
                    first = False
                else:
                    self.reconnects += 1
                opened = time.monotonic()
                error = await self._serve()
                if self._fatal is not None or self._closed:  # refused for good, or closed by us
                    return
                if not self.reconnect:
                    self._fail(ConnectionLost("the connection dropped"))
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
                self._fail(self._gave_up(error))
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
        self._dropped()
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
        """Ping every `every` s; drop a connection silent for 3 x `every` (a frozen broker)."""
        every = max(1, every)
        while True:
            await trio.sleep(every)
            if time.monotonic() - self._last_rx > DEAD_AFTER_HEARTBEATS * every:
                stream = self._stream
                if stream is not None:
                    await trio.aclose_forcefully(stream)  # the reader fails and we reconnect
                return
            if not await self._write_quietly(wire.Ping()):
                return

    async def _write_quietly(self, frame: Any) -> bool:
        """Write a frame of our own (a ping, a pong); False once the client stopped or closed,
        which is not the heartbeat's or the reader's error to raise."""
        try:
            await self._write_frame(frame)
        except (ConnectionLost, ClientError):
            return False
        return True

    async def _reader(self) -> None:
        stream, conn, early = self._stream, self._conn, self._early
        while True:
            frame = await _next_frame(stream, conn, early)
            self._last_rx = time.monotonic()
            if frame is None:
                return
            if isinstance(frame, wire.Bye):
                if frame.reason == wire.BYE_REPLACED:
                    self._fail(Replaced(f"device {self.device!r} connected again elsewhere; "
                                        "this client stopped (use one device name per process)"))
                return
            if isinstance(frame, wire.Deliver):
                # A requests-only client of a broker without the cap drops them: unacked,
                # they wait for the device's next delivering session.
                if frame.inbox_seq > self._yielded and self.deliver:
                    self._yielded = frame.inbox_seq
                    self._served += 1
                    await self._deliveries_in.send(frame)
            elif isinstance(frame, wire.Receipt | wire.Status | wire.TypingNotice):
                if not self.deliver:
                    continue  # as deliveries (a broker without the cap): none can be taken
                self._pushes.append(frame)
                self._served += 1
                self._wake_push_waiters()
            elif isinstance(frame, wire.Error):
                if frame.close:
                    error = ClientError(frame.code, frame.name, frame.message)
                    # too_large: a delivery above the broker's own max_frame (the SDK asks for
                    # no less), which a reconnect would meet again at once.
                    if frame.name in ("unauthorized", "unsupported_version", "too_large"):
                        self._fail(error)
                    self._closed_by = error
                    return
                req = self._pending.get(frame.id) if frame.id is not None else None
                if req is not None:
                    req.error = ClientError(frame.code, frame.name, frame.message)
                    self._served += 1
                    req.event.set()
            elif isinstance(frame, wire.Ping):
                if not await self._write_quietly(wire.Pong(id=frame.id)):
                    return
            else:
                req = self._pending.get(getattr(frame, "id", None))
                if req is not None:
                    req.reply = frame
                    self._served += 1
                    req.event.set()

    def _fail(self, exc: BaseException) -> None:
        self._fatal = exc
        for req in list(self._pending.values()):
            if req.event.is_set():  # answered already (in the read that also stopped us)
                continue
            req.error = exc
            req.event.set()
        self._deliveries_in.close()
        self._wake_push_waiters()
        self.connected.set()

    async def aclose(self) -> None:
        """Say bye, close the connection, and end the deliveries quietly (not as a failure);
        requests still waiting, and any made later, raise ClientClosed.

        A cancel cuts short the bye alone: the client is closed all the same. A second call
        returns once the first one closed it."""
        if self._closed:
            await self._close_done.wait()
            return
        self._closed = True
        stream, conn = self._stream, self._conn
        self._stream = self._conn = None
        try:
            if self._fatal is None and stream is not None and conn is not None:
                with trio.move_on_after(1):
                    try:
                        data = conn.send(wire.Bye(reason="client closing"))
                        async with self._send_lock:
                            await stream.send_all(data)
                    except (wire.ProtocolError, trio.BrokenResourceError,
                            trio.ClosedResourceError, OSError):
                        pass
        finally:
            # Whatever ended the bye, and with no await but the shielded one: in a cancelled
            # scope (the `finally:` of a task being cancelled) the close stopped at its first
            # checkpoint, the connection left open and every waiting task waiting for ever.
            _fail_requests(list(self._pending.values()), ClientClosed,
                           "the client was closed before the broker answered")
            self._deliveries_in.close()
            self._wake_push_waiters()
            try:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
            finally:
                self._close_done.set()


class Deliveries:
    """A client's deliveries as a receive channel: `await receive()`, or `async for`.

    Once the client is closed they end quietly (EndOfChannel; the loop stops). Once the client
    gave up (broker unreachable past the reconnect timeout, session replaced, token refused)
    they raise that error, after the deliveries received before it: a loop over them must not
    mistake a lost broker for the end of the work.
    """

    def __init__(self, client: Client, channel: trio.MemoryReceiveChannel[wire.Deliver]) -> None:
        self._client, self._channel = client, channel

    async def receive(self) -> wire.Deliver:
        """The next delivery; EndOfChannel after a close, the client's error after a failure."""
        try:
            return self._taken(await self._channel.receive())
        except trio.EndOfChannel:
            self._raise_failure()
            raise

    def receive_nowait(self) -> wire.Deliver:
        """The next delivery if one is waiting (trio.WouldBlock if not); else as `receive`."""
        try:
            return self._taken(self._channel.receive_nowait())
        except trio.EndOfChannel:
            self._raise_failure()
            raise

    def _taken(self, d: wire.Deliver) -> wire.Deliver:
        client = self._client
        client._taken[d.inbox_seq] = _entry(d)  # for `done`, to tell it from another inbox's
        client._undone.append(d.inbox_seq)
        client._handed = d.inbox_seq
        return d

    def _raise_failure(self) -> None:
        if self._client._fatal is not None:
            raise self._client._fatal from None

    def __aiter__(self) -> Deliveries:
        return self

    async def __anext__(self) -> wire.Deliver:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


def _entry(d: wire.Deliver) -> tuple:
    """What tells the delivery `d` from a delivery of another inbox at its inbox_seq (one of
    the inbox a restored broker has), without its body: the fields the broker sets for each
    entry, its time in microseconds among them."""
    return d.kind, d.conv, d.seq, d.sender, d.cid, d.ts


@dataclass
class _Acking:
    """An ack `done` makes: `over` once it returned or raised; `made` if it returned, `error`
    what it raised (None if cancelled)."""

    over: trio.Event = field(default_factory=trio.Event)
    made: bool = False
    error: BaseException | None = None


class _Closed(Exception):
    """A session that ended soon, having served nothing; `error`: the broker's closing error
    (None: the connection just ended)."""

    def __init__(self, message: str, error: ClientError | None) -> None:
        super().__init__(message)
        self.error = error


def _fail_requests(requests: list[_Request], error: type[ConnectionLost], message: str) -> None:
    """Fail each request still waiting with its own `error(message)`."""
    for req in requests:
        if req.error is None and req.reply is None:
            req.error = error(message)
            req.event.set()


def _with_cid(exc: ConnectionLost | ClientError, cid: str) -> ConnectionLost | ClientError:
    """A copy of `exc`, of its type and with its fields, whose `.cid` is `cid`. A copy: the
    same instance may be raised to many requests at once (`_fail` hands every waiting request
    the error that stopped the client, and `_check_usable` raises it again to later calls),
    each send with a cid of its own. Made without calling `__init__`, whose arguments differ
    from class to class (ClientError's code, name, message)."""
    copy = type(exc).__new__(type(exc), *exc.args)
    copy.__dict__.update(exc.__dict__)
    copy.cid = cid
    return copy.with_traceback(exc.__traceback__)


def _lacks(cap: str | None) -> ClientError:
    """The refusal of a create with the caller's cid by a broker without the cap `cap`."""
    return ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                       f"create: bad value for field 'cid': this broker ignores a create's cid "
                       f"(its welcome lacks the {cap!r} cap: it is from before 2026-12-05), so "
                       "a create run again with it would make another conversation; upgrade "
                       "the broker, or leave the cid out")


def _refusal(exc: wire.LocalProtocolError, frame: Any = None,
             welcome: wire.Welcome | None = None) -> ClientError | None:
    """The error for a request our own protocol checks refused before sending it (a field out
    of range, a body or frame too large): "invalid", as the broker would answer. None when the
    connection's state refused it (bye or a closing error arrived): that frame goes again after
    the reconnect."""
    if exc.code == wire.ErrorCode.INTERNAL:
        return None
    message = exc.message
    if (exc.code == wire.ErrorCode.TOO_LARGE and isinstance(frame, wire.Send)
            and welcome is not None and welcome.max_body is not None  # None: an older broker
            and not fields.body(frame.body, welcome.max_body)):
        # A broker's max_frame holds a delivery of its largest body (Config), so a send frame
        # past it holds a body past max_body: name that limit, as the broker's refusal of a
        # smaller body over it does ("send frame of N bytes exceeds max_frame" said neither).
        message = ("send: bad value for field 'body': "
                   f"{fields.explain(fields.body, frame.body, welcome.max_body)}")
    return ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name, message)


async def _next_frame(stream: trio.abc.Stream, conn: wire.Connection,
                      early: deque[bytes] | None = None) -> Any:
    """The next frame from `stream` (from the bytes in `early` first, read before), or None at
    EOF."""
    while True:
        event = conn.next_event()
        if event is wire.CLOSED:
            return None
        if event is not wire.NEED_DATA:
            return event
        data = early.popleft() if early else await stream.receive_some(RECEIVE_BYTES)
        conn.receive_data(data)


@asynccontextmanager
async def open_client(server: str = DEFAULT_SERVER, token: str = "", device: str = "cli", *,
                      tls: ssl.SSLContext | None = None, reconnect: bool = True,
                      reconnect_timeout: float | None = 30.0,
                      max_pushes: int = 10000,
                      on_unreachable: Callable[[str], None] | None = None,
                      on_inbox_reset: Callable[[InboxReset], None] | None = None,
                      start: str = "first", deliver: bool = True) -> AsyncIterator[Client]:
    """Connect (raising ClientError or ConnectionLost if that fails) and yield a Client.

    `on_unreachable(reason)` is called at the first failed attempt of each outage (the broker
    not reachable at first, or after a drop) when the client goes on trying; not when it gives
    up, which raises or stops the client as ever.

    `on_inbox_reset(InboxReset)` is called when a reconnect finds the inbox went back (the
    broker restored from an older backup): deliveries start over after the restored ack, and
    those taken before are stale (StaleDelivery if acked).

    `start="head"`: if the broker has no cursor for this device (a new device id), it starts
    after the user's inbox head as of the connect: it is sent only the entries that come after
    (`welcome.acked` is that head). A device the broker knows resumes after its last ack
    whatever `start` says. A broker without the `start_head` cap (`client.welcome.caps`)
    ignores it and sends the whole inbox. "first" (the default): the whole inbox.

    `deliver=False`: a requests-only client of the device (sends, changes, queries): the broker
    sends it no deliveries and no pushes, it ends no session of the device and none ends it,
    and it does not make the user online; its sends are the device's own all the same (the
    device's delivering session is not sent them). `deliveries()`, `ack`, `done` and
    `next_push` raise ClientError "invalid" at once. Every hello asks it, a reconnect's too.
    A broker without the `requests_only` cap (`client.welcome.caps`) ignores it: the session
    is then the device's delivering one and replaces the one the device had (what it is sent
    is dropped unread, and waits, unacked, for the device's next session)."""
    client = Client(server, token, device, tls=tls, reconnect=reconnect,
                    reconnect_timeout=reconnect_timeout, max_pushes=max_pushes,
                    on_unreachable=on_unreachable, on_inbox_reset=on_inbox_reset, start=start,
                    deliver=deliver)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            if client._fatal is not None:
                raise client._fatal
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                # Cancel last, with nothing awaited after it: an await in a cancelled scope would
                # raise Cancelled here and hide the caller's exception.
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None


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


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside our nursery's group, or the group itself. Only that one level:
    a group the caller's own code raised inside the block comes out as it was raised."""
    return group.exceptions[0] if len(group.exceptions) == 1 else group
