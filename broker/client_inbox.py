"""The client SDK's side of a device's inbox: the deliveries and pushes received and not yet
taken, the cursor (what was received, taken, done, acked, acked durably), and starting over
when the broker's inbox went back (a restore from an older backup).

Split from broker/client.py (2026-12-06) because this state changes by rules of its own (an
ack is cumulative, `done` acks up to the first delivery not done, an inbox_seq from before a
reset names another entry) and is touched from two sides: the link (broker/client_link.py)
hands it what the reader receives and asks it, at each welcome, whether the inbox went back
and which ack to send again; `Client` (broker/client.py) asks it what an `ack` or `done` names
and tells it what was acked. It does no I/O and sends nothing: the acks go out through the
link, which `Client` drives.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

import protocol as wire
from broker.client_errors import ClientError, StaleDelivery


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


@dataclass
class Acking:
    """An ack `done` makes, or a plain ack being written (of `upto`): `over` once it returned
    or raised; `made` if it returned, `error` what it raised (None if cancelled)."""

    upto: int = 0
    over: trio.Event = field(default_factory=trio.Event)
    made: bool = False
    error: BaseException | None = None


def entry(d: wire.Deliver) -> tuple:
    """What tells the delivery `d` from a delivery of another inbox at its inbox_seq (one of
    the inbox a restored broker has), without its body: the fields the broker sets for each
    entry, its time in microseconds among them."""
    return d.kind, d.conv, d.seq, d.sender, d.cid, d.ts


class Inbox:
    """One client's deliveries and pushes on their way to the caller, and its inbox cursor."""

    def __init__(self, max_pushes: int) -> None:
        # Not bounded here: the broker's window bounds it (it sends no more unacked). A bound
        # below the window (65,536 against a --window above it) stopped the reader with the
        # answers behind the deliveries: a loop awaiting a call per delivery waited for ever.
        self._in, self.out = trio.open_memory_channel[wire.Deliver](math.inf)
        self.pushes: deque[Any] = deque(maxlen=max_pushes)
        self._push_event = trio.Event()
        # Set (and replaced) at each delivery queued and at the stop: the takers wait on it
        # rather than in the channel's receive (`Deliveries.receive`).
        self._queued_event = trio.Event()
        self.yielded = 0  # highest inbox_seq received (queued for the caller or taken)
        self.acked = 0  # highest inbox_seq the caller acked
        self.durable = 0  # highest inbox_seq of an ack the broker said it holds on disk
        # The deliveries the caller took from `deliveries()` and that are not acked yet, in
        # order, each by what tells it from a delivery of another inbox (`entry`: not its
        # body, which the caller may have dropped long before it acks), for `done` and to tell
        # one from before an inbox reset; those of them declared done; those of them from the
        # first not done on, in order, and the last before which every one taken is done
        # (`done` looks at each delivery once); the highest inbox_seq taken, since the last
        # reset; the acks `done` has under way, by (upto, durable), for a `done` that adds
        # nothing to one of them to wait for it rather than write it again (Client._done_ack
        # makes them; here so that a reset forgets them with the rest).
        self.taken: OrderedDict[int, tuple] = OrderedDict()
        self.done: set[int] = set()
        self.undone: deque[int] = deque()
        self.ready = 0
        self.handed = 0
        self.acking: dict[tuple[int, bool], Acking] = {}
        # The plain acks being written (`Client._write_ack`), for an ack that adds nothing to
        # one of them to wait for it rather than write its mark again, or a lower one after it.
        self.plain_acks: list[Acking] = []
        self.resets = 0  # times the inbox went back (a broker restored from a backup)

    # -- from the link ------------------------------------------------------------------------

    def went_back(self, welcome: wire.Welcome) -> bool:
        """Whether the welcome's inbox is behind this client's: a restore after which as many
        entries arrived as it lost leaves the head where it was; one that lost an ack it said
        was on disk is told by that. Its own ack counts as had: `ack(welcome.head)` passes over
        a backlog not yet sent, and sent again, cut to a restored head, it would ack new
        entries."""
        return welcome.head < max(self.yielded, self.acked) or welcome.acked < self.durable

    def start_over(self, welcome: wire.Welcome) -> InboxReset:
        """The inbox went back: the broker was restored from a backup (or serves another data
        directory). Its cursor is the truth now: start from what it says this device acked, or
        its new entries, at inbox_seqs this client saw before, would be dropped as seen, and
        the ack of what it had would skip them. The inbox_seqs of the old inbox name other
        entries now: its deliveries still queued are dropped (handed over, they were acked as
        the new entries), and an ack of one the caller holds is refused (StaleDelivery; the
        link refuses the durable ones waiting to be resent)."""
        before = max(self.yielded, self.acked)
        dropped = 0
        while True:
            try:
                self.out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            dropped += 1
        self.resets += 1
        self.yielded = self.acked = self.handed = self.durable = welcome.acked
        self.taken.clear()
        self.done.clear()
        self.undone.clear()
        self.ready = 0
        self.acking.clear()  # their inbox_seqs name other entries now
        return InboxReset(before, welcome.head, welcome.acked, dropped)

    def welcomed(self, welcome: wire.Welcome) -> None:
        """What the welcome says this device acked counts as received."""
        self.yielded = max(self.yielded, welcome.acked)

    def ack_to_resend(self, welcome: wire.Welcome) -> int | None:
        """The ack to send on a connection welcomed with `welcome`: the caller's, made while
        disconnected (or not yet on disk), if it is past the broker's; None if not."""
        if self.acked > welcome.acked:
            return min(self.acked, welcome.head)
        return None

    def is_new(self, d: wire.Deliver) -> bool:
        """Whether the delivery `d` is one this client has not received (a delivery sent again
        after a reconnect is not handed over twice); if so it is received from now on."""
        if d.inbox_seq > self.yielded:
            self.yielded = d.inbox_seq
            return True
        return False

    async def queue(self, d: wire.Deliver) -> None:
        """Queue the new delivery `d` for the caller."""
        await self._in.send(d)
        self._wake_takers()

    def pushed(self, frame: Any) -> None:
        """Queue a push (receipt, status, typing) for `next_push` (the oldest dropped past
        max_pushes)."""
        self.pushes.append(frame)
        self._wake_push_waiters()

    def stop(self) -> None:
        """No more deliveries nor pushes: the client stopped or was closed. Those queued are
        still taken; then the deliveries end and `next_push` raises."""
        self._in.close()
        self._wake_takers()
        self._wake_push_waiters()

    def _wake_takers(self) -> None:
        self._queued_event.set()
        self._queued_event = trio.Event()

    def _wake_push_waiters(self) -> None:
        self._push_event.set()
        self._push_event = trio.Event()

    # -- from the client ----------------------------------------------------------------------

    async def wait_queued(self) -> None:
        """Wait for the next delivery queued, or for the stop (several takers may wait: each
        wakes, and one takes it)."""
        await self._queued_event.wait()

    async def wait_pushed(self) -> None:
        """Wait for the next push, or for the stop (several tasks may wait: each wakes)."""
        await self._push_event.wait()

    def took(self, d: wire.Deliver) -> None:
        """The caller took the delivery `d` from `deliveries()`: in queue order, which is inbox
        order, since a receive marks a delivery taken in the step that takes it from the queue
        (`Deliveries.receive`; before 2026-12-06 it did so after a checkpoint, and two takers'
        marks could come in either order)."""
        self.taken[d.inbox_seq] = entry(d)  # for `done`, to tell it from another inbox's
        self.undone.append(d.inbox_seq)
        self.handed = d.inbox_seq

    def ack_target(self, upto: int | wire.Deliver, what: str) -> int:
        """The inbox_seq that `ack` or `done` of `upto` names; StaleDelivery for a delivery
        from before the inbox went back, or (after it went back) an inbox_seq beyond those
        taken since, which names an entry of the restored inbox the caller has not got."""
        if not isinstance(upto, wire.Deliver):
            if self.resets and upto > max(self.handed, self.acked):
                raise StaleDelivery(what, upto)
            return upto
        seq = upto.inbox_seq
        # One taken since the reset and not acked is held; one acked is no matter.
        if self.resets and seq > self.acked and self.taken.get(seq) != entry(upto):
            raise StaleDelivery(what, seq)
        return seq

    def check_ack(self, seq: int, head: int) -> None:
        """ClientError "invalid" for an ack of `seq` beyond the inbox entries this client knows
        of (the deliveries it had, the inbox `head` at welcome), or below 0 (after a reset,
        `ack_target` refused those beyond the deliveries taken since)."""
        if not self.resets:
            known = max(self.yielded, head)
            if not 0 <= seq <= known:
                raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                                  f"ack: cannot ack {seq}: the last inbox entry this client "
                                  f"knows of is {known}")
        elif seq < 0:
            raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                              f"ack: cannot ack {seq}")

    def acked_upto(self, seq: int, durable: bool) -> None:
        """An ack up to `seq` was made (`durable`: the broker holds it on disk)."""
        if durable:
            self.durable = max(self.durable, seq)
        self.acked = max(self.acked, seq)
        # Acked, done or not: `done` is past them. Only now: an ack that failed (the client
        # stopped, a durable ack refused or cancelled) leaves them to `done` again.
        taken, undone = self.taken, self.undone
        while taken and next(iter(taken)) <= seq:
            self.done.discard(taken.popitem(last=False)[0])
        while undone and undone[0] <= seq:
            undone.popleft()

    def mark_done(self, seq: int) -> int:
        """Declare the delivery `seq` done; the inbox_seq to ack now (the last before which
        every one taken is done, if not acked yet), or 0 for none. ClientError "invalid" for
        one not taken, or done before and with its ack made."""
        again = seq in self.done
        if seq in self.taken:
            self.done.add(seq)
            undone = self.undone
            while undone and undone[0] in self.done:  # each one leaves it once
                self.ready = undone.popleft()
            upto = self.ready if self.ready in self.taken else 0  # not acked yet
            # Done twice is a mistake, unless its ack is still to be made (it failed).
            if not again or upto >= seq:
                return upto
        raise ClientError(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                          f"done: {seq} is not a delivery taken from deliveries() "
                          f"and not yet done")
