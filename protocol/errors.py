"""The error registry and the exceptions of the protocol layer.

Every error a client can see has a stable integer code from `ErrorCode` (PROTOCOL.md §7). Codes
are never reused or renumbered: a retired code stays in the enum with a comment saying so. The
wire ``name`` of a code is its lower-case member name (``ErrorCode.BAD_FRAME`` is
``"bad_frame"``).

Exceptions split the h11 way: `LocalProtocolError` means our own code misused this package
(sent a server frame from a client, sent after ``bye``); `RemoteProtocolError` means the peer
broke the protocol. Both carry the code the broker should put in its ``error`` frame.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Stable wire error codes (PROTOCOL.md §7); numbers are never reused."""

    BAD_FRAME = 1  # malformed framing or msgpack, a frame not allowed in this state
    TOO_LARGE = 2  # the declared frame length exceeds the agreed max_frame
    UNSUPPORTED_VERSION = 3  # no version in hello.versions is spoken by the server
    UNAUTHORIZED = 4  # the hello token is missing, invalid or expired
    FORBIDDEN = 5  # no access to the conversation (also used for "does not exist")
    NOT_FOUND = 6  # the named object does not exist and its existence is not secret
    INVALID = 7  # a known frame type with a missing or ill-typed field, or a broken rule
    CONFLICT = 8  # the request conflicts with current state (already a member, ...)
    RATE_LIMITED = 9  # too many requests; retry later
    UNAVAILABLE = 10  # the server cannot serve this now (storage full, overloaded)
    INTERNAL = 11  # a bug on the server; the request may or may not have taken effect
    UNKNOWN_TYPE = 12  # the frame's "t" is not a type this server knows
    REJECTED_CONTENT = 13  # the message body was refused by a content policy
    TIMEOUT = 14  # the connection was silent for 3 x heartbeat, or no hello in time
    LIMIT_EXCEEDED = 15  # a quota was hit (members, sessions per user), or a reply above max_frame
    SLOW_CONSUMER = 16  # the client could not keep up and was disconnected
    SHUTTING_DOWN = 17  # the server is stopping; reconnect elsewhere or later

    @property
    def wire_name(self) -> str:
        """The ``name`` field sent in an ``error`` frame for this code."""
        return self.name.lower()


# PROTOCOL.md §7: these codes always end the connection; the error frame carries close=true.
ALWAYS_CLOSE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.BAD_FRAME,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.SHUTTING_DOWN,
    }
)


def closes_connection(code: int, in_place_of_welcome: bool = False) -> bool:
    """Say whether an error with `code` ends the connection (PROTOCOL.md §7).

    An error sent in place of ``welcome`` (the answer to ``hello``) always closes, whatever its
    code: that is how ``LIMIT_EXCEEDED`` (too many sessions) and ``INVALID`` (a bad hello) end a
    handshake. After the handshake only the codes in `ALWAYS_CLOSE` close.
    """
    return in_place_of_welcome or code in ALWAYS_CLOSE


class ProtocolError(Exception):
    """A protocol violation, carrying what the error frame for it should say.

    `code` is an `ErrorCode`, `message` short human text (at most 1024 characters on the wire),
    `request_id` the ``id`` of the offending request if it had a valid one (else None), and
    `fatal` whether the connection is now unusable (its state is ERROR).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: int | None = None,
        fatal: bool = True,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.fatal = fatal

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.code.name}, {self.message!r}, "
            f"request_id={self.request_id!r}, fatal={self.fatal!r})"
        )


class LocalProtocolError(ProtocolError):
    """Raised when our own code misuses a `Connection`: a frame of the wrong direction, a frame
    the state forbids, an invalid field in a frame we were asked to send, use after ERROR.

    Sending nothing happened: no bytes were produced and the state did not change.
    """


class RemoteProtocolError(ProtocolError):
    """Raised by `Connection.next_event` when the peer broke the protocol.

    If `fatal` the connection is in ERROR; the caller should send an ``error`` frame with
    `code` and close=true, then close the transport. Otherwise the offending frame was
    consumed, the connection is still usable, and the caller replies with an ``error`` frame
    carrying `request_id` and goes on.
    """
