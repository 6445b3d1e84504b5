"""Frame types: one class per wire frame, with the one table of their fields (PROTOCOL.md §5).

A frame is an immutable `NamedTuple` subclass; its class attribute ``TYPE`` is the wire ``"t"``
string. NamedTuples, not frozen dataclasses, because a frame is built for every message on the hot
path: building a six-field frozen slots dataclass costs about five times as much (measured with
bench/bench_codec.py's host, 527 ns against 98 ns). Equality is overridden so that frames of
different types never compare equal, even with equal fields (``Ping(1) != Pong(1)``).

Rules kept here:

* Every field is checked for type and limit (`protocol.fields`) when a frame is built from a
  decoded map (`from_wire`) and, by `Connection.send`, before one is encoded.
* Unknown map keys are ignored (forward compatibility, §3.3).
* An optional field that is absent or nil takes its default; `to_wire` leaves out optional fields
  equal to their default, so a frame survives the round trip exactly.
* The attribute ``sender`` is the wire key ``"from"`` (a Python keyword).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import fields as f
from .codec import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT
from .errors import ALWAYS_CLOSE, ErrorCode


class FieldError(ValueError):
    """Raised by `from_wire` when a field is missing, ill-typed or out of its limit."""


def wire_key(attr: str) -> str:
    """The wire key of a frame's attribute: `sender` is "from" (a Python keyword), the others
    their own name."""
    return "from" if attr == "sender" else attr


class _Spec:
    """How one frame class maps to and from a wire map: a generated decoder and encoder.

    The functions are generated from the field table (as `dataclasses` generates __init__)
    because this is the hot path: an unrolled decoder with the simple checks inlined runs about
    twice as fast as a loop over the fields. `source` keeps the generated text for reading.

    `checked(frame, mb)` is what `decode(encode(frame), mb)` checks, raising the same
    `FieldError` for the same frame, and returns the map `encode` does, in one pass: the checked
    way out of `Connection.send`. A frame with a cross-field rule or nested maps is checked by
    exactly that round trip instead (none of those is on the hot path).
    """

    __slots__ = ("checked", "cls", "decode", "encode", "source", "type")

    def __init__(self, cls: type, type_: str | None, checks: dict[str, Any], rule: Any) -> None:
        if set(checks) != set(cls._fields):
            raise AssertionError(f"{cls.__name__}: checks must cover exactly {cls._fields}")
        self.cls = cls
        self.type = type_
        ns: dict[str, Any] = {
            "cls": cls, "new": tuple.__new__, "rule": rule, "bad": _bad, "bad_value": _bad_value,
            "FieldError": FieldError,
            **f.INLINE_NAMES,
        }
        dec = ["def decode(d, mb):", "    get = d.get"]
        enc = ["def encode(fr):"]
        unpack = f"    {', '.join(f'v{i}' for i in range(len(cls._fields)))}, = fr"
        enc.append(unpack)
        chk = ["def checked(fr, mb):", unpack]
        head = [f"'t': {type_!r}"] if type_ is not None else []
        tail = []
        flat = rule is None
        for i, attr in enumerate(cls._fields):
            v, wire = f"v{i}", wire_key(attr)
            check, convert, unconvert = checks[attr], None, None
            if isinstance(check, tuple):  # (check, convert, unconvert) for nested maps
                check, convert, unconvert = check
                flat = False
            ns[f"c{i}"], ns[f"cv{i}"], ns[f"u{i}"] = check, convert, unconvert
            ns[f"D{i}"] = default = cls._field_defaults.get(attr)
            test = f.INLINE.get(check, "c{i}({v}, mb)").format(v=v, i=i)
            dec.append(f"    {v} = get({wire!r})")
            out = v if unconvert is None else f"u{i}({v})"
            if attr in cls._field_defaults:
                dec.append(f"    if {v} is None: {v} = D{i}")
                dec.append(f"    elif not ({test}): raise bad(d, {wire!r}, {v}, c{i}, mb)")
                cond = f"{v} is not None"
                if default is not None:
                    cond += f" and not ({v} == D{i} and type({v}) is type(D{i}))"
                tail.append(f"    if {cond}: d[{wire!r}] = {out}")
                chk.append(f"    if ({cond}) and not ({test}): "
                           f"raise bad_value({wire!r}, {v}, c{i}, mb)")
            else:
                dec.append(f"    if not ({test}): raise bad(d, {wire!r}, {v}, c{i}, mb)")
                head.append(f"{wire!r}: {out}")
                chk.append(f"    if not ({test}): "
                           f"raise bad_value({wire!r}, {v}, c{i}, mb)")
            if convert is not None:
                dec.append(f"    if {v} is not D{i}: {v} = cv{i}({v}, mb)")
        dec.append(f"    fr = new(cls, ({''.join(f'v{i}, ' for i in range(len(cls._fields)))}))")
        if rule is not None:
            dec.append("    problem = rule(fr)")
            dec.append("    if problem is not None: raise FieldError(problem)")
        dec.append("    return fr")
        enc.append(f"    d = {{{', '.join(head)}}}")
        enc.extend(tail)
        enc.append("    return d")
        if flat:  # the checks in field order, as `decode` makes them, then `encode`'s map
            chk.extend(enc[2:])
        else:
            chk[1:] = ["    d = encode(fr)", "    decode(d, mb)", "    return d"]
        self.source = "\n\n".join("\n".join(fn) for fn in (dec, enc, chk)) + "\n"
        exec(compile(self.source, f"<protocol.frames {cls.__name__}>", "exec"), ns)
        self.decode = ns["decode"]
        self.encode = ns["encode"]
        self.checked = ns["checked"]


def _bad(d: dict, wire: str, v: Any, check: Any, mb: int) -> FieldError:
    if wire not in d:
        return FieldError(f"missing field {wire!r}")
    return _bad_value(wire, v, check, mb)


def _bad_value(wire: str, v: Any, check: Any, mb: int) -> FieldError:
    return FieldError(f"bad value for field {wire!r}: {f.explain(check, v, mb)}")


_SPECS: dict[type, _Spec] = {}
CLIENT_FRAMES: dict[str, type] = {}
"""Frame classes a client may send, by wire type."""
SERVER_FRAMES: dict[str, type] = {}
"""Frame classes a server may send, by wire type."""


def _eq(a: object, b: object) -> bool:
    return type(a) is type(b) and tuple.__eq__(a, b)  # type: ignore[arg-type]


def _ne(a: object, b: object) -> bool:
    return not _eq(a, b)


def _hash(a: tuple) -> int:
    return hash((type(a).__name__, *a))


def _register(cls: type, type_: str | None, senders: str, rule: Any = None, **checks: Any) -> None:
    cls.TYPE = type_
    cls.__eq__ = _eq
    cls.__ne__ = _ne
    cls.__hash__ = _hash
    _SPECS[cls] = _Spec(cls, type_, checks, rule)
    if "c" in senders:
        CLIENT_FRAMES[type_] = cls
    if "s" in senders:
        SERVER_FRAMES[type_] = cls


# -- nested values --------------------------------------------------------------------------


class PageMessage(NamedTuple):
    """One stored message inside a ``page`` frame (§5.3)."""

    seq: int
    sender: str
    body: str | bytes
    cid: str
    ts: int
    lsn: int


class ConvEntry(NamedTuple):
    """One of the user's conversations inside a ``conv_list`` frame (§5.3): unread counts are
    ``last_seq - read``."""

    conv: str
    kind: str
    role: str
    last_seq: int
    read: int
    muted: bool = False
    name: str | None = None


# -- client -> server (§5.2) ----------------------------------------------------------------


class Hello(NamedTuple):
    """Opens a session: the first and only frame a client sends before ``welcome``."""

    versions: tuple[int, ...]
    token: str
    device: str
    id: int | None = None
    caps: tuple[str, ...] = ()
    max_frame: int | None = None
    # Where a device the broker has no cursor for starts (§5.2, §9): "first" (None: the
    # default), its user's inbox from inbox_seq 1; "head", after the inbox head as of the hello.
    start: str | None = None
    # False: a requests-only session of the device (§5.2, §9): sent no deliveries and no
    # pushes, it replaces no session of its device and none replaces it.
    deliver: bool = True


class Send(NamedTuple):
    """Posts a message to a user (``to``, a direct conversation) or a conversation (``conv``)."""

    id: int
    cid: str
    body: str | bytes
    to: str | None = None
    conv: str | None = None


class Ack(NamedTuple):
    """Acknowledges the device's deliveries up to inbox_seq ``upto`` (cumulative)."""

    upto: int
    id: int | None = None


class Read(NamedTuple):
    """Marks a conversation read up to conv seq ``upto``."""

    conv: str
    upto: int
    id: int | None = None


class History(NamedTuple):
    """Asks for a page of a conversation's messages."""

    id: int
    conv: str
    before: int | None = None
    after: int | None = None
    limit: int = 50
    order: str = "newest"


class Create(NamedTuple):
    """Creates a group or channel; the sender becomes its owner."""

    id: int
    kind: str
    name: str
    members: tuple[str, ...] = ()
    open: bool = False
    cid: str | None = None


class Invite(NamedTuple):
    """Adds a user to a conversation with a role."""

    id: int
    conv: str
    user: str
    role: str = "member"


class SetRole(NamedTuple):
    """Makes a member of a group or channel a plain member or an admin (owners and admins)."""

    id: int
    conv: str
    user: str
    role: str


class Remove(NamedTuple):
    """Takes a member out of a group or channel (owners and admins)."""

    id: int
    conv: str
    user: str


class Join(NamedTuple):
    """Joins an open group."""

    id: int
    conv: str


class Leave(NamedTuple):
    """Leaves a conversation."""

    id: int
    conv: str


class Subscribe(NamedTuple):
    """Subscribes to an open channel (read-only membership)."""

    id: int
    conv: str


class Receipts(NamedTuple):
    """Asks who has been delivered and who has read message ``seq`` of a conversation.

    With ``after`` (a user id, or "" for the first page; since 2026-12-07, the welcome cap
    ``receipts_paged``) the reply is a page: the audience members whose ids sort after it,
    as many as fit the connection's max_frame. Without it, the whole answer or nothing."""

    id: int
    conv: str
    seq: int
    after: str | None = None


class Members(NamedTuple):
    """Asks for a conversation's kind, name and members by role.

    With ``after`` (a user id, or "" for the first page; since 2026-12-07, the welcome cap
    ``members_paged``) the reply is a page: the members whose ids sort after it, as many as
    fit the connection's max_frame. Without it, the whole list or nothing."""

    id: int
    conv: str
    after: str | None = None


class Presence(NamedTuple):
    """Asks which members of a conversation are online."""

    id: int
    conv: str


class Convs(NamedTuple):
    """Asks for a page of the user's conversations, in conv id order, after ``after``."""

    id: int
    after: str | None = None
    limit: int = 100


class Typing(NamedTuple):
    """Says the user is typing in a conversation (ephemeral, no reply)."""

    conv: str


class Mute(NamedTuple):
    """Mutes or unmutes a conversation for the user."""

    id: int
    conv: str
    muted: bool = True


class Revoke(NamedTuple):
    """Revokes every token of `user` issued up to now (admin tokens only)."""

    id: int
    user: str


class Stats(NamedTuple):
    """Asks for the broker's figures as they are now (admin tokens only): whether it commits,
    how far behind it is, what it did since it started; with `user` and `device`, also how far
    that device's deliveries are behind the user's inbox (PROTOCOL.md §5.2)."""

    id: int
    user: str | None = None
    device: str | None = None


# -- both directions (§5.4) -----------------------------------------------------------------


class Ping(NamedTuple):
    """Heartbeat or liveness probe; the peer answers ``pong`` with the same id."""

    id: int | None = None


class Pong(NamedTuple):
    """Answer to ``ping``."""

    id: int | None = None


class Bye(NamedTuple):
    """Orderly close: the sender sends nothing more and the receiver must not either."""

    reason: str | None = None


# -- server -> client (§5.3) ----------------------------------------------------------------


class Welcome(NamedTuple):
    """Accepts a ``hello``: the session is open."""

    version: int
    session: str
    user: str
    time: int
    max_frame: int
    heartbeat: int
    acked: int
    head: int
    caps: tuple[str, ...]
    id: int | None = None
    role: str | None = None  # the token's role: "user", "service", "admin" or "monitor"
    max_body: int | None = None  # the largest message body the server accepts, in bytes
    # Groups of more members than this have their receipts pushed to owners and admins only
    # (§9): their other members ask `receipts`. None: the server did not say (before 2026-12-05).
    receipt_audience: int | None = None


class Result(NamedTuple):
    """Reply to ``send``: where the message landed; ``dup`` if the cid was seen before."""

    id: int
    conv: str
    seq: int
    lsn: int
    cid: str
    dup: bool


class Ok(NamedTuple):
    """Success reply to read, invite, set_role, remove, join, leave, subscribe, mute and
    ack-with-id."""

    id: int
    conv: str | None = None


class Revoked(NamedTuple):
    """Reply to ``revoke``: tokens of `user` issued before `before` (Unix seconds) are refused,
    and the user's sessions opened with one of them are closed."""

    id: int
    user: str
    before: int


class BrokerStats(NamedTuple):
    """Reply to ``stats``: the figures of the `broker_stats` log line as they are now, the
    counters summed since the broker started (a monitor takes their rates itself)."""

    id: int
    lsn: int
    queued: int
    committing: int
    commit_running_ms: int
    failing: bool
    commits: int
    commit_ms: int
    commands: int
    failed: int
    rate_limited: int
    connections: int
    requests_only: int
    handshaking: int
    uptime_s: int
    disk_free_bytes: int | None = None
    head: int | None = None  # asked of a `user` and `device`: the user's inbox head
    acked: int | None = None  # and the device's last ack
    # of `commits`, those the store stopped at --max-batch-rows (absent from a broker before it)
    commits_stopped: int | None = None
    # Near the limits (each absent from a broker before 2026-12-07): --max-connections, the
    # connections refused at it or for want of a file descriptor, and those refused at
    # --max-handshakes, since the start; the descriptors held and the open-file limit (absent
    # where they cannot be told); the seconds left until the TLS certificate expires (absent
    # without TLS, 0 once it has).
    max_connections: int | None = None
    connections_full: int | None = None
    handshakes_full: int | None = None
    open_files: int | None = None
    open_files_limit: int | None = None
    tls_expires_s: int | None = None
    # Of the devices connected: the most entries waiting for one device's ack, and how many
    # hold their whole window unacked (absent from a broker before 2026-12-07).
    backlog_max: int | None = None
    windows_full: int | None = None
    # Hellos refused past their address's --auth-fail-rate (unlogged), and `accept`s that
    # failed for want of memory or descriptors, since the start (absent from a broker before
    # 2026-12-07's second).
    auth_throttled: int | None = None
    accept_failed: int | None = None
    # Handshake places of silent connections given up to connections that spoke, since the
    # start (absent from a broker before 2026-12-07's fourth).
    handshakes_given_up: int | None = None


class Created(NamedTuple):
    """Reply to ``create``: the new conversation's id (`dup`: the first answer to a repeated
    cid, nothing created)."""

    id: int
    conv: str
    dup: bool = False


class Page(NamedTuple):
    """Reply to ``history``."""

    id: int
    conv: str
    messages: tuple[PageMessage, ...]
    more: bool


class ReceiptList(NamedTuple):
    """Reply to ``receipts``."""

    id: int
    conv: str
    seq: int
    delivered: tuple[str, ...]
    read: tuple[str, ...]
    # The rest of the message's audience (the members other than its sender who were members
    # when it was posted, of whom `delivered` and `read` are the ones its marks reached): those
    # who have not read it. None: the server did not say (before 2026-12-06; it counted
    # members who joined later as having it).
    unread: tuple[str, ...] | None = None
    # A page (asked with `after`): more members follow, from the one after `last`, the last
    # member this page covers (the next page's `after`). `last` is None when `more` is not.
    more: bool = False
    last: str | None = None


class MemberList(NamedTuple):
    """Reply to ``members``: the conversation's kind and name, its members by role."""

    id: int
    conv: str
    kind: str
    owners: tuple[str, ...]
    admins: tuple[str, ...]
    members: tuple[str, ...]
    name: str | None = None
    # A page (asked with `after`): more members follow, from the one after `last`, the last
    # member this page covers (the next page's `after`). `last` is None when `more` is not.
    more: bool = False
    last: str | None = None


class ConvList(NamedTuple):
    """Reply to ``convs``: a page of the user's conversations; ``more`` when others follow."""

    id: int
    convs: tuple[ConvEntry, ...]
    more: bool


class PresenceList(NamedTuple):
    """Reply to ``presence``."""

    id: int
    conv: str
    online: tuple[str, ...]


class Deliver(NamedTuple):
    """Push: one entry of the user's inbox (a message, or a membership change)."""

    inbox_seq: int
    kind: str
    conv: str
    seq: int
    sender: str
    body: str | bytes | None
    cid: str | None
    ts: int
    muted: bool = False


class Receipt(NamedTuple):
    """Push: a member's delivered/read marks moved in a conversation."""

    conv: str
    user: str
    delivered: int | None = None
    read: int | None = None


class Status(NamedTuple):
    """Push: a contact came online or went offline."""

    user: str
    online: bool


class TypingNotice(NamedTuple):
    """Push: a member is typing (wire type ``typing``, server to client)."""

    conv: str
    user: str


class Error(NamedTuple):
    """A request failed, or (close=true) the connection is ending; see the registry in §7."""

    code: int
    name: str
    message: str
    id: int | None = None
    close: bool = False
    # With `rate_limited`: milliseconds until the rate that refused the request allows it again
    # (a hint: the user's other connections may spend it first). None: no hint.
    retry_ms: int | None = None


# -- the field table ------------------------------------------------------------------------

_ID = f.uint
START_POINTS = ("first", "head")  # hello.start
_NAME = f.text(1, f.MAX_NAME_CHARS)
_CAPS = f.array(f.text(1, f.MAX_CAP_CHARS), 0, f.MAX_CAPS)
# welcome.caps is `[str] <= 16` (PROTOCOL.md 5.3): free-form, no per-string bound beyond the frame.
_WELCOME_CAPS = f.array(f.text(0, MAX_FRAME_LIMIT), 0, f.MAX_CAPS)
_USERS = f.user_list(f.MAX_USER_LIST)


def _stats_rule(frame: Stats) -> str | None:
    if (frame.user is None) != (frame.device is None):
        return "'user' and 'device' go together"
    return None


def _send_rule(frame: Send) -> str | None:
    if (frame.to is None) == (frame.conv is None):
        return "exactly one of 'to' and 'conv' is required"
    return None


def _nested(cls: type, field: str, most: int) -> tuple:
    """The field check of an array of `cls` maps (at most `most`): items arrive as `cls`
    tuples; going out they may also be wire-form dicts, which `Connection.send` checks all
    the same (by the round trip)."""
    what = f"{field!r} items must be maps"

    def into(v: Any, mb: int) -> tuple:
        spec = _SPECS[cls]
        if any(type(item) is not dict for item in v):
            raise FieldError(what)
        return tuple(decode_map(spec, item, mb) for item in v)

    def out(v: Any) -> list[dict]:
        spec = _SPECS[cls]
        return [item if type(item) is dict else encode_map(spec, item) for item in v]

    return f.array(lambda item, mb: True, 0, most), into, out


# Storage returns a page's messages as wire-form dicts ({seq, from, body, cid, ts, lsn}).
_MESSAGES = _nested(PageMessage, "messages", f.MAX_PAGE_MESSAGES)
_CONVS = _nested(ConvEntry, "convs", f.MAX_CONV_LIST)

_register(PageMessage, None, "", seq=f.uint, sender=f.user_id, body=f.body, cid=f.cid,
          ts=f.uint, lsn=f.uint)

_register(ConvEntry, None, "", conv=f.conv_id, kind=f.one_of("direct", "group", "channel"),
          role=f.one_of("owner", "admin", "member"), last_seq=f.uint, read=f.uint,
          muted=f.boolean, name=_NAME)

_register(Hello, "hello", "c", versions=f.array(f.uint, 1, f.MAX_VERSIONS),
          token=f.text(0, f.MAX_TOKEN_CHARS), device=f.user_id, id=_ID, caps=_CAPS,
          max_frame=f.uint, start=f.one_of(*START_POINTS), deliver=f.boolean)
_register(Send, "send", "c", _send_rule, id=_ID, cid=f.cid, body=f.body, to=f.user_id,
          conv=f.conv_id)
_register(Ack, "ack", "c", upto=f.uint, id=_ID)
_register(Read, "read", "c", conv=f.conv_id, upto=f.uint, id=_ID)
_register(History, "history", "c", id=_ID, conv=f.conv_id, before=f.uint, after=f.uint,
          limit=f.int_range(1, f.MAX_HISTORY_LIMIT), order=f.one_of("newest", "oldest"))
_register(Create, "create", "c", id=_ID, kind=f.one_of("group", "channel"), name=_NAME,
          members=f.user_list(f.MAX_MEMBERS), open=f.boolean, cid=f.cid)
_register(Invite, "invite", "c", id=_ID, conv=f.conv_id, user=f.user_id,
          role=f.one_of("member", "admin"))
_register(SetRole, "set_role", "c", id=_ID, conv=f.conv_id, user=f.user_id,
          role=f.one_of("member", "admin"))
_register(Join, "join", "c", id=_ID, conv=f.conv_id)
_register(Leave, "leave", "c", id=_ID, conv=f.conv_id)
_register(Remove, "remove", "c", id=_ID, conv=f.conv_id, user=f.user_id)
_register(Subscribe, "subscribe", "c", id=_ID, conv=f.conv_id)
_register(Receipts, "receipts", "c", id=_ID, conv=f.conv_id, seq=f.uint,
          after=f.user_id_or_empty)
_register(Presence, "presence", "c", id=_ID, conv=f.conv_id)
_register(Members, "members", "c", id=_ID, conv=f.conv_id, after=f.user_id_or_empty)
_register(Convs, "convs", "c", id=_ID, after=f.conv_id, limit=f.int_range(1, f.MAX_CONV_LIST))
_register(Typing, "typing", "c", conv=f.conv_id)
_register(Mute, "mute", "c", id=_ID, conv=f.conv_id, muted=f.boolean)
_register(Revoke, "revoke", "c", id=_ID, user=f.user_id)
_register(Stats, "stats", "c", _stats_rule, id=_ID, user=f.user_id, device=f.user_id)

_register(Ping, "ping", "cs", id=_ID)
_register(Pong, "pong", "cs", id=_ID)
_register(Bye, "bye", "cs", reason=f.text(0, f.MAX_REASON_CHARS))

_register(Welcome, "welcome", "s", version=f.uint, session=_NAME, user=f.user_id, time=f.uint,
          max_frame=f.int_range(MIN_FRAME_LIMIT, MAX_FRAME_LIMIT), heartbeat=f.uint,
          acked=f.uint, head=f.uint, caps=_WELCOME_CAPS, id=_ID,
          role=f.one_of("user", "service", "admin", "monitor"), max_body=f.uint,
          receipt_audience=f.uint)
_register(Result, "result", "s", id=_ID, conv=f.conv_id, seq=f.uint, lsn=f.uint, cid=f.cid,
          dup=f.boolean)
_register(Ok, "ok", "s", id=_ID, conv=f.conv_id)
_register(Created, "created", "s", id=_ID, conv=f.conv_id, dup=f.boolean)
_register(Revoked, "revoked", "s", id=_ID, user=f.user_id, before=f.uint)
_register(BrokerStats, "broker_stats", "s", id=_ID, lsn=f.uint, queued=f.uint,
          committing=f.uint, commit_running_ms=f.uint, failing=f.boolean, commits=f.uint,
          commit_ms=f.uint, commands=f.uint, failed=f.uint, rate_limited=f.uint,
          connections=f.uint, requests_only=f.uint, handshaking=f.uint, uptime_s=f.uint,
          disk_free_bytes=f.uint, head=f.uint, acked=f.uint, commits_stopped=f.uint,
          max_connections=f.uint, connections_full=f.uint, handshakes_full=f.uint,
          open_files=f.uint, open_files_limit=f.uint, tls_expires_s=f.uint,
          backlog_max=f.uint, windows_full=f.uint, auth_throttled=f.uint,
          accept_failed=f.uint, handshakes_given_up=f.uint)
_register(Page, "page", "s", id=_ID, conv=f.conv_id, messages=_MESSAGES, more=f.boolean)
_register(ReceiptList, "receipt_list", "s", id=_ID, conv=f.conv_id, seq=f.uint,
          delivered=_USERS, read=_USERS, unread=_USERS, more=f.boolean, last=f.user_id)
_register(ConvList, "conv_list", "s", id=_ID, convs=_CONVS, more=f.boolean)
_register(PresenceList, "presence_list", "s", id=_ID, conv=f.conv_id, online=_USERS)
_register(MemberList, "member_list", "s", id=_ID, conv=f.conv_id,
          kind=f.one_of("direct", "group", "channel"), owners=_USERS, admins=_USERS,
          members=_USERS, name=_NAME, more=f.boolean, last=f.user_id)
_register(Deliver, "deliver", "s", inbox_seq=f.uint, kind=f.one_of("msg", "added", "removed"),
          conv=f.conv_id, seq=f.uint, sender=f.user_id, body=f.body_or_nil, cid=f.cid_or_nil,
          ts=f.uint, muted=f.boolean)
_register(Receipt, "receipt", "s", conv=f.conv_id, user=f.user_id, delivered=f.uint,
          read=f.uint)
_register(Status, "status", "s", user=f.user_id, online=f.boolean)
_register(TypingNotice, "typing", "s", conv=f.conv_id, user=f.user_id)
_register(Error, "error", "s", code=f.uint, name=f.text(1, 64),
          message=f.text(0, f.MAX_MESSAGE_CHARS), id=_ID, close=f.boolean, retry_ms=f.uint)

ALL_FRAMES: tuple[type, ...] = tuple(c for c in _SPECS if c.TYPE is not None)
"""Every frame class, client, server and both-ways."""

KNOWN_TYPES: frozenset[str] = frozenset(CLIENT_FRAMES) | frozenset(SERVER_FRAMES)
"""Every wire type this version knows, in either direction."""


# -- conversion -----------------------------------------------------------------------------


def decode_map(spec: _Spec, d: dict, max_body: int) -> Any:
    """Build the frame described by `spec` from decoded map `d`, or raise `FieldError`."""
    return spec.decode(d, max_body)


def encode_map(spec: _Spec, frame: tuple) -> dict:
    """The wire map of `frame` (without checking it); optional defaults are left out."""
    return spec.encode(frame)


def spec_of(cls: type) -> _Spec:
    """The field table entry of a frame class (KeyError if `cls` is not a frame class)."""
    return _SPECS[cls]


def to_wire(frame: tuple) -> dict:
    """The wire map of `frame`, with its ``"t"`` (fields are not checked; see `from_wire`)."""
    return encode_map(_SPECS[type(frame)], frame)


def from_wire(cls: type, d: dict, max_body: int = f.MAX_BODY_BYTES) -> Any:
    """Build a `cls` frame from decoded map `d`, checking every field; raise `FieldError`.

    ``d["t"]`` is not looked at: the caller chose `cls` from it. Unknown keys are ignored.
    """
    return decode_map(_SPECS[cls], d, max_body)


def error_frame(
    code: ErrorCode, message: str, request_id: int | None = None, close: bool | None = None,
    retry_ms: int | None = None,
) -> Error:
    """An ``error`` frame for `code`; `close` defaults to whether the code always closes."""
    if close is None:
        close = code in ALWAYS_CLOSE
    return Error(int(code), code.name.lower(), message[: f.MAX_MESSAGE_CHARS], request_id, close,
                 retry_ms)


