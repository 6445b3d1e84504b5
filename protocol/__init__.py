"""homing's wire protocol, sans-IO: bytes in, frames out, and back (docs/PROTOCOL.md).

Typical server use::

    conn = Connection(Role.SERVER)
    conn.receive_data(chunk)            # b"" at EOF
    while (event := conn.next_event()) is not NEED_DATA:
        if event is CLOSED: ...
        handle(event)                   # a frame object, e.g. Hello, Send, Ack
    stream.send_all(conn.send(Result(...)))

No trio, sockets, storage or logging live here; the broker, the client SDK and the benchmarks all
share it.
"""

from .codec import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_VALUES,
    HELLO_MAX_FRAME_BYTES,
    MAX_FRAME_LIMIT,
    MIN_FRAME_LIMIT,
    MIN_FRAME_VALUES,
    encode_frame,
)
from .connection import CLOSED, NEED_DATA, Connection
from .errors import (
    ALWAYS_CLOSE,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    closes_connection,
)
from .fields import MAX_BODY_BYTES, UINT_MAX
from .frames import (
    ALL_FRAMES,
    CLIENT_FRAMES,
    KNOWN_TYPES,
    SERVER_FRAMES,
    Ack,
    BrokerStats,
    Bye,
    ConvEntry,
    ConvList,
    Convs,
    Create,
    Created,
    Deliver,
    Error,
    FieldError,
    Hello,
    History,
    Invite,
    Join,
    Leave,
    MemberList,
    Members,
    Mute,
    Ok,
    Page,
    PageMessage,
    Ping,
    Pong,
    Presence,
    PresenceList,
    Read,
    Receipt,
    ReceiptList,
    Receipts,
    Remove,
    Result,
    Revoke,
    Revoked,
    Send,
    SetRole,
    Stats,
    Status,
    Subscribe,
    Typing,
    TypingNotice,
    Welcome,
    error_frame,
    from_wire,
    to_wire,
)
from .prepared import PreparedDeliver
from .state import Role, State

PROTOCOL_VERSION = 1
"""The protocol version this package speaks (hello.versions / welcome.version, §3.1)."""

SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)

CAP_CREATE_CID = "create_cid"
"""The welcome cap of a server that honours a ``create``'s ``cid`` (§9, "Idempotent create"):
a client may repeat such a create after a drop. A server without it ignores the cid, and a
repeat would make a second conversation."""

CAP_START_HEAD = "start_head"
"""The welcome cap of a server that honours a ``hello``'s ``start`` (§5.2, §9): a new device
that asks for "head" starts after the inbox head. A server without it ignores the field, and
the device is sent the user's whole inbox from inbox_seq 1."""

CAP_REQUESTS_ONLY = "requests_only"
"""The welcome cap of a server that honours a ``hello``'s ``deliver: false`` (§5.2, §9): the
session is a requests-only session of its device (no deliveries, no pushes; it replaces no
session and none replaces it). A server without it ignores the field: the session is the
device's delivering session, and replaces the one the device had."""

CAP_RECEIPTS_PAGED = "receipts_paged"
"""The welcome cap of a server that honours a ``receipts``' ``after`` (§5.2, since 2026-12-07):
its ``receipt_list`` is then a page of the audience, as many members as fit the max_frame, with
``more`` and ``last`` (the next page's ``after``). A server without it ignores the field and
answers the whole list, or ``limit_exceeded`` when it does not fit."""

CAP_MEMBERS_PAGED = "members_paged"
"""The welcome cap of a server that honours a ``members``' ``after`` (§5.2, since 2026-12-07):
its ``member_list`` is then a page of the members, as many as fit the max_frame, each in the
list of its role, with ``more`` and ``last`` (the next page's ``after``). A server without it
ignores the field and answers the whole list, or ``limit_exceeded`` when it does not fit."""

BYE_REPLACED = "replaced by a new session"
"""The reason of the ``bye`` a session gets when its user and device connected again (§9)."""


def choose_version(offered: tuple[int, ...] | list[int]) -> int | None:
    """The highest version in `offered` that we speak, or None (answer UNSUPPORTED_VERSION)."""
    common = set(offered).intersection(SUPPORTED_VERSIONS)
    return max(common) if common else None


def agree_max_frame(offered: int | None, ours: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """The max_frame a server puts in welcome: the smaller of offer and ours (§3.2)."""
    if offered is None:
        return ours
    return max(MIN_FRAME_LIMIT, min(offered, ours, MAX_FRAME_LIMIT))


def largest_deliver_frame(max_body_bytes: int) -> int:
    """The largest ``deliver`` frame body a message within `max_body_bytes` can make (§3.2).

    Every other field at its largest: the longest ids, a cid of four-byte characters, the
    largest uints. A server whose max_frame is below this could accept a send whose delivery
    no device can ever receive; `homing serve` refuses such a pair of limits.
    """
    from .fields import MAX_CID_CHARS, MAX_CONV_CHARS

    widest = Deliver(inbox_seq=UINT_MAX, kind="removed", conv="grp:" + "c" * (MAX_CONV_CHARS - 4),
                     seq=UINT_MAX, sender="u" * 64, body=b"", cid="\U0001F600" * MAX_CID_CHARS,
                     ts=UINT_MAX, muted=True)
    # Less its 4-byte length prefix, plus the body; the empty body's 1-byte header becomes one
    # of up to 5 bytes, which those 4 cover.
    return len(encode_frame(to_wire(widest))) + max_body_bytes


__all__ = [
    "ALL_FRAMES",
    "ALWAYS_CLOSE",
    "BYE_REPLACED",
    "CAP_CREATE_CID",
    "CAP_MEMBERS_PAGED",
    "CAP_RECEIPTS_PAGED",
    "CAP_REQUESTS_ONLY",
    "CAP_START_HEAD",
    "CLIENT_FRAMES",
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_FRAME_VALUES",
    "HELLO_MAX_FRAME_BYTES",
    "KNOWN_TYPES",
    "MAX_BODY_BYTES",
    "MAX_FRAME_LIMIT",
    "MIN_FRAME_LIMIT",
    "MIN_FRAME_VALUES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SERVER_FRAMES",
    "SUPPORTED_VERSIONS",
    "UINT_MAX",
    "Ack",
    "BrokerStats",
    "Bye",
    "Connection",
    "ConvEntry",
    "ConvList",
    "Convs",
    "Create",
    "Created",
    "Deliver",
    "Error",
    "ErrorCode",
    "FieldError",
    "Hello",
    "History",
    "Invite",
    "Join",
    "Leave",
    "LocalProtocolError",
    "MemberList",
    "Members",
    "Mute",
    "Ok",
    "Page",
    "PageMessage",
    "Ping",
    "Pong",
    "PreparedDeliver",
    "Presence",
    "PresenceList",
    "ProtocolError",
    "Read",
    "Receipt",
    "ReceiptList",
    "Receipts",
    "RemoteProtocolError",
    "Remove",
    "Result",
    "Revoke",
    "Revoked",
    "Role",
    "Send",
    "SetRole",
    "State",
    "Stats",
    "Status",
    "Subscribe",
    "Typing",
    "TypingNotice",
    "Welcome",
    "agree_max_frame",
    "choose_version",
    "closes_connection",
    "encode_frame",
    "error_frame",
    "from_wire",
    "largest_deliver_frame",
    "to_wire",
]
