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

This module holds what a service uses: `open_client`, `Client` and its request methods (each
makes a frame and waits for its answer), `Deliveries`, `new_cid`, `parse_server`. Behind
`Client`, each part owns its state: the link to the broker, broker/client_link.py (the
connection, the reader, reconnecting and resending), with one stream's plumbing in
broker/client_stream.py and the requests in flight in broker/client_inflight.py; the inbox
cursor, broker/client_inbox.py (deliveries and pushes queued, what was taken, done and acked);
the exceptions, broker/client_errors.py.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

import protocol as wire
from broker import client_inbox, client_link
from broker.client_errors import (
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
from broker.client_inbox import InboxReset

# The `X as X` imports: the link's constants, importable from here as they were before the
# split (2026-12-06). They are read where they are defined: setting one here changes nothing.
from broker.client_inflight import DROPPED as DROPPED
from broker.client_link import CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from broker.client_link import DEAD_AFTER_HEARTBEATS as DEAD_AFTER_HEARTBEATS
from broker.client_link import MIN_ATTEMPT_S as MIN_ATTEMPT_S
from broker.client_link import RETRYABLE as RETRYABLE
from broker.client_link import STABLE_AFTER_S as STABLE_AFTER_S
from broker.client_stream import RECEIVE_BYTES as RECEIVE_BYTES
from broker.client_stream import SLOWEST_LINK_BPS as SLOWEST_LINK_BPS
from broker.client_stream import WRITE_STALL_S as WRITE_STALL_S
from protocol import (
    BrokerStats,
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
    "BrokerStats",
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


class _Held:
    """An attribute of `Client` that one of its parts holds (`of`: "_link" or "_inbox"), read
    and written there under the client's name: the link changes them as it goes (a new
    welcome, a new `connected` event after each drop), so the client keeps no copy."""

    def __init__(self, of: str, name: str | None = None) -> None:
        self.of, self.name = of, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        return self if client is None else getattr(getattr(client, self.of), self.name)

    def __set__(self, client: Any, value: Any) -> None:
        setattr(getattr(client, self.of), self.name, value)


def _next_after(what: str, page: Any, ids: list[str], after: str, listed: int) -> str:
    """The `after` of the page that follows `page`, a `what` reply (asked with `after`, `more`
    true) listing the members `ids`; `listed` members so far, this page's among them. A page
    that would not move the paging on (no member, a `last` that is not its last member, or
    not after `after`) is a broker's bug: ClientError `internal`, rather than ask for ever or
    list a member twice."""
    # Ids are ASCII: str order is the broker's byte order.
    if ids and page.last == max(ids) and min(ids) > after:
        return page.last
    raise ClientError(wire.ErrorCode.INTERNAL, wire.ErrorCode.INTERNAL.wire_name,
                      f"{what}: the broker's page after {after!r} (more: true, last: "
                      f"{page.last!r}, {len(ids)} members, {listed:,} so far) does not move on "
                      "to the next page: a broker's bug; nothing more is asked")


def _merged_fit(frame: str, *lists: list[str]) -> None:
    """Raise ClientError `limit_exceeded` when a merged list of a paged `frame` reply holds
    more than MAX_USER_LIST ids, as the broker refuses the whole answer (a conversation grown
    under a broker whose --max-members had no bound, before 2026-12-06): the merged answer is
    the whole one, whatever the page sizes. It bounds too what a broker's pages make the SDK
    hold."""
    most = max(map(len, lists))
    if most > fields.MAX_USER_LIST:
        raise ClientError(wire.ErrorCode.LIMIT_EXCEEDED, wire.ErrorCode.LIMIT_EXCEEDED.wire_name,
                          f"the {frame} answer would list {most:,} users or more (its "
                          f"pages so far), over the {fields.MAX_USER_LIST:,} a list of the "
                          "protocol holds")


class Client:
    """One device's connection to the broker; build it with `open_client`."""

    # The settings, the last welcome and the connection's state are the link's; the number
    # of inbox resets the inbox's.
    host = _Held("_link")
    port = _Held("_link")
    token = _Held("_link")
    device = _Held("_link")
    tls = _Held("_link")
    start = _Held("_link")
    deliver = _Held("_link")
    reconnect = _Held("_link")
    reconnect_timeout = _Held("_link")
    on_unreachable = _Held("_link")
    on_inbox_reset = _Held("_link")
    welcome = _Held("_link")  # the last welcome
    user = _Held("_link")
    connected = _Held("_link")  # set while connected (a new event after each drop)
    reconnects = _Held("_link")  # sessions opened after the first
    inbox_resets = _Held("_inbox", "resets")  # times the inbox went back (a restore)

    def __init__(self, server: str, token: str, device: str, *, tls: ssl.SSLContext | None,
                 reconnect: bool, reconnect_timeout: float | None, max_pushes: int,
                 on_unreachable: Callable[[str], None] | None = None,
                 on_inbox_reset: Callable[[InboxReset], None] | None = None,
                 start: str = "first", deliver: bool = True) -> None:
        host, port = parse_server(server)
        # Checked here: the codec refuses any other value in the hello but None, which it
        # leaves off the wire, so that the broker opened a delivering session (replacing the
        # device's) while this client dropped what it was sent as a requests-only one.
        if not isinstance(deliver, bool):
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"hello: bad value for field 'deliver': {deliver!r} is not "
                              f"true or false")
        self._inbox = client_inbox.Inbox(max_pushes)
        self._link = client_link.Link(
            host, port, token, device, tls=tls, reconnect=reconnect,
            reconnect_timeout=reconnect_timeout, on_unreachable=on_unreachable,
            on_inbox_reset=on_inbox_reset, start=start, deliver=deliver, inbox=self._inbox)
        self._deliveries = Deliveries(self, self._inbox.out)

    # -- requests -----------------------------------------------------------------------------

    def _check_delivers(self, what: str) -> None:
        """Raise ClientError "invalid" on a requests-only client (`deliver=False`): it is sent
        no deliveries and no pushes, and an ack on it is not its to make."""
        if not self.deliver:
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"{what}: this client takes no deliveries and no pushes "
                              f"(open_client(..., deliver=False)): open one that does, with "
                              f"the device's name, for them")

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
            return await self._link.request(
                lambda i: wire.Send(id=i, cid=cid, body=body, to=to, conv=conv))
        except (ConnectionLost, ClientError) as exc:
            if not _unsure(exc):
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
        self._link.check_usable()
        self._check_delivers("ack")
        inbox = self._inbox
        seq = inbox.ack_target(upto, "ack")
        inbox.check_ack(seq, self.welcome.head if self.welcome is not None else 0)
        resets = inbox.resets
        if durable:
            await self._link.request(lambda i: wire.Ack(upto=seq, id=i))
        else:
            await self._write_ack(seq, resets)
        if inbox.resets != resets:  # it went to the broker before the reset, or nowhere
            return
        inbox.acked_upto(seq, durable)

    async def _write_ack(self, seq: int, resets: int) -> None:
        """Write the plain ack of `seq`, unless an ack as far was made or is being written by
        another call: then wait for that one, and write this one only if it was not (cancelled
        before it went out). So two plain acks at once write each mark once, and never a lower
        one after a higher: each checked the last ack made, which is counted once written, and
        both went out (the same mark twice, or 4 then 3, on the wire). Nothing is written once
        the inbox went back during the wait (its count of resets no longer `resets`): `seq`
        names an entry of the old inbox, and written on the new connection it acked entries
        of the restored one that the caller never took."""
        inbox = self._inbox
        while seq > inbox.acked and (under_way := next(
                (a for a in inbox.plain_acks if a.upto >= seq), None)) is not None:
            await under_way.over.wait()  # made: `acked` is past `seq`; cancelled: look again
            if inbox.resets != resets:  # as an ack the drop caught in `write_frame`: unsent
                return
        if seq <= inbox.acked:
            return
        acking = client_inbox.Acking(upto=seq)
        inbox.plain_acks.append(acking)
        try:
            await self._link.write_frame(wire.Ack(upto=seq))
        finally:
            # `acked` moves (in `ack`) before any other task runs: a waiter sees it moved.
            inbox.plain_acks.remove(acking)
            acking.over.set()

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
        self._link.check_usable()
        self._check_delivers("done")
        upto = self._inbox.mark_done(self._inbox.ack_target(inbox_seq, "done"))
        if upto:
            await self._done_ack(upto, durable)

    async def _done_ack(self, upto: int, durable: bool) -> None:
        """`ack(upto)` for `done`, once: `upto` only grows (it is the inbox's `ready`), so an
        ack under way that covers it is one of the same `upto`, as durable or more. Waits for
        that one and ends as it did; makes it if there is none, or that one was cancelled."""
        under_way = self._inbox.acking  # the inbox's: a reset forgets them
        while (acking := under_way.get((upto, True))
               or (None if durable else under_way.get((upto, False)))) is not None:
            await acking.over.wait()
            if acking.made:
                return
            if acking.error is not None:
                raise acking.error
            self._link.check_usable()  # cancelled: made by the next one
        key = (upto, durable)
        acking = under_way[key] = client_inbox.Acking()
        try:
            await self.ack(upto, durable=durable)
            acking.made = True
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                acking.error = exc
            raise
        finally:
            if under_way.get(key) is acking:
                del under_way[key]
            acking.over.set()

    async def read(self, conv: str, upto: int) -> None:
        """Mark `conv` read up to conv seq `upto`."""
        await self._link.request(lambda i: wire.Read(conv=conv, upto=upto, id=i))

    async def history(self, conv: str, *, before: int | None = None, after: int | None = None,
                      limit: int = 50, order: str = "newest") -> wire.Page:
        """A page of `conv`'s messages."""
        return await self._link.request(lambda i: wire.History(
            id=i, conv=conv, before=before, after=after, limit=limit, order=order))

    async def receipts(self, conv: str, seq: int) -> wire.ReceiptList:
        """Who was delivered, who read, and who has not read message `seq` of `conv`, of its
        audience (the members other than its sender who have been members since before it was
        posted, without a break): the whole answer, each list in id order.

        From a broker whose welcome has the `receipts_paged` cap it is asked page by page,
        each as many members as fit the max_frame, and merged into one ReceiptList (`more`
        false). Each page is read at its own moment: a member who reads between two pages is
        counted as their page found them. From a broker without the cap (before 2026-12-07),
        one request: past its max_frame it is refused `limit_exceeded`. The first page goes
        to any broker (an older one answers it whole); a later one that a reconnect would send
        to a broker without the cap is not sent (ConnectionLost, or ClientError `invalid` if
        it was not written yet): that broker would answer the whole list again."""
        return await self._paged(
            "receipts", wire.CAP_RECEIPTS_PAGED,
            lambda i, after: wire.Receipts(id=i, conv=conv, seq=seq, after=after),
            ("delivered", "read", "unread"), ("read", "unread"))

    async def _paged(self, what: str, cap: str, make: Callable[[int, str | None], Any],
                     lists: tuple[str, ...], covers: tuple[str, ...]) -> Any:
        """The whole answer to the query `what`, `make(id, after)`: one request without
        `after` from a broker whose welcome lacks `cap`; else page by page, from `after` "",
        each page's user `lists` merged in order into the last page's reply (`more` false),
        a page's members being those of its `covers` lists. A later page is not sent to a
        broker without `cap` (after a reconnect), and a page that does not move on, or lists
        past MAX_USER_LIST, raises ClientError."""
        welcome = self.welcome
        if welcome is None or cap not in welcome.caps:
            return await self._link.request(lambda i: make(i, None))
        merged: dict[str, list[str]] = {name: [] for name in lists}
        after = ""
        while True:
            later = bool(after)
            page = await self._link.request(lambda i, after=after: make(i, after),
                                            needs=cap if later else None, required=later)
            for name in lists:
                merged[name] += getattr(page, name) or ()
            _merged_fit(type(page).TYPE, *merged.values())
            if not page.more:
                return page._replace(**{name: tuple(ids) for name, ids in merged.items()})
            ids = [m for name in covers for m in getattr(page, name) or ()]
            after = _next_after(what, page, ids, after,
                                sum(len(merged[name]) for name in covers))

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
        with it would make a second conversation.

        An error after which the conversation may have been created (as for `send`) carries
        the cid as `.cid`, where the broker's welcome has the `create_cid` cap: called again
        with it, the create returns the conversation made first, and makes no second one."""
        if isinstance(members, str):
            raise TypeError(f"members is a list of user ids, not the str {members!r}: "
                            f"[{members!r}] for one member")
        own = cid is not None  # the caller's: it must be honoured, or nothing is created
        cid = new_cid() if cid is None else cid
        try:
            reply = await self._link.request(lambda i: wire.Create(
                id=i, kind=kind, name=name, members=tuple(members or ()), open=open, cid=cid),
                needs=wire.CAP_CREATE_CID, required=own)
        except (ConnectionLost, ClientError) as exc:
            # A broker without the cap ignores the cid: a create again with it would be
            # refused (`Link.request`'s `needs`), so it is not named.
            honoured = self.welcome is not None and wire.CAP_CREATE_CID in self.welcome.caps
            if not honoured or not _unsure(exc):
                raise
            raise _with_cid(exc, cid) from exc.__cause__
        return reply.conv

    async def create_group(self, name: str, members=(), open: bool = False, *,
                           cid: str | None = None) -> str:
        return await self.create("group", name, members, open, cid=cid)

    async def create_channel(self, name: str, members=(), open: bool = False, *,
                             cid: str | None = None) -> str:
        return await self.create("channel", name, members, open, cid=cid)

    async def invite(self, conv: str, user: str, role: str = "member") -> None:
        await self._link.request(lambda i: wire.Invite(id=i, conv=conv, user=user, role=role))

    async def set_role(self, conv: str, user: str, role: str) -> None:
        """Make `user`, a member of `conv`, a plain "member" or an "admin" (by an owner or an
        admin). Resent after a reconnect like the others; stepping down yourself, whose resend
        is `forbidden` once the first try was carried out, then returns as done."""
        mine = self.welcome is not None and user == self.welcome.user and role == "member"
        await self._link.request(lambda i: wire.SetRole(id=i, conv=conv, user=user, role=role),
                            done_if_resent="forbidden" if mine else None)

    async def join(self, conv: str) -> None:
        await self._link.request(lambda i: wire.Join(id=i, conv=conv))

    async def leave(self, conv: str) -> None:
        """Leave `conv`. Resent after a reconnect, a leave the broker carried out the first time
        is answered `forbidden` (not a member any more): that is what leave asked for, so it
        returns instead of raising."""
        await self._link.request(lambda i: wire.Leave(id=i, conv=conv), done_if_resent="forbidden")

    async def remove(self, conv: str, user: str) -> None:
        """Take `user` out of `conv`, a group or channel (by an owner or an admin; owners are
        not removed). A user who is not a member is no error: so a remove the broker carried
        out before a reconnect returns when it is resent."""
        await self._link.request(lambda i: wire.Remove(id=i, conv=conv, user=user))

    async def subscribe(self, conv: str) -> None:
        await self._link.request(lambda i: wire.Subscribe(id=i, conv=conv))

    async def mute(self, conv: str, muted: bool = True) -> None:
        await self._link.request(lambda i: wire.Mute(id=i, conv=conv, muted=muted))

    async def revoke_tokens(self, user: str) -> int:
        """Revoke every token of `user` issued up to now (an admin token's right; others get
        `forbidden`). Returns `before`: tokens issued before that Unix second are refused from
        now on, and the user's sessions opened with one are closed with `unauthorized`; mint
        the user's new token once the clock has passed it. Not repeated after a reconnect (a
        repeat in a later second would also cut off tokens minted in between): a drop while it
        is on its way raises `ConnectionLost`, and asking again is safe."""
        reply = await self._link.request(lambda i: wire.Revoke(id=i, user=user), resend=False)
        return reply.before

    async def members(self, conv: str) -> wire.MemberList:
        """`conv`'s kind, name, and members by role (owners, admins, members): the whole
        answer, each list in id order.

        From a broker whose welcome has the `members_paged` cap it is asked page by page,
        each as many members as fit the max_frame, and merged into one MemberList (`more`
        false), as `receipts` is: each page read at its own moment, a member whose role
        changes between two pages listed in the role their page found. From a broker without
        the cap (before 2026-12-07), one request: past its max_frame, `limit_exceeded`."""
        return await self._paged(
            "members", wire.CAP_MEMBERS_PAGED,
            lambda i, after: wire.Members(id=i, conv=conv, after=after),
            ("owners", "admins", "members"), ("owners", "admins", "members"))

    async def conversations(self, *, after: str | None = None,
                            limit: int = 100) -> wire.ConvList:
        """A page of this user's conversations, in conv id order after `after`: each a
        `wire.ConvEntry` (kind, role, last_seq, read mark, muted, name; unread is
        `last_seq - read`). While `more`, page on with `after=` the last one's `conv`."""
        return await self._link.request(lambda i: wire.Convs(id=i, after=after, limit=limit))

    async def presence(self, conv: str) -> tuple[str, ...]:
        """The members of `conv` online now."""
        return (await self._link.request(lambda i: wire.Presence(id=i, conv=conv))).online

    async def typing(self, conv: str) -> None:
        await self._link.write_frame(wire.Typing(conv=conv))

    async def ping(self) -> None:
        await self._link.request(lambda i: wire.Ping(id=i))

    async def stats(self, user: str | None = None,
                    device: str | None = None) -> BrokerStats:
        """The broker's figures as they are now (an admin token's right; others get
        `forbidden`, and a broker from before 2026-12-06 `unknown_type`): docs/PROTOCOL.md
        `stats`. With `user` and `device`, the reply's `head` and `acked` say how far that
        device's deliveries are behind."""
        return await self._link.request(lambda i: wire.Stats(id=i, user=user, device=device))

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
        pushes = self._inbox.pushes
        while not pushes:
            self._link.check_usable()
            await self._inbox.wait_pushed()  # several tasks may wait: each wakes, one takes it
        return pushes.popleft()

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

    async def aclose(self) -> None:
        """Say bye, close the connection, and end the deliveries quietly (not as a failure);
        requests still waiting, and any made later, raise ClientClosed.

        A cancel cuts short the bye alone: the client is closed all the same. A second call
        returns once the first one closed it."""
        await self._link.aclose()


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
        """The next delivery; EndOfChannel after a close, the client's error after a failure.

        A delivery is marked taken in the step that takes it out of the queue, with no
        checkpoint between: a channel's own receive hands it over, then checkpoints (or, parked,
        is woken with it and runs later), and another taker handed a later one meanwhile could
        `done` it, acking this one before it was known to be taken (until 2026-12-06). The
        checkpoint after it is shielded: a cancel there does not lose the delivery taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                d = self.receive_nowait()
            except trio.WouldBlock:
                await self._client._inbox.wait_queued()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return d

    def receive_nowait(self) -> wire.Deliver:
        """The next delivery if one is waiting (trio.WouldBlock if not); else as `receive`."""
        try:
            return self._taken(self._channel.receive_nowait())
        except trio.EndOfChannel:
            self._raise_failure()
            raise

    def _taken(self, d: wire.Deliver) -> wire.Deliver:
        self._client._inbox.took(d)
        return d

    def _raise_failure(self) -> None:
        if self._client._link.fatal is not None:
            raise self._client._link.fatal from None

    def __aiter__(self) -> Deliveries:
        return self

    async def __anext__(self) -> wire.Deliver:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


def _unsure(exc: ConnectionLost | ClientError) -> bool:
    """Whether `exc`, raised by a request that carries a cid, leaves its outcome unknown: a
    ConnectionLost (of any kind), or a refusal named in UNSURE."""
    return isinstance(exc, ConnectionLost) or exc.name in UNSURE


def _with_cid(exc: ConnectionLost | ClientError, cid: str) -> ConnectionLost | ClientError:
    """A copy of `exc`, of its type and with its fields, whose `.cid` is `cid`. A copy: the
    same instance may be raised to many requests at once (`Link.fail` hands every waiting
    request the error that stopped the client, and `Link.check_usable` raises it again to later
    calls), each send with a cid of its own. Made without calling `__init__`, whose arguments
    differ from class to class (ClientError's code, name, message)."""
    copy = type(exc).__new__(type(exc), *exc.args)
    copy.__dict__.update(exc.__dict__)
    copy.cid = cid
    return copy.with_traceback(exc.__traceback__)


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
            await nursery.start(client._link.run)
            if client._link.fatal is not None:
                raise client._link.fatal
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


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside our nursery's group, or the group itself. Only that one level:
    a group the caller's own code raised inside the block comes out as it was raised."""
    return group.exceptions[0] if len(group.exceptions) == 1 else group
