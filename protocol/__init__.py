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

from .codec import DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_LIMIT, MIN_FRAME_LIMIT, encode_frame
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
    Bye,
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
    Result,
    Send,
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


def choose_version(offered: tuple[int, ...] | list[int]) -> int | None:
    """The highest version in `offered` that we speak, or None (answer UNSUPPORTED_VERSION)."""
    common = set(offered).intersection(SUPPORTED_VERSIONS)
    return max(common) if common else None


def agree_max_frame(offered: int | None, ours: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """The max_frame a server puts in welcome: the smaller of offer and ours (§3.2)."""
    if offered is None:
        return ours
    return max(MIN_FRAME_LIMIT, min(offered, ours, MAX_FRAME_LIMIT))


__all__ = [
    "ALL_FRAMES",
    "ALWAYS_CLOSE",
    "CLIENT_FRAMES",
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "KNOWN_TYPES",
    "MAX_BODY_BYTES",
    "MAX_FRAME_LIMIT",
    "MIN_FRAME_LIMIT",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SERVER_FRAMES",
    "SUPPORTED_VERSIONS",
    "UINT_MAX",
    "Ack",
    "Bye",
    "Connection",
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
    "Result",
    "Role",
    "Send",
    "State",
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
    "to_wire",
]
