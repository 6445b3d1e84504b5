"""What a durable batch does for the connected: the committer's two hooks into the broker.

The committer runs each batch's replies and fan-out inside `deferred_writes`, and calls
`on_committed` with the batch's commands and outcomes: membership changes go to the cached
rosters first (broker/roster.py), then the inboxes that grew wake their sessions (broker/hub.py)
and receipts are pushed to their audience; the posts' sizes go to the batch weights
(broker/weight.py). Sessions touched meanwhile write once, at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import protocol as wire
from broker.errors import CloseReason
from broker.hub import Fresh, encode_push
from storage.commands import SetMute, SetRole
from storage.errors import StorageError

if TYPE_CHECKING:
    from broker.server import Broker


@contextlib.contextmanager
def deferred_writes(broker: Broker) -> Iterator[None]:
    """Around one batch's replies and fan-out: then write to every touched session."""
    broker.deferring = True
    try:
        yield
    finally:
        broker.deferring = False
        deferred, broker.deferred = broker.deferred, []
        for session in deferred:
            try:
                session.flush_now()
            except Exception:  # one session's failure must not stop the others' writes
                session.log.exception("fanout_flush_failed")
                session.abort(CloseReason.BROKEN)


def on_committed(broker: Broker, commands: list[Any], outcomes: list[Any]) -> None:
    hub = broker.hub
    # The batch's membership changes first, all of them: a failure below (one push)
    # must not leave a roster behind the store.
    weights = broker.weights
    for command, outcome in zip(commands, outcomes, strict=True):
        if outcome.error is None:
            for conv, user, role in outcome.effects.membership:
                broker.rosters.changed(conv, user, role)
                if role is None:
                    weights.left(conv)
                elif type(command) is not SetRole:  # (an invite, a join: a member more)
                    weights.joined(conv)
    for command, outcome in zip(commands, outcomes, strict=True):
        if outcome.error is not None:
            continue
        effects = outcome.effects
        if isinstance(command, SetMute):
            for session in hub.sessions(command.user):
                session.mute_changed(command.conv)
        if effects.inbox_heads:
            posted = effects.message  # (lsn, conv, seq, sender, device, body, cid, ts_us)
            hub.inbox_advanced(effects.inbox_heads, None if posted is None else Fresh(*posted))
            # What the next posts into this group or channel weigh in a batch (broker/
            # weight.py; a direct message's is fixed).
            if posted is not None and not posted[1].startswith("dm:"):
                broker.weights.posted(posted[1], len(effects.inbox_heads))
        for conv, user, kind, seq in effects.receipts:
            push_receipt(broker, conv, user, kind, seq)


def push_receipt(broker: Broker, conv: str, user: str, kind: str, seq: int) -> None:
    try:
        roster = broker.roster(conv)
    except StorageError as exc:  # pushes are ephemeral: this one is dropped, said why
        broker.log.error("push_dropped", user=user, conv=conv, push="receipt", reason=str(exc))
        return
    if user not in roster:
        # Gone by the end of the batch: the others no longer hear of this user's marks.
        # (An ack made while out of it is no receipt at all: storage.projections decides
        # that at the ack, since an invite in the same batch puts the user back in here.)
        return
    # A delivered mark goes to the others (the user's own devices need not hear of their
    # acks); a read mark to the user's devices too, so unread counts agree everywhere.
    # In channels, only those who post hear of others' marks; so in groups of more than
    # --receipt-audience-max members, where a post read by all n online is n x n pushes.
    # Only the members online are looked at: in a group of 10,000 with 100 online, each
    # receipt walked the 10,000 (0.56 ms of the event loop; a message read by all of them
    # is 10,000 receipts).
    if conv.startswith("chn:") or (conv.startswith("grp:")  # a direct one is two, always
                                   and roster.size > broker.config.receipt_audience_max):
        others = roster.posters
        inside = user in others
        if kind == "delivered":
            audience = [u for u in others if u != user] if inside else others
        else:
            audience = others if inside else [*others, user]
    else:  # the user is a member (above): the others hear of a delivery, all of a read
        audience = broker.hub.online_among(roster)
        if kind == "delivered":
            audience.discard(user)
    frame = (wire.Receipt(conv=conv, user=user, delivered=seq, read=None) if kind == "delivered"
             else wire.Receipt(conv=conv, user=user, delivered=None, read=seq))
    broker.hub.push(audience, encode_push(frame))
