"""What the broker does with each client frame: a table from frame type to handler.

Handlers are small. Commands that change state go to the group-commit coordinator with a
callback that queues the reply once durable; queries read the store and reply at once.
Every permission check that depends on state happens inside the commit (storage/rules.py), so
nothing races; queries check membership here, and answer `forbidden` alike for "not a member"
and "no such conversation", so nothing leaks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

import protocol as wire
from broker.errors import CloseReason, wire_error
from broker.stats import answer_stats
from protocol import encode_frame, fields
from protocol.frames import to_wire
from storage import commands as cmd
from storage.errors import InternalError, StorageError
from storage.rules import (
    MANAGERS,
    NO_ACCESS,
    REVOKE_ADMIN_ONLY,
    asked_conv,
    revocation_cut_off,
)

if TYPE_CHECKING:
    from broker.ratelimit import TokenBucket
    from broker.session import Session
    from storage.store import Store

# The frames and commands made for every message are built as `protocol.frames` decodes them,
# with tuple.__new__ and every field in order: a third of the time of the named tuple's own
# __new__ (0.27 -> 0.11 us, `timeit`, 2026-12-05). The orders they rely on:
_new = tuple.__new__
assert wire.Result._fields == ("id", "conv", "seq", "lsn", "cid", "dup")
assert cmd.SendMessage._fields == ("user", "device", "role", "cid", "body", "conv", "to")

# A page message's fields but its body, at their largest: keys, a 64-char user id, a cid of 128
# four-byte characters, three uints, the body's header.
PAGE_MESSAGE_BYTES = 640
# A conv_list entry at its largest: keys, a 160-char conv id, a name of 128 four-byte
# characters, kind, role, two uints and a bool.
CONV_ENTRY_BYTES = 800
# The longest a connection is left unread after a `read` its user's --read-rate refused: until
# the rate allows one again (0.2 ms at the default), but a low rate does not stall the
# connection's other requests, pings included, for seconds.
RATE_PAUSE_MAX_S = 0.01


def _command(session: Session, request_id: int | None, command: object, reply,
             after: Callable[[], None] | None = None) -> Any:
    """Submit `command`; once durable, queue the frame `reply(session, request_id,
    outcome.reply)` returns (no `reply`, or None from it: nothing) or the error; then call
    `after()` whatever the outcome (also when the command could not be submitted, or was
    passed over, past the connection's limit at a stop: `Session.pass_over`)."""
    if session.passing_over:
        session.pass_over()
        if after is not None:
            after()
        return None
    if _submit(session, request_id, command, reply, after) is None:
        return None
    return _held_back(session)


def _submit(session: Session, request_id: int | None, command: object, reply,
            after: Callable[[], None] | None = None) -> Any:
    """`_command` without the wait: the command's `Pending`, or None if it could not be
    submitted (answered `shutting_down`)."""
    committer = session.broker.committer
    session.inflight += 1
    try:
        if after is None:
            return committer.enqueue(command, _command_done, (session, request_id, reply))
        return committer.enqueue(command, _command_done_then,
                                 (session, request_id, reply, after))
    except Exception as exc:  # shutting down
        session.request_done()
        session.reply_error(request_id, wire.ErrorCode.SHUTTING_DOWN, str(exc))
        if after is not None:
            after()
        return None


def _held_back(session: Session) -> Any:
    """What a handler returns once its request awaits a commit: the wait while the connection
    has `max_inflight_requests` of them, else None."""
    if session.inflight >= session.broker.config.max_inflight_requests:
        return session.wait_inflight()
    return None


def _command_done_then(pending: Any) -> None:
    """`_command_done`, then the command's `after()` whatever its outcome."""
    session, request_id, reply, after = pending.context
    pending.context = (session, request_id, reply)
    try:
        _command_done(pending)
    finally:
        after()


def _command_done(pending: Any) -> None:
    session, request_id, reply = pending.context
    session.request_done()
    outcome = pending.outcome
    exc = pending.error or (outcome.error if outcome is not None else None)
    if exc is not None:
        code, message = wire_error(exc)
        if code is wire.ErrorCode.INTERNAL and not isinstance(exc, InternalError):
            # (an InternalError was logged once: batch_internal_error, or for one command's
            # rule, command_internal_error)
            session.log.error("command_failed", command=type(pending.command).__name__,
                              conv=getattr(pending.command, "conv", None), exc_info=exc)
        session.reply_error(request_id, code, message)
    else:
        done = outcome.reply
        if session.log_debug:  # its arguments cost about 0.4 us a command even when filtered
            # the conversation a send `to` a user or a create went to is the reply's
            conv = getattr(pending.command, "conv", None) or (
                done.get("conv") if isinstance(done, dict) else None)
            session.log.debug("command_done", command=type(pending.command).__name__,
                              conv=conv, lsn=outcome.lsn, reply=done)
        if reply is not None and (frame := reply(session, request_id, done)) is not None:
            session.reply(frame)


def _sent(session: Session, request_id: int, r: dict) -> wire.Result:
    # Its writer passes over it in the inbox without reading the log. An admin token may post
    # where it is no member: no inbox entry then, and the lsn would stay in the set for good.
    # Only a window's worth: the set only spares the log reads of entries the writer will pass
    # over anyway (it tells them by sender and device), and a device whose window is full
    # (it does not ack) would otherwise add one for each of its sends, for as long as it lives.
    # A requests-only session passes over nothing: it has no deliveries.
    if not r["dup"] and session.delivers and len(session.own_lsns) < session.window and (
            session.role != "admin" or _own_entry(session, r)):
        session.own_lsns.add(r["lsn"])
    return _new(wire.Result, (request_id, r["conv"], r["seq"], r["lsn"], r["cid"], r["dup"]))


def _own_entry(session: Session, r: dict) -> bool:
    """Whether the send `r` made an entry in the sender's own inbox (an admin token's only if
    it is a member; `_sent` asks only for those). A failed read says no: the send is durable and
    must be answered, and the set is only a saving (the writer then reads the entry, and passes
    over it all the same)."""
    if session.role != "admin":
        return True
    try:
        return session.broker.store.role(r["conv"], session.user) is not None
    except StorageError:
        return False


def _ok(session: Session, request_id: int, r: dict) -> wire.Ok:
    return wire.Ok(id=request_id, conv=r.get("conv"))


def _created(session: Session, request_id: int, r: dict) -> wire.Created:
    return wire.Created(id=request_id, conv=r["conv"], dup=r["dup"])


def _send_allowed(session: Session) -> bool:
    """Whether the connection's send rate and its user's both allow a send now; a token is
    spent from each only when both do, so a send refused by the user's rate does not count
    against the connection's."""
    now = time.monotonic()  # one clock read for both buckets
    if not session.sends.take(1.0, now):
        return False
    if not session.user_sends.take(1.0, now):
        session.sends.refund()
        return False
    return True


def _retry_ms(*buckets: TokenBucket) -> int | None:
    """The `retry_ms` of a `rate_limited` refusal by `buckets`: until all of them would allow
    the request (at least 1 ms); None where one never refills (a rate of 0)."""
    now = time.monotonic()
    wait = max(b.wait(1.0, now) for b in buckets)
    return None if wait == float("inf") else max(1, math.ceil(wait * 1000))


def on_send(session: Session, f: wire.Send) -> Any:
    # A send the rate, the content policy or the body limit refuses may be the resend of a
    # message accepted before (its answer lost with a connection, the policy changed or the
    # limit lowered since), or of one still on its way: that is a dup, and gets the first
    # result as ever; only the refusals pay for the lookup (`_refused`).
    broker = session.broker
    limit = broker.config.max_body_bytes
    if not fields.body(f.body, limit):  # the session's connection checked only its type
        why = fields.explain(fields.body, f.body, limit)
        return _refused(session, f, wire.ErrorCode.INVALID,
                        f"send: bad value for field 'body': {why}")
    if not _send_allowed(session):
        return _refused(session, f, wire.ErrorCode.RATE_LIMITED, "too many sends: slow down",
                        (session.sends, session.user_sends))
    body = f.body
    if broker.policy is not None:
        body, hit = broker.policy.apply(body)
        if hit and body is None:
            return _refused(session, f, wire.ErrorCode.REJECTED_CONTENT,
                            "the message contains a forbidden word")
    return _submit_send(session, f, body)


def _submit_send(session: Session, f: wire.Send, body: str | bytes) -> Any:
    return _command(session, f.id, _send_command(session, f, body), _sent)


def _send_command(session: Session, f: wire.Send, body: str | bytes) -> cmd.SendMessage:
    return _new(cmd.SendMessage,
                (session.user, session.device, session.role, f.cid, body, f.conv, f.to))


def _refused(session: Session, f: wire.Send, code: wire.ErrorCode, message: str,
             rates: tuple[TokenBucket, ...] = ()) -> Any:
    """Answer `f`, which the rate, the content policy or the body limit refuses, unless it
    repeats a message of its sender's: accepted (then it is submitted as it came, and the rules
    answer it as a dup), or perhaps on its way (any send queued or being committed): then it is
    asked again once those are done (since 2026-12-05; until then refused, and answered as a
    dup only when sent again). Counted meanwhile with the requests awaiting commit. A refusal
    by the send `rates` says when they allow a send again (`retry_ms`, as of the answer)."""
    store = session.broker.store

    def refuse() -> None:
        session.reply_error(f.id, code, message, retry_ms=_retry_ms(*rates) if rates else None)

    if store.sent(session.user, f.cid):
        return _submit_send(session, f, f.body)
    if session.passing_over:  # it would wait, counted, for the sends on their way
        return session.pass_over()

    def then(_failed: BaseException | None) -> None:
        session.request_done()
        session.repeats.pop(then, None)
        if session.closing:  # nobody to answer: nothing read, nothing submitted
            return
        try:
            sent = store.sent(session.user, f.cid)
        except StorageError as exc:
            session._read_failed(f, exc)  # as a handler's failed read is: unavailable
            return
        if sent:  # submitted only: the reader's wait for a free place is not ours to make
            _submit(session, f.id, _send_command(session, f, f.body), _sent)
        else:
            refuse()

    if not session.broker.committer.after_sends_on_way(session.user, then):
        refuse()
        return None
    session.inflight += 1  # `then` runs after a commit, never before this
    session.repeats[then] = (f.id, _send_command(session, f, f.body))
    return _held_back(session)


def answer_known_repeats(session: Session) -> None:
    """The broker is stopping, and half its --shutdown-grace passed with requests of
    `session` unanswered: answer each of its sends that waits (for its commit, or refused, for
    the sends on their way) and repeats a message durable before the batch now committing,
    with that message's `result` (`dup`), as its commit would; the rest get the closing
    `shutting_down` (until 2026-12-05 these too, though their answer was known). A message
    of the batch committing, durable maybe but not yet told, may be the send's own first: left."""
    broker = session.broker
    durable = broker.committer.committed_lsn
    waiting = [(p.context[1], p.command) for p in broker.committer.sends_on_way_of(session)]
    waiting += session.repeats.values()
    for request_id, send in waiting:
        try:
            first = broker.store.sent_as(send.user, send.cid)
        except StorageError:
            continue  # not known after all: `shutting_down`
        if first is None or first[2] > durable or first[0] != asked_conv(send):
            continue
        conv, seq, lsn = first
        session.reply(wire.Result(request_id, conv, seq, lsn, send.cid, True))
        session.log.debug("repeat_answered", conv=conv, lsn=lsn)


def on_ack(session: Session, f: wire.Ack) -> Any:
    committer = session.broker.committer
    if committer.closing:
        if f.id is not None:
            session.reply_error(f.id, wire.ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        return
    if f.id is not None and session.passing_over:  # not applied: the client acks again
        return session.pass_over()
    if not session.on_ack(f.upto):
        session.reply_error(f.id, wire.ErrorCode.INVALID,
                            f"cannot ack {f.upto}: the inbox ends at {session.head}")
        return
    if session.log_debug:
        session.log.debug("ack_received", upto=f.upto)
    if f.id is not None:  # `ok` once the device's acks are durable (PROTOCOL.md §5.2)
        request_id = f.id
        session.inflight += 1  # a shutdown answers it before it closes the session

        def answer(error: BaseException | None) -> None:
            session.request_done()
            if error is None:
                session.reply(wire.Ok(id=request_id, conv=None))
            else:
                session.reply_error(request_id, *wire_error(error))

        # An `upto` within the device's own sends, which moved the cursor at once but wait for
        # the next round of their durable ack (OWN_ACK_DELAY_S), would be answered before that
        # ack is durable, and lost in a crash: submit the waiting ack now, and answer after it.
        session.flush_due_own_ack()
        committer.when_acks_durable(session.user, session.device, answer)
        if session.inflight >= session.broker.config.max_inflight_requests:
            return session.wait_inflight()  # counted with the other requests awaiting commit
    return None


def on_ack_requests_only(session: Session, f: wire.Ack) -> None:
    """A requests-only session (`hello.deliver: false`, PROTOCOL.md §9) is sent no deliveries:
    an ack on it would move its device's cursor past entries it never had. Refused `invalid`,
    the session open still."""
    session.reply_error(f.id, wire.ErrorCode.INVALID,
                        "ack: this session takes no deliveries (its hello said deliver: false), "
                        "so it has none to ack: ack on the device's delivering session")


def on_read(session: Session, f: wire.Read) -> Any:
    """A read receipt, behind the user's `--read-rate`: past it the request is answered
    `rate_limited`, nothing is done, and the connection's next frame is read once the rate
    allows a read again (RATE_PAUSE_MAX_S at most). Each read is a command of the commits,
    whether its rules accept it, find it at or below the mark, or refuse it (a conversation
    the user is not in): until 2026-12-06 only --max-inflight-requests bounded a flood of them.

    Without the pause a flood is answered as fast as the event loop writes refusals, and the
    client sends faster than when its reads waited for their commits: 85,000 to 94,000 frames
    a second on 4 connections, the quiet user's p99 136 to 195 ms, against 50,000 to 71,000
    and 70 to 108 ms with no rate; with it, 13,000 to 15,000 and 33 to 51 ms
    (docs/OPERATIONS.md, "One noisy service beside quiet ones")."""
    bucket = session.user_reads
    if not bucket.take():
        session.reply_error(f.id, wire.ErrorCode.RATE_LIMITED,
                            "too many read receipts: slow down", retry_ms=_retry_ms(bucket))
        return session.pause(min(bucket.wait(), RATE_PAUSE_MAX_S))
    command = cmd.MarkRead(session.user, session.device, session.role, f.conv, f.upto)
    return _command(session, f.id, command, _ok if f.id is not None else None)


Handler = Callable[["Session", Any], Any]


def _change(handler: Handler, repeat: Callable[[Session, Any], Handler | None] | None = None
            ) -> Handler:
    """`handler` of a membership change, behind the user's `--change-rate`: past it the
    request is answered `rate_limited` and nothing is done (the client may ask again later),
    unless `repeat(session, f)` says it repeats one done before or on its way, and gives the
    handler that answers it as a dup (as a send's repeat is past the send rates: a burst of
    resends after a reconnect)."""
    def rated(session: Session, f: Any) -> Any:
        if session.user_changes.take():
            return handler(session, f)
        as_repeat = None if repeat is None else repeat(session, f)
        if as_repeat is None:
            session.reply_error(f.id, wire.ErrorCode.RATE_LIMITED,
                                "too many membership changes: slow down",
                                retry_ms=_retry_ms(session.user_changes))
            return None
        return as_repeat(session, f)
    return rated


def on_create(session: Session, f: wire.Create) -> Any:
    if session.passing_over:
        return session.pass_over()
    _submit_create(session, f)
    return _held_back(session)


def _submit_create(session: Session, f: wire.Create) -> None:
    """Submit `f`; with a cid, it is the user's create of that cid on its way
    (`Broker.creating`) until it is done."""
    members = tuple(dict.fromkeys(m for m in (f.members or ()) if m != session.user))
    command = cmd.CreateConv(session.user, session.device, session.role, f.kind, f.name,
                             bool(f.open), members, f.cid)
    pending = _submit(session, f.id, command, _created)
    if pending is None or f.cid is None:
        return
    creating, key = session.broker.creating, (session.user, f.cid)
    creating[key] = pending

    def done(failed: BaseException | None) -> None:
        if creating.get(key) is pending:
            del creating[key]
    pending.when_done(done)


def _create_repeat(session: Session, f: wire.Create) -> Handler | None:
    """If `f` repeats a create of the session's user (its cid made a conversation, or one is on
    its way with it), the handler that answers it past the rate; else None."""
    if f.cid is None:
        return None
    first = session.broker.creating.get((session.user, f.cid))
    if first is not None:
        return lambda s, f: _after_first(s, f, first)
    if session.broker.store.created(session.user, f.cid) is not None:
        return on_create
    return None


def _after_first(session: Session, f: wire.Create, first: Any) -> Any:
    """Past the rate, `f` repeats the create `first`, still on its way (refused
    `rate_limited` until 2026-12-05): once `first` is durable, `f` is submitted, and the rules
    answer it as a dup (or `conflict`, for the other kind). If `first` failed, `f` repeats
    something only if the cid made a conversation before (`first` was the other kind):
    otherwise nothing was done that it repeats, `rate_limited`. Counted meanwhile with the
    requests awaiting commit."""
    if session.passing_over:
        return session.pass_over()
    session.inflight += 1

    def then(failed: BaseException | None) -> None:
        session.request_done()
        if session.closing:  # nobody to answer: nothing read, nothing submitted
            return
        if failed is not None:
            try:
                made = session.broker.store.created(session.user, f.cid) is not None
            except StorageError as exc:
                session._read_failed(f, exc)  # as a handler's failed read is: unavailable
                return
            if not made:
                session.reply_error(f.id, wire.ErrorCode.RATE_LIMITED,
                                    "too many membership changes: slow down",
                                    retry_ms=_retry_ms(session.user_changes))
                return
        _submit_create(session, f)
    first.when_done(then)
    return _held_back(session)


def on_invite(session: Session, f: wire.Invite) -> Any:
    command = cmd.Invite(session.user, session.device, session.role, f.conv, f.user,
                         f.role or "member")
    return _command(session, f.id, command, _ok)


def on_set_role(session: Session, f: wire.SetRole) -> Any:
    command = cmd.SetRole(session.user, session.device, session.role, f.conv, f.user, f.role)
    return _command(session, f.id, command, _ok)


def on_join(session: Session, f: wire.Join | wire.Subscribe) -> Any:
    command = cmd.Join(session.user, session.device, session.role, f.conv)
    return _command(session, f.id, command, _ok)


def on_leave(session: Session, f: wire.Leave) -> Any:
    command = cmd.Leave(session.user, session.device, session.role, f.conv)
    return _command(session, f.id, command, _ok)


def on_remove(session: Session, f: wire.Remove) -> Any:
    command = cmd.Remove(session.user, session.device, session.role, f.conv, f.user)
    return _command(session, f.id, command, _ok)


def on_mute(session: Session, f: wire.Mute) -> Any:
    command = cmd.SetMute(session.user, session.device, session.role, f.conv, f.muted)
    return _command(session, f.id, command, _ok)


def on_revoke(session: Session, f: wire.Revoke) -> Any:
    """An admin's revocation takes effect as it arrives, and is answered once durable.

    The target's sessions whose tokens it covers are ended now, and hello refuses such tokens
    while it commits (`Broker.revoking`), so nothing done with them is logged after it: what
    they sent before is queued ahead of it (their own sends' pending ack too). The cut-off is
    the rules' own for this moment, and the command carries it: the commit logs the cut-off
    the broker enforced, not one a second later should the batch start after a second turned
    (a token minted in between would be let in, then covered by what is logged). The asking
    session, should it revoke its own user, ends after its reply. Any other token's is refused
    here, as the rules would refuse it whatever the state (its role is its token's): until
    2026-12-06 it was queued for the commit, where the rules refused it, and a flood of them
    took a place in the commits without a rate (docs/OPERATIONS.md, "Limits").
    """
    if session.role != "admin":
        session.reply_error(f.id, wire.ErrorCode.FORBIDDEN, REVOKE_ADMIN_ONLY)
        return None
    if session.passing_over:  # before it ends any session
        return session.pass_over()
    broker = session.broker
    cut = revocation_cut_off(time.time_ns() // 1000)
    # logged as enforced from now
    command = cmd.RevokeTokens(session.user, session.device, session.role, f.user, cut)
    broker.revoking.setdefault(f.user, []).append(cut)
    ended = _end_revoked(session, f.user, cut)
    return _command(session, f.id, command, lambda s, request_id, r: _revoked(
        s, request_id, r, ended), after=lambda: broker.revoke_settled(f.user, cut))


def _end_revoked(session: Session, user: str, cut: int) -> int:
    """End `user`'s sessions opened with a token issued before `cut` (not the asking one);
    return how many."""
    ended = 0
    for other in session.broker.hub.every_session(user):  # requests-only ones too
        if other is not session and other.issued < cut:
            other.flush_due_own_ack()  # logged ahead of the revocation, not after it
            other.token_revoked()
            ended += 1
    return ended


def _revoked(session: Session, request_id: int, r: dict, ended: int = 0) -> None:
    """Durable now: answer, then end the sessions the commit's cut-off covers (the asking one
    too if it is one of them); hello reads the cut-off from the store from now on."""
    session.reply(wire.Revoked(id=request_id, user=r["user"], before=r["before"]))
    ended += _end_revoked(session, r["user"], r["before"])
    if session.user == r["user"] and session.issued < r["before"]:
        session.token_revoked()
        ended += 1
    session.log.info("tokens_revoked", target=r["user"], before=r["before"],
                     sessions_ended=ended)


def _member(session: Session, conv: str) -> str | None:
    role = session.broker.store.role(conv, session.user)
    if role is None and session.role == "admin" and session.broker.store.conv_info(conv):
        return "admin"
    return role


def on_history(session: Session, f: wire.History) -> None:
    if _member(session, f.conv) is None:
        session.reply_error(f.id, wire.ErrorCode.FORBIDDEN, NO_ACCESS)
        return
    messages, more = session.broker.store.history(
        f.conv, before=f.before, after=f.after, limit=f.limit,
        newest_first=f.order == "newest")
    # Every message at its largest: its body's UTF-8 at 4 bytes a character (stored bodies may
    # be over today's --max-body-bytes, so their own lengths count), the rest PAGE_MESSAGE_BYTES.
    largest = sum(PAGE_MESSAGE_BYTES + (len(body) if type(body) is bytes else 4 * len(body))
                  for body in (m["body"] for m in messages))
    page = wire.Page(id=f.id, conv=f.conv, messages=messages, more=more)
    session.reply(_that_fits(session, page, "messages", messages, largest))


def _that_fits(session: Session, frame: Any, field: str, items: list[dict],
               largest: int) -> Any:
    """`frame` (a `page` or `conv_list`) holding only the first of `items`, its list `field`,
    that fit the connection's max_frame.

    A reply holds up to its request's `limit` items, so it may not fit one frame: then it holds
    as many as fit, in order, with `more` set, and the client pages on from the last one it got.
    If not even one fits, the whole frame goes to `Session.reply`, which answers
    `limit_exceeded`. `largest` bounds the items' packed size, so the common case is checked
    without packing.
    """
    if largest + 4096 <= session.conn.max_frame_bytes:
        return frame
    room = session.conn.max_frame_bytes - len(encode_frame(to_wire(frame._replace(**{field: []}))))
    used = 5  # the array header, at most
    for n, item in enumerate(items):
        used += len(msgpack.packb(item, use_bin_type=True))
        if used > room:
            return frame._replace(**{field: items[:n], "more": True}) if n else frame
    return frame


def on_convs(session: Session, f: wire.Convs) -> None:
    convs, more = session.broker.store.conversations(session.user, after=f.after, limit=f.limit)
    reply = wire.ConvList(id=f.id, convs=convs, more=more)
    session.reply(_that_fits(session, reply, "convs", convs, CONV_ENTRY_BYTES * len(convs)))


def _may_see_members(session: Session, conv: str, what: str, request_id: int) -> bool:
    """Whether the session may see who else is in `conv` (else it was answered forbidden):
    any member, but in a channel only its owners, admins and services (and admin tokens), as
    for the receipt and status pushes: a subscriber is not told who the other subscribers are,
    nor which of them are online (`members`, `receipts`, `presence`)."""
    role = _member(session, conv)
    if role is None:
        session.reply_error(request_id, wire.ErrorCode.FORBIDDEN, NO_ACCESS)
        return False
    if (conv.startswith("chn:") and role not in MANAGERS
            and session.role not in ("service", "admin")):
        session.reply_error(request_id, wire.ErrorCode.FORBIDDEN,
                            f"in a channel, only its owners, admins and services see {what}")
        return False
    return True


def _users_fit(session: Session, request_id: int, frame: str, *lists: list[str]) -> bool:
    """Whether each user list of a `frame` reply holds at most the protocol's MAX_USER_LIST
    ids (PROTOCOL.md §5.3); if not, the request is answered `limit_exceeded` and the session
    goes on. Only a conversation grown under a broker whose --max-members was above that
    holds more (before 2026-12-06 the flag had no upper bound, and such a reply ended the
    connection without a word: its frame could not be encoded)."""
    most = max(map(len, lists))
    if most <= fields.MAX_USER_LIST:
        return True
    session.log.warning("reply_too_large", frame=frame, users=most,
                        max_users=fields.MAX_USER_LIST)
    session.reply_error(request_id, wire.ErrorCode.LIMIT_EXCEEDED,
                        f"the {frame} reply would list {most:,} users, over the "
                        f"{fields.MAX_USER_LIST:,} a list of the protocol holds")
    return False


def on_members(session: Session, f: wire.Members) -> None:
    if not _may_see_members(session, f.conv, "its members", f.id):
        return
    store = session.broker.store
    info = store.conv_info(f.conv)
    if f.after is not None:
        session.reply(members_page(store, f, session.conn.max_frame_bytes, info))
        return
    by_role = _by_role(store.members(f.conv))
    if not _users_fit(session, f.id, wire.MemberList.TYPE, *by_role.values()):
        return
    session.reply(wire.MemberList(id=f.id, conv=f.conv, kind=info["kind"],
                                  owners=by_role["owner"], admins=by_role["admin"],
                                  members=by_role["member"], name=info.get("name")))


def _by_role(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The users of `rows` (`(user, role)`, in id order) by role, each list in id order."""
    by_role: dict[str, list[str]] = {"owner": [], "admin": [], "member": []}
    for user, role in rows:
        by_role.setdefault(role, []).append(user)
    return by_role


def members_page(store: Store, f: wire.Members, max_frame: int,
                 info: dict[str, Any]) -> wire.MemberList:
    """The `member_list` page of a `members` with `after`: the first of the members after
    `after` (in id order, with their roles, read in one transaction) whose ids fit
    `max_frame`, each in the list of its role, with `more` and `last` when some do not.

    The read takes no more members than the room the frame leaves for ids could hold (`kind`
    and `name` take theirs first) and one more, to tell whether more follow: a page costs its
    own members, not the conversation's."""
    empty = wire.MemberList(id=f.id, conv=f.conv, kind=info["kind"], owners=[], admins=[],
                            members=[], name=info.get("name"), more=True,
                            last="x" * fields.MAX_USER_ID_CHARS)
    room = _page_room(max_frame, empty)
    rows = store.members(f.conv, after=f.after, **_page_read(room))
    n, more = _page_cut(room, [user for user, _ in rows], lambda user: 1)
    by_role = _by_role(rows[:n])
    return empty._replace(owners=by_role["owner"], admins=by_role["admin"],
                          members=by_role["member"], more=more,
                          last=rows[n - 1][0] if more else None)


def _page_room(max_frame: int, empty: Any) -> int:
    """The bytes a page of `max_frame` leaves its ids (`receipts` and `members` with `after`,
    PROTOCOL.md §5.2): what the frame leaves with `empty`, the page with its three user lists
    empty, `more` and a `last` of the longest id, less the lists' headers at their largest (4
    bytes more each), so that a page never misses the frame by a byte."""
    return max_frame - len(encode_frame(to_wire(empty))) - 3 * 4


def _page_read(room: int) -> dict[str, int]:
    """The bounds of a page's store read (`limit` and `chars`), for a page of `room` bytes of
    ids: no more members than it could hold, at 2 bytes the shortest packed id, nor than
    their ids' characters could fill (a member listed twice counting twice), and one more, to
    tell whether more follow. At least 2: a page lists at least its first member, and must
    know whether another follows. Until 2026-12-07's review the bounds were the whole
    max_frame's, whatever `kind`, `name` and `conv` took of it: a page read up to 4 times the
    members it listed (a 128-character name of 4-byte characters, 64-character ids, at 1024
    bytes)."""
    return {"limit": min(fields.MAX_USER_LIST, max(room, 2) // 2) + 1,
            "chars": max(room, fields.MAX_USER_ID_CHARS)}


def _page_cut(room: int, members: list[str], copies: Callable[[str], int]) -> tuple[int, bool]:
    """How many of `members` (in id order) a page of `room` bytes of ids lists (`_page_room`),
    at least 1 and at most MAX_USER_LIST, and whether members are left after them; a member
    costs its packed id `copies(member)` times.

    A max_frame holds at least 1024 bytes and a member costs at most 132: the first always
    fits (were it not to, `Session.reply` answers `limit_exceeded`)."""
    n = 0
    for m in members[:fields.MAX_USER_LIST]:
        # msgpack's str of an ASCII id (all are): a 1-byte header below 32 characters, else 2.
        room -= (len(m) + (1 if len(m) < 32 else 2)) * copies(m)
        if room < 0:
            break
        n += 1
    n = min(max(n, 1), len(members))
    return n, n < len(members)


def on_receipts(session: Session, f: wire.Receipts) -> None:
    if not _may_see_members(session, f.conv, "receipts", f.id):
        return
    # A page (`after`) reads no more members than its frame could hold, as `members_page`.
    max_frame = session.conn.max_frame_bytes
    marks = (session.broker.store.receipts(f.conv, f.seq) if f.after is None
             else session.broker.store.receipts(
                 f.conv, f.seq, after=f.after,
                 **_page_read(_page_room(max_frame, _receipts_empty(f)))))
    if marks is None:
        session.reply_error(f.id, wire.ErrorCode.NOT_FOUND, f"{f.conv} has no message {f.seq}")
        return
    # The audience is `read` and `unread`: listing it whole as well would take the answer for
    # a group of 10,000 long ids past the default max_frame, where this stays within 2 ids
    # a member, as the answer was before it (`delivered` and `read`).
    members, delivered, read = marks
    if f.after is not None:
        session.reply(receipts_page(f, max_frame, members, delivered, read))
        return
    have_read = set(read)
    unread = [m for m in members if m not in have_read]
    if not _users_fit(session, f.id, wire.ReceiptList.TYPE, delivered, read, unread):
        return
    session.reply(wire.ReceiptList(id=f.id, conv=f.conv, seq=f.seq, delivered=delivered,
                                   read=read, unread=unread))


def receipts_page(f: wire.Receipts, max_frame: int, members: list[str],
                  delivered: list[str], read: list[str]) -> wire.ReceiptList:
    """The `receipt_list` page of a `receipts` with `after`: the first of `members` (the
    audience after `after`, in id order, as read in one transaction) whose ids fit the
    connection's `max_frame`, with `more` and `last` when some do not. A member is listed once
    in `read` or `unread`, and again in `delivered` if it was delivered."""
    got, have_read = set(delivered), set(read)
    empty = _receipts_empty(f)
    n, more = _page_cut(_page_room(max_frame, empty), members,
                        lambda m: 2 if m in got else 1)
    page = members[:n]
    return empty._replace(delivered=[m for m in page if m in got],
                          read=[m for m in page if m in have_read],
                          unread=[m for m in page if m not in have_read],
                          more=more, last=page[-1] if more else None)


def _receipts_empty(f: wire.Receipts) -> wire.ReceiptList:
    """The `receipt_list` page of `f` with its user lists empty, `more` and a `last` of the
    longest id (what `_page_room` takes)."""
    return wire.ReceiptList(id=f.id, conv=f.conv, seq=f.seq, delivered=[], read=[],
                            unread=[], more=True, last="x" * fields.MAX_USER_ID_CHARS)


def on_presence(session: Session, f: wire.Presence) -> None:
    # In a channel, who is online is who its subscribers are: asked as `members` is.
    if not _may_see_members(session, f.conv, "who is online", f.id):
        return
    hub = session.broker.hub
    # By user id, as the roster is (UTF-8 bytes sort as code points do): only those online.
    online = sorted(hub.online_among(session.broker.roster(f.conv)))
    if not _users_fit(session, f.id, wire.PresenceList.TYPE, online):
        return
    session.reply(wire.PresenceList(id=f.id, conv=f.conv, online=online))


def on_typing(session: Session, f: wire.Typing) -> None:
    broker = session.broker
    role = _member(session, f.conv)
    if role is None or (f.conv.startswith("chn:") and role == "member"
                        and session.role == "user"):
        return  # ephemeral: silently dropped, nothing leaks
    if not session.user_typing.take():
        return  # past --typing-rate: dropped too; a typing notice repeats while they type
    data = session.conn.send(wire.TypingNotice(conv=f.conv, user=session.user))
    # To none of the typist's own sessions (until 2026-12-05 their other devices got it).
    audience = broker.hub.online_among(broker.roster(f.conv))
    audience.discard(session.user)
    broker.hub.push(audience, data)


def on_stats(session: Session, f: wire.Stats) -> Any:
    """The broker's figures now (`homing health`): about every user (and any user's device), so
    for admin and monitor tokens only. Answered by the reader once its walk of the sessions,
    in slices, is done (`answer_stats`)."""
    if session.role not in ("admin", "monitor"):
        session.reply_error(f.id, wire.ErrorCode.FORBIDDEN, "stats: admin and monitor tokens only")
        return None
    return answer_stats(session, f)


def on_ping(session: Session, f: wire.Ping) -> None:
    session.reply(wire.Pong(id=f.id))


def on_pong(session: Session, f: wire.Pong) -> None:
    return None


def on_bye(session: Session, f: wire.Bye) -> None:
    # Answered by the close alone: the receiver of a bye sends nothing more (PROTOCOL.md §6).
    session.close(CloseReason.PEER_BYE)


HANDLERS = {
    wire.Send: on_send,
    wire.Ack: on_ack,
    wire.Read: on_read,
    wire.Create: _change(on_create, _create_repeat),
    wire.Invite: _change(on_invite),
    wire.SetRole: _change(on_set_role),
    wire.Join: _change(on_join),
    wire.Subscribe: _change(on_join),
    wire.Leave: _change(on_leave),
    wire.Remove: _change(on_remove),
    wire.Mute: _change(on_mute),
    wire.Revoke: on_revoke,
    wire.History: on_history,
    wire.Receipts: on_receipts,
    wire.Members: on_members,
    wire.Convs: on_convs,
    wire.Presence: on_presence,
    wire.Typing: on_typing,
    wire.Stats: on_stats,
    wire.Ping: on_ping,
    wire.Pong: on_pong,
    wire.Bye: on_bye,
}

# A requests-only session's table (`hello.deliver: false`): the same, but for `ack`.
REQUESTS_ONLY_HANDLERS = {**HANDLERS, wire.Ack: on_ack_requests_only}


def on_not_monitored(session: Session, f: Any) -> None:
    # Refused before any rule or read: a monitor token, kept in a monitoring system's
    # configuration, reads no conversation and changes nothing (PROTOCOL.md §10).
    if isinstance(f, wire.Typing):
        return  # ephemeral: dropped, as a non-member's is
    session.reply_error(getattr(f, "id", None), wire.ErrorCode.FORBIDDEN,
                        f"{f.TYPE}: a monitor token asks stats and ping only")


# A monitor token's session (requests-only, PROTOCOL.md §10): its figures and liveness alone.
MONITOR_HANDLERS = {**{t: on_not_monitored for t in HANDLERS},
                    wire.Stats: on_stats, wire.Ping: on_ping, wire.Pong: on_pong,
                    wire.Bye: on_bye}
