"""The client SDK's requests in flight: each request waiting for its answer, the table of them
by id, and the rules of which go out again after a drop and which fail.

Split from broker/client.py (2026-12-06) because these rules are about the requests alone: a
request knows whether it was written, to a broker with which caps, and whether it is safe to
repeat; the table fails the ones that are not when a connection drops, and picks the ones to
resend, in the order they were made, on the next. The link (broker/client_link.py) owns the
table and decides when; nothing here does I/O (the resend's frames are encoded by the
connection passed in, sans-IO, and written by the link).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import protocol as wire
from broker.client_errors import ClientError, ConnectionLost, StaleDelivery
from protocol import fields

DROPPED = "the connection dropped before the broker answered"


@dataclass
class Request:
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


class InFlight:
    """The requests waiting for their answers, by request id (ids count up from 1, so their
    order is the order the requests were made)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Request] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, make: Callable[[int], Any], resend: bool, needs: str | None,
            required: bool) -> tuple[int, Request]:
        """A new request of the frame `make(id)`, waiting from now on; its id and itself."""
        rid = next(self._ids)
        req = self._pending[rid] = Request(make(rid), resend, needs=needs, required=required)
        return rid, req

    def discard(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def get(self, rid: int | None) -> Request | None:
        """The request waiting with id `rid`, if one is (an answer to a request given up on,
        or a frame with no id, has none)."""
        return self._pending.get(rid)

    def fail(self, exc: BaseException) -> None:
        """Raise `exc` to every request not answered yet (the client stopped for good)."""
        for req in list(self._pending.values()):
            if req.event.is_set():  # answered already (in the read that also stopped us)
                continue
            req.error = exc
            req.event.set()

    def close(self, error: type[ConnectionLost], message: str) -> None:
        """Fail every request still waiting with its own `error(message)` (the client closed)."""
        fail_requests(list(self._pending.values()), error, message)

    def dropped(self) -> None:
        """The connection dropped: fail the requests written to it that are not to be repeated.
        One never sent is sent on the next connection; one sent may have been carried out."""
        fail_requests([r for r in self._pending.values() if r.sent and not r.repeatable()],
                      ConnectionLost, DROPPED)

    def fail_acks_above(self, acked: int) -> None:
        """The inbox went back to `acked`: the durable acks past it name other entries now, so
        they are refused (StaleDelivery) and taken out, not resent."""
        for rid, req in list(self._pending.items()):
            if isinstance(req.frame, wire.Ack) and req.frame.upto > acked:
                del self._pending[rid]  # not resent below
                req.error = StaleDelivery("ack", req.frame.upto)
                req.event.set()

    def resend(self, conn: wire.Connection, welcome: wire.Welcome, out: list[bytes],
               flushed: list[Request]) -> None:
        """On a new connection `conn` (welcomed with `welcome`), the bytes of each waiting
        request to write, onto `out`, in the order they were made: resent if safe to repeat,
        sent if never sent (made while disconnected). The others fail here. Each one written
        goes onto `flushed` as it is, for the caller to fail should the write break."""
        for req in sorted(self._pending.values(), key=lambda r: r.frame.id):
            if req.sent and not req.repeatable(welcome.caps):
                # The drop failed most; one whose cap this broker lacks fails here.
                fail_requests([req], ConnectionLost, DROPPED)
                continue
            if req.required and req.needs not in welcome.caps:  # made while away
                req.error = lacks(req.needs)
                req.event.set()
                continue
            req.resent, req.sent, req.caps = req.sent, True, welcome.caps
            flushed.append(req)
            try:
                out.append(conn.send(req.frame))
            except wire.LocalProtocolError as exc:  # made while disconnected
                req.error = refusal(exc, req.frame, welcome) or exc
                req.event.set()


def fail_requests(requests: list[Request], error: type[ConnectionLost], message: str) -> None:
    """Fail each request still waiting with its own `error(message)`."""
    for req in requests:
        if req.error is None and req.reply is None:
            req.error = error(message)
            req.event.set()


def lacks(cap: str | None) -> ClientError:
    """The refusal of a create with the caller's cid by a broker without the cap `cap` (or of
    another request that needs a cap: a later page of `receipts` or `members`)."""
    if cap != wire.CAP_CREATE_CID:
        return ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                           f"this broker's welcome lacks the {cap!r} cap (it is older than "
                           "the one that answered the first part): call again")
    return ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                       f"create: bad value for field 'cid': this broker ignores a create's cid "
                       f"(its welcome lacks the {cap!r} cap: it is from before 2026-12-05), so "
                       "a create run again with it would make another conversation; upgrade "
                       "the broker, or leave the cid out")


def refusal(exc: wire.LocalProtocolError, frame: Any = None,
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
