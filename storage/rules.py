"""Domain rules: `decide(tables, command, now_us, limits)` turns a command into events and a reply.

`decide` is pure: it reads the current state through `tables` (which already includes earlier
commands of the same batch), writes nothing, and either returns `(events, reply)` or raises a
`DomainError` subclass. Every field a request fills in is checked here, its type too, and a bad
one is `Invalid` saying which; any other exception out of a rule is a bug of homing's, which
`Store.execute` answers for that command alone (`CommandInternalError`). Everything random
(new conv ids) is decided here and stored in the events, so replaying the log is deterministic.
Rules (docs/DESIGN.md, "Commands and rules"):

* No access and "does not exist" are the same `Forbidden`, so existence never leaks.
* A token with role "admin" acts as owner everywhere (moderation), member or not.
* A token with role "service" posts in a channel it is a member of: so it does not join one
  itself (its owners or admins invite it), open or not.
* Idempotent where the domain allows: a repeated (user, cid) send returns the first result with
  `dup=True`; inviting a member, joining twice, acking or marking below the current mark, and
  setting the mute state it already has all succeed without appending an event.
* Send replies carry `seq` and `lsn` as None; the store fills them in after applying.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from storage import commands as c
from storage import records as r
from storage.errors import Conflict, Forbidden, Invalid, LimitExceeded
from storage.projections import (
    Tables,
    acked_by_any,
    acked_convs,
    conv_row,
    get_u64,
    idem_key,
    idem_row,
    key2,
    row_text,
)
from storage.records import MAX_CID_BYTES
from storage.tables import MANAGER_ROLES, MANAGERS

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
MAX_CONV_ID_CHARS = 160
MAX_CID_CHARS = 128
GROUP_PREFIX = "grp:"
CHANNEL_PREFIX = "chn:"

EventData = tuple[int, str, str, str, dict[str, Any]]
Decision = tuple[list[EventData], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Limits:
    """Configured limits the rules enforce (`LimitExceeded` beyond them)."""

    max_members: int = 1000
    max_body_bytes: int = 64 * 1024
    max_name_chars: int = 128


_KNOWN_IDS: set[str] = set()
_KNOWN_IDS_MAX = 100_000


def valid_id(value: object) -> bool:
    """Return whether `value` is a well-formed user or device id (recent answers are cached)."""
    if isinstance(value, str) and value in _KNOWN_IDS:
        return True
    if not isinstance(value, str) or ID_RE.fullmatch(value) is None:
        return False
    if len(_KNOWN_IDS) >= _KNOWN_IDS_MAX:
        _KNOWN_IDS.clear()
    _KNOWN_IDS.add(value)
    return True


def direct_conv(a: str, b: str) -> str:
    """Return the id of the direct conversation between users `a` and `b`."""
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


def _utf8(text: str, field: str) -> bytes:
    """`text` as UTF-8; Invalid for text UTF-8 cannot encode (a lone surrogate: bytes that were
    not UTF-8 where it came from), which no row or event could hold."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise Invalid(f"{field} is not UTF-8 text (a lone surrogate at character "
                      f"{exc.start})") from None


def _conv_key(conv: object) -> bytes | None:
    """`conv` as a table key; None when it cannot name a conversation (not a str, empty, NUL,
    over MAX_CONV_ID_CHARS bytes of UTF-8). Invalid for a str UTF-8 cannot encode."""
    if not isinstance(conv, str) or not conv or len(conv) > MAX_CONV_ID_CHARS or "\0" in conv:
        return None
    key = _utf8(conv, "conv")
    return key if len(key) <= MAX_CONV_ID_CHARS else None


def _conv(tables: Tables, conv: object) -> dict[str, Any] | None:
    key = _conv_key(conv)
    if key is None:
        return None
    raw = tables.conv[key]
    return None if raw is None else conv_row(key, raw)


# One answer for "no such conversation" and "not a member", so that a refusal does not tell
# which: the queries of broker/handlers.py give it too.
NO_ACCESS = "no such conversation, or you are not a member"


def _role(tables: Tables, conv: str, user: str) -> str | None:
    key = key2(conv, user)
    raw = tables.member[key]
    return None if raw is None else row_text("member", key, raw)


def _member_count(tables: Tables, conv: str) -> int:
    # The store's view keeps each group's count, up to date with every change (an invite in a
    # group of 10,000 counted its every member: 5 ms, in the write transaction).
    return tables.member.count(conv.encode() + b"\0")


def _member_conv(tables: Tables, cmd) -> dict[str, Any]:
    """Return the conv the actor is a member of, or raise Forbidden."""
    info = _conv(tables, cmd.conv)
    if info is None or _role(tables, cmd.conv, cmd.user) is None:
        raise Forbidden(NO_ACCESS)
    return info


def _ev(now_us: int, cmd, type_: str, data: dict[str, Any]) -> EventData:
    return (now_us, type_, cmd.user, cmd.device, data)


def _check_cid(cid: object) -> None:
    """Invalid unless `cid` is a client id the idempotency tables can key: 1 to MAX_CID_CHARS
    characters, at most MAX_CID_BYTES bytes of UTF-8, no NUL."""
    if (not isinstance(cid, str) or not 1 <= len(cid) <= MAX_CID_CHARS or "\0" in cid
            or len(_utf8(cid, "cid")) > MAX_CID_BYTES):
        raise Invalid(f"cid must be 1..{MAX_CID_CHARS} characters and at most {MAX_CID_BYTES} "
                      "bytes of UTF-8, without NUL")


def _send(tables: Tables, cmd: c.SendMessage, now_us: int, limits: Limits) -> Decision:
    cid = cmd.cid
    _check_cid(cid)
    if not isinstance(cmd.body, str | bytes):
        raise Invalid("body must be str or bytes")
    if (cmd.conv is None) == (cmd.to is None):
        raise Invalid("exactly one of conv and to is required")
    ikey = idem_key(cmd.user, cid)
    first = tables.idem[ikey]
    if first is not None:
        conv, seq, lsn = idem_row(ikey, first)
        if asked_conv(cmd) != conv:  # a cid names one message: not one in another conv
            raise Conflict(f"cid {cid!r} already names message {seq} of {conv}")
        # A dup whatever its body's size: accepted under a larger limit, lowered since.
        return [], {"conv": conv, "seq": seq, "lsn": lsn, "cid": cid, "dup": True}
    size = len(_utf8(cmd.body, "body")) if isinstance(cmd.body, str) else len(cmd.body)
    if size > limits.max_body_bytes:
        raise LimitExceeded(f"body exceeds {limits.max_body_bytes} bytes")
    events: list[EventData] = []
    if cmd.to is not None:
        conv = _direct_target(tables, cmd, now_us, events)
    else:
        conv = cmd.conv
        _check_post(tables, cmd)
    data = {"conv": conv, "cid": cid, "body": cmd.body}
    events.append(_ev(now_us, cmd, r.MESSAGE_ACCEPTED, data))
    return events, {"conv": conv, "seq": None, "lsn": None, "cid": cid, "dup": False}


def asked_conv(cmd: c.SendMessage) -> str | None:
    """The conversation a send names: its conv, or the direct one with `to` (None if `to` is
    no one it could write to)."""
    if cmd.conv is not None:
        return cmd.conv
    if not valid_id(cmd.to) or cmd.to == cmd.user:
        return None
    return direct_conv(cmd.user, cmd.to)


def _direct_target(tables: Tables, cmd: c.SendMessage, now_us: int, events: list) -> str:
    if not valid_id(cmd.to):
        raise Invalid("bad recipient id")
    if cmd.to == cmd.user:
        raise Invalid("cannot send a direct message to yourself")
    conv = direct_conv(cmd.user, cmd.to)
    if tables.conv[conv.encode()] is None:
        events.append(_ev(now_us, cmd, r.CONV_CREATED,
                          {"conv": conv, "kind": "direct", "name": None, "open": False}))
        for user in sorted((cmd.user, cmd.to)):
            events.append(_ev(now_us, cmd, r.MEMBER_ADDED,
                              {"conv": conv, "user": user, "role": "member"}))
    elif _role(tables, conv, cmd.user) is None:
        raise Forbidden(NO_ACCESS)
    return conv


def _check_post(tables: Tables, cmd: c.SendMessage) -> None:
    conv = cmd.conv
    key = _conv_key(conv)
    if key is None or tables.conv[key] is None:
        raise Forbidden(NO_ACCESS)
    if cmd.role == "admin":
        return
    role = _role(tables, conv, cmd.user)
    if role is None:
        raise Forbidden(NO_ACCESS)
    # The kind is fixed by the id prefix (docs/DESIGN.md, "Identifiers"): no row decode needed.
    if conv.startswith(CHANNEL_PREFIX) and role not in MANAGERS and cmd.role != "service":
        raise Forbidden("only owners, admins and services post in a channel")


def _create(tables: Tables, cmd: c.CreateConv, now_us: int, limits: Limits) -> Decision:
    if cmd.kind not in ("group", "channel"):
        raise Invalid("kind must be group or channel")
    prefix = GROUP_PREFIX if cmd.kind == "group" else CHANNEL_PREFIX
    data = {"kind": cmd.kind, "name": cmd.name, "open": bool(cmd.open)}
    if cmd.cid is not None:
        # Before the name and members are checked: a repeat is answered whatever else it asks,
        # even where the create would now be refused (--max-members lowered since).
        _check_cid(cmd.cid)
        ckey = key2(cmd.user, cmd.cid)
        first = tables.created[ckey]
        if first is not None:  # a repeat: the first answer
            conv = row_text("created", ckey, first)
            if not conv.startswith(prefix):
                raise Conflict(f"cid {cmd.cid!r} already names {conv}, not a {cmd.kind}")
            return [], {"conv": conv, "dup": True}
        data["cid"] = cmd.cid
    if cmd.name is not None and (not isinstance(cmd.name, str)
                                 or len(cmd.name) > limits.max_name_chars):
        raise Invalid("bad name")
    if cmd.name is not None:
        # Stored in the event and the conv row: text UTF-8 cannot encode (a lone surrogate)
        # would fail the sealing of the whole batch, not this command.
        _utf8(cmd.name, "name")
    if not isinstance(cmd.members, tuple | list):
        raise Invalid("members must be a list of user ids")
    for user in cmd.members:
        if not valid_id(user):
            raise Invalid(f"bad member id {user!r}")
    # Each id once, in the order given, the creator apart: by a dict. Looking each up in the
    # list so far (until 2026-12-06) cost n * n / 2 comparisons, before the limit below was
    # even checked: 6 to 9 ms of the commit thread for a create of the 1,000 ids a frame holds,
    # refused at the default limit (0.3 ms since), 9.5 s for 40,000 through `Store.execute`.
    members = [user for user in dict.fromkeys(cmd.members) if user != cmd.user]
    if len(members) + 1 > limits.max_members:
        raise LimitExceeded(f"at most {limits.max_members} members")
    conv = prefix + secrets.token_hex(8)
    while _conv(tables, conv) is not None:
        conv = prefix + secrets.token_hex(8)
    events = [
        _ev(now_us, cmd, r.CONV_CREATED, {"conv": conv, **data}),
        _ev(now_us, cmd, r.MEMBER_ADDED, {"conv": conv, "user": cmd.user, "role": "owner"}),
    ]
    for user in members:
        events.append(_ev(now_us, cmd, r.MEMBER_ADDED,
                          {"conv": conv, "user": user, "role": "member"}))
    return events, {"conv": conv, "dup": False}


def _managed(tables: Tables, cmd: c.Invite | c.SetRole | c.Remove, doing: str, *,
             gives_role: bool) -> str | None:
    """Check that `cmd`'s actor may `doing` in `cmd.conv`, a group or channel: one of its owners
    or admins (an admin token acts as owner), with a valid target and, if it `gives_role`, a
    valid `member_role`. Forbidden otherwise: NO_ACCESS for a conversation that does not exist
    or that the actor is not in, as every command says it; a plain member knows it exists, and
    is told why. Return the target's role (None: no member)."""
    info = _conv(tables, cmd.conv)
    actor = None if info is None else _role(tables, cmd.conv, cmd.user)
    if cmd.role == "admin" and info is not None:
        actor = "owner"
    if actor is None:
        raise Forbidden(NO_ACCESS)
    if actor not in MANAGERS:
        raise Forbidden(f"only owners and admins {doing}")
    if info["kind"] == "direct":
        raise Invalid(f"cannot {doing} in a direct conversation")
    if gives_role and cmd.member_role not in ("member", "admin"):
        raise Invalid("member_role must be member or admin")
    if not valid_id(cmd.target):
        raise Invalid("bad target id")
    return _role(tables, cmd.conv, cmd.target)


def _managed_without(tables: Tables, conv: str, user: str) -> bool:
    """Whether `conv` keeps someone who can invite if `user` is no longer an owner or admin:
    another owner or admin, or no other member at all. Counted, not read: the store keeps each
    group's count of owners and admins (`managers`) as it keeps its member count; reading every
    member's role took 4.4 to 10.5 ms of the commit thread in a group of 20,000, 64 to 72 ms in
    one of 100,000 (until 2026-12-06; docs/OPERATIONS.md, "What grows with the data")."""
    head = conv.encode() + b"\0"
    mine = tables.member[key2(conv, user)]
    if tables.member.managers(head) - (mine in MANAGER_ROLES) > 0:
        return True
    return tables.member.count(head) - (mine is not None) == 0


def _another_admin_first(conv: str) -> str:
    """How the last owner or admin of `conv` hands over, said in the refusals of what would
    leave it without one. The request by both of its names: the protocol's and the SDK's
    `set_role`, and the `homing role` command, since the text reaches the users of each."""
    return f"make another member an admin first: set_role, or `homing role {conv} USER admin`"


def _invite(tables: Tables, cmd: c.Invite, now_us: int, limits: Limits) -> Decision:
    current = _managed(tables, cmd, "invite", gives_role=True)
    if current == cmd.member_role:
        return [], {"conv": cmd.conv}  # a retried invite: done already
    if current is not None:
        raise Conflict(f"{cmd.target} is already a {current} of {cmd.conv}; an invite does not "
                       f"change roles (set_role does, or `homing role`)")
    if _member_count(tables, cmd.conv) >= limits.max_members:
        raise LimitExceeded(f"at most {limits.max_members} members")
    data = {"conv": cmd.conv, "user": cmd.target, "role": cmd.member_role}
    return [_ev(now_us, cmd, r.MEMBER_ADDED, data)], {"conv": cmd.conv}


def _set_role(tables: Tables, cmd: c.SetRole, now_us: int, limits: Limits) -> Decision:
    current = _managed(tables, cmd, "change roles", gives_role=True)
    if current is None:
        raise Conflict(f"{cmd.target} is not a member of {cmd.conv}: invite them")
    if current == "owner":
        raise Conflict(f"{cmd.target} is an owner of {cmd.conv}; an owner's role does not change")
    if current == cmd.member_role:
        return [], {"conv": cmd.conv}  # a retry, or nothing to change
    if cmd.member_role == "member" and not _managed_without(tables, cmd.conv, cmd.target):
        raise Conflict(f"{cmd.target} is the last owner or admin of {cmd.conv}: nobody could "
                       f"invite any more ({_another_admin_first(cmd.conv)})")
    data = {"conv": cmd.conv, "user": cmd.target, "role": cmd.member_role}
    return [_ev(now_us, cmd, r.MEMBER_ROLE_SET, data)], {"conv": cmd.conv}


def _join(tables: Tables, cmd: c.Join, now_us: int, limits: Limits) -> Decision:
    info = _conv(tables, cmd.conv)
    role = None if info is None else _role(tables, cmd.conv, cmd.user)
    if info is None or (role is None and not info["open"] and cmd.role != "admin"):
        raise Forbidden(NO_ACCESS)  # as every command says it: not which of the two
    if info["kind"] == "direct":
        raise Forbidden("a direct conversation is not joined: its two users are its members")
    if role is not None:
        return [], {"conv": cmd.conv}
    if cmd.role == "service" and info["kind"] == "channel":
        # A service member of a channel posts there and sees who its subscribers are (§10):
        # let in by itself, any service could post to every subscriber of an open channel and
        # list them (until 2026-12-06). Its owners and admins invite it. Said as for a
        # conversation that does not exist: whether an open one does is not its to learn.
        raise Forbidden(NO_ACCESS)
    if _member_count(tables, cmd.conv) >= limits.max_members:
        raise LimitExceeded(f"at most {limits.max_members} members")
    return [_ev(now_us, cmd, r.MEMBER_ADDED,
                {"conv": cmd.conv, "user": cmd.user, "role": "member"})], {"conv": cmd.conv}


def _leave(tables: Tables, cmd: c.Leave, now_us: int, limits: Limits) -> Decision:
    info = _member_conv(tables, cmd)
    if info["kind"] == "direct":
        raise Invalid("cannot leave a direct conversation")
    if _role(tables, cmd.conv, cmd.user) in MANAGERS and not _managed_without(
            tables, cmd.conv, cmd.user):
        raise Conflict("the last owner or admin cannot leave while other members remain: "
                       f"nobody could invite any more ({_another_admin_first(cmd.conv)})")
    return [_ev(now_us, cmd, r.MEMBER_REMOVED, {"conv": cmd.conv, "user": cmd.user})], {
        "conv": cmd.conv}


def _remove(tables: Tables, cmd: c.Remove, now_us: int, limits: Limits) -> Decision:
    current = _managed(tables, cmd, "remove members", gives_role=False)
    if cmd.target == cmd.user:
        raise Invalid("to leave a conversation yourself, use leave, not remove")
    if current is None:
        return [], {"conv": cmd.conv}  # not (or no longer) a member: a retry, or nothing to do
    if current == "owner":
        raise Conflict(f"{cmd.target} is an owner of {cmd.conv}; owners are not removed (they "
                       f"leave)")
    if current in MANAGERS and not _managed_without(tables, cmd.conv, cmd.target):
        raise Conflict(f"{cmd.target} is the last owner or admin of {cmd.conv}: nobody could "
                       f"invite any more ({_another_admin_first(cmd.conv)})")
    return [_ev(now_us, cmd, r.MEMBER_REMOVED, {"conv": cmd.conv, "user": cmd.target})], {
        "conv": cmd.conv}


def _ack(tables: Tables, cmd: c.Ack, now_us: int, limits: Limits) -> Decision:
    upto = cmd.upto
    if not isinstance(upto, int) or isinstance(upto, bool) or upto < 0:
        raise Invalid("upto must be a non-negative integer")
    if upto > get_u64(tables, "inbox_head", cmd.user.encode()):
        raise Invalid("ack beyond the inbox head")
    old = get_u64(tables, "delivered", key2(cmd.user, cmd.device))
    if upto <= old:
        return [], {}
    if cmd.convs is not None:
        convs = dict(cmd.convs)
    else:
        # Only the entries no device of the user has acked yet (`acked_by_any`: one row, this
        # batch's acks included). A new device acking a long inbox (or many devices, one after
        # another) would otherwise read every entry again, in the write transaction.
        convs = acked_convs(tables, cmd.user, max(old, acked_by_any(tables, cmd.user)), upto)
    return [_ev(now_us, cmd, r.DELIVERY_ACKED, {"upto": upto, "convs": convs})], {}


def _mark_read(tables: Tables, cmd: c.MarkRead, now_us: int, limits: Limits) -> Decision:
    if not isinstance(cmd.upto, int) or isinstance(cmd.upto, bool) or cmd.upto < 0:
        raise Invalid("upto must be a non-negative integer")
    _member_conv(tables, cmd)
    upto = min(cmd.upto, get_u64(tables, "conv_seq", cmd.conv.encode()))
    if upto <= get_u64(tables, "read", key2(cmd.conv, cmd.user)):
        return [], {"conv": cmd.conv}
    return [_ev(now_us, cmd, r.READ_MARKED, {"conv": cmd.conv, "upto": upto})], {"conv": cmd.conv}


def _set_mute(tables: Tables, cmd: c.SetMute, now_us: int, limits: Limits) -> Decision:
    _member_conv(tables, cmd)
    muted = bool(cmd.muted)
    if (tables.get("mute", key2(cmd.user, cmd.conv)) is not None) == muted:
        return [], {"conv": cmd.conv}
    return [_ev(now_us, cmd, r.MUTE_SET, {"conv": cmd.conv, "muted": muted})], {"conv": cmd.conv}


def revocation_cut_off(now_us: int) -> int:
    """The `before` of a revocation made at `now_us`: tokens issued in this second or earlier
    stop working, and a token minted once the clock passed it works."""
    return now_us // 1_000_000 + 1


# Also the broker's answer to a revoke of another token, which it refuses before the commit.
REVOKE_ADMIN_ONLY = "only an admin token may revoke tokens"


def _revoke_tokens(tables: Tables, cmd: c.RevokeTokens, now_us: int, limits: Limits) -> Decision:
    if cmd.role != "admin":
        raise Forbidden(REVOKE_ADMIN_ONLY)
    if not valid_id(cmd.target):
        raise Invalid("bad user id")
    before = cmd.before
    if before is None:
        before = revocation_cut_off(now_us)
    elif type(before) is not int or not 0 < before < 1 << 63:
        raise Invalid("bad revocation cut-off")
    stored = get_u64(tables, "revoked", cmd.target.encode())
    if stored >= before:  # revoked up to a later second already (a clock set back)
        return [], {"user": cmd.target, "before": stored}
    return ([_ev(now_us, cmd, r.TOKENS_REVOKED, {"user": cmd.target, "before": before})],
            {"user": cmd.target, "before": before})


_DECIDE = {
    c.SendMessage: _send,
    c.CreateConv: _create,
    c.Invite: _invite,
    c.SetRole: _set_role,
    c.Join: _join,
    c.Leave: _leave,
    c.Remove: _remove,
    c.Ack: _ack,
    c.MarkRead: _mark_read,
    c.SetMute: _set_mute,
    c.RevokeTokens: _revoke_tokens,
}


def decide(tables: Tables, command: c.Command, now_us: int, limits: Limits) -> Decision:
    """Check `command` against the current state; return `(events, reply)` or raise DomainError."""
    if not valid_id(command.user) or not valid_id(command.device):
        raise Invalid("bad user or device id")
    if command.role not in ("user", "service", "admin"):
        raise Invalid("bad token role")
    handler = _DECIDE.get(type(command))
    if handler is None:
        raise Invalid(f"unknown command {type(command).__name__}")
    # Nothing caught here: the rules check the fields they take (Invalid), and any other
    # exception is a bug, which the store fails this command alone for (until 2026-12-05 a
    # TypeError, ValueError, AttributeError or UnicodeError was `Invalid`, "malformed ...":
    # the client was told that its request was bad).
    return handler(tables, command, now_us, limits)
