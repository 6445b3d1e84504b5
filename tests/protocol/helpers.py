"""Protocol test helpers: frame strategies and a client/server pair joined by a fake link."""

from __future__ import annotations

from hypothesis import strategies as st

from protocol import (
    ALL_FRAMES,
    CLIENT_FRAMES,
    SERVER_FRAMES,
    UINT_MAX,
    Connection,
    ConvEntry,
    Hello,
    PageMessage,
    Role,
    Welcome,
)

uints = st.integers(0, UINT_MAX) | st.integers(0, 1000)
user_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}", fullmatch=True)
conv_ids = st.from_regex(r"(dm|grp|chn):[A-Za-z0-9_.@+:-]{1,30}", fullmatch=True)
_chars = st.characters(exclude_categories=("Cs",))
cids = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), min_size=1,
               max_size=128)
bodies = st.text(_chars, max_size=60) | st.binary(max_size=60)


def texts(lo: int, hi: int) -> st.SearchStrategy[str]:
    """Text of lo..hi characters (no lone surrogates, which cannot be encoded)."""
    return st.text(_chars, min_size=lo, max_size=min(hi, 40))


users = st.lists(user_ids, max_size=4).map(tuple)
caps = st.lists(texts(1, 64), max_size=16).map(tuple)
page_messages = st.builds(PageMessage, uints, user_ids, bodies, cids, uints, uints)

_BY_NAME = {
    "id": uints, "conv": conv_ids, "user": user_ids, "device": user_ids, "to": user_ids,
    "sender": user_ids, "cid": cids, "body": bodies, "upto": uints, "seq": uints, "lsn": uints,
    "ts": uints, "time": uints, "heartbeat": uints, "acked": uints, "head": uints,
    "inbox_seq": uints, "before": uints, "after": uints, "version": uints, "code": uints,
    "session": texts(1, 128), "name": texts(1, 64), "token": texts(0, 4096),
    "reason": texts(0, 256), "message": texts(0, 1024), "caps": caps,
    "versions": st.lists(uints, min_size=1, max_size=16).map(tuple), "max_frame": uints,
    "max_body": uints, "receipt_audience": uints, "retry_ms": uints, "unread": users,
    "limit": st.integers(1, 200), "order": st.sampled_from(["newest", "oldest"]),
    "members": users, "owners": users, "admins": users, "delivered": users, "read": users,
    "online": users,
    "open": st.booleans(), "muted": st.booleans(), "dup": st.booleans(), "more": st.booleans(),
    "close": st.booleans(), "deliver": st.booleans(), "role": st.sampled_from(["member", "admin"]),
    "messages": st.lists(page_messages, max_size=3).map(tuple),
    "convs": st.lists(st.deferred(lambda: frames_of(ConvEntry)), max_size=3).map(tuple),
    "last_seq": uints, "queued": uints, "committing": uints, "commit_running_ms": uints,
    "failing": st.booleans(), "commits": uints, "commit_ms": uints, "commands": uints,
    "failed": uints, "rate_limited": uints, "connections": uints, "requests_only": uints,
    "handshaking": uints, "uptime_s": uints, "disk_free_bytes": uints, "commits_stopped": uints,
    "max_connections": uints, "connections_full": uints, "handshakes_full": uints,
    "open_files": uints, "open_files_limit": uints, "tls_expires_s": uints,
    "backlog_max": uints, "windows_full": uints, "auth_throttled": uints,
    "accept_failed": uints, "handshakes_given_up": uints,
}
_OVERRIDES = {
    ("Create", "kind"): st.sampled_from(["group", "channel"]),
    ("Deliver", "kind"): st.sampled_from(["msg", "added", "removed"]),
    ("MemberList", "kind"): st.sampled_from(["direct", "group", "channel"]),
    ("Deliver", "body"): st.none() | bodies,
    ("Deliver", "cid"): st.none() | cids,
    ("Welcome", "max_frame"): st.integers(1024, 2**32 - 1),
    ("Hello", "start"): st.sampled_from(["first", "head"]),
    ("Welcome", "role"): st.sampled_from(["user", "service", "admin", "monitor"]),
    ("Receipt", "delivered"): uints,
    ("Receipt", "read"): uints,
    ("Status", "online"): st.booleans(),
    ("Convs", "after"): conv_ids,
    ("Receipts", "after"): st.just("") | user_ids,  # "": the first page
    ("ReceiptList", "last"): user_ids,
    ("Members", "after"): st.just("") | user_ids,  # "": the first page
    ("MemberList", "last"): user_ids,
    ("Convs", "limit"): st.integers(1, 1000),
    ("ConvEntry", "kind"): st.sampled_from(["direct", "group", "channel"]),
    ("ConvEntry", "role"): st.sampled_from(["owner", "admin", "member"]),
    ("ConvEntry", "read"): uints,
}


def frames_of(cls: type) -> st.SearchStrategy:
    """Valid frames of class `cls`, optional fields sometimes left at their default."""
    args = {}
    for attr in cls._fields:
        key = (cls.__name__, attr)
        strat = _OVERRIDES[key] if key in _OVERRIDES else _BY_NAME[attr]
        if attr in cls._field_defaults:
            strat = st.just(cls._field_defaults[attr]) | strat
        args[attr] = strat
    if cls.__name__ == "Send":
        return st.builds(
            lambda base, to, conv, use_to: base._replace(
                to=to if use_to else None, conv=None if use_to else conv
            ),
            st.builds(cls, **args), user_ids, conv_ids, st.booleans(),
        )
    if cls.__name__ == "Stats":  # a user and a device, or neither
        return st.builds(lambda i, who: cls(i, *who), uints,
                         st.just((None, None)) | st.tuples(user_ids, user_ids))
    return st.builds(cls, **args)


CLIENT_OPEN = [c for t, c in CLIENT_FRAMES.items() if t not in ("hello", "bye")]
SERVER_OPEN = [c for t, c in SERVER_FRAMES.items() if t not in ("welcome", "bye", "error")]
client_open_frames = st.one_of([frames_of(c) for c in CLIENT_OPEN])
server_open_frames = st.one_of([frames_of(c) for c in SERVER_OPEN])
all_frames = st.one_of([frames_of(c) for c in ALL_FRAMES])

HELLO = Hello(versions=(1,), token="secret", device="phone", id=1)
WELCOME = Welcome(1, "s-1", "alice", 1_700_000_000_000, 1 << 20, 30, 0, 0, (), id=1)


class ConnectionPair:
    """A client and a server connection joined by a fake link (h11 tests' ConnectionPair)."""

    def __init__(self, **kw) -> None:
        self.client = Connection(Role.CLIENT, **kw)
        self.server = Connection(Role.SERVER, **kw)

    def peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def send(self, conn: Connection, frame) -> list:
        """Send `frame` from `conn`, feed the bytes to the other side, return what it got."""
        other = self.peer(conn)
        other.receive_data(conn.send(frame))
        return drain(other)

    def open(self) -> ConnectionPair:
        """Run the handshake; both sides end OPEN."""
        assert self.send(self.client, HELLO) == [HELLO]
        assert self.send(self.server, WELCOME) == [WELCOME]
        return self


def drain(conn: Connection) -> list:
    """Every event next_event returns until NEED_DATA or CLOSED (CLOSED included)."""
    from protocol import CLOSED, NEED_DATA

    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if ev is CLOSED:
            return out
