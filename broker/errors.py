"""The one place where storage and domain errors become wire error codes."""

from __future__ import annotations

from enum import Enum

from protocol import ErrorCode
from storage.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InternalError,
    Invalid,
    LimitExceeded,
    StorageError,
    StorageFull,
)


class CloseReason(Enum):
    """Why a connection ended, recorded in its closing log line."""

    PEER_EOF = "peer_eof"  # they closed the stream (or vanished without bye)
    PEER_BYE = "peer_bye"  # they said bye
    BROKEN = "broken"  # the stream failed under us (reset, TLS error)
    PROTOCOL_ERROR = "protocol_error"  # they broke the protocol; we closed
    AUTH_FAILED = "auth_failed"
    # its token failed past its address's --auth-fail-rate: not logged each (hellos.py)
    AUTH_THROTTLED = "auth_throttled"
    REVOKED = "revoked"  # an admin revoked the token it authenticated with
    TIMEOUT = "timeout"  # handshake or idle timeout
    LIMIT = "limit"  # a connection limit refused them
    SLOW_CONSUMER = "slow_consumer"  # their push queue overflowed
    TOO_LARGE = "too_large"  # a delivery does not fit the max_frame they asked for
    REPLACED = "replaced"  # the same device connected again
    SHUTDOWN = "shutdown"  # the broker is stopping
    STORAGE = "storage"  # a read of the store failed (hello, its inbox); the client reconnects


def wire_error(exc: BaseException) -> tuple[ErrorCode, str]:
    """The error code and message a client sees for `exc`."""
    match exc:
        case Forbidden():
            return ErrorCode.FORBIDDEN, str(exc) or "forbidden"
        case Invalid():
            return ErrorCode.INVALID, str(exc) or "invalid"
        case Conflict():
            return ErrorCode.CONFLICT, str(exc) or "conflict"
        case LimitExceeded():
            return ErrorCode.LIMIT_EXCEEDED, str(exc) or "limit exceeded"
        case DomainError():
            return ErrorCode.INVALID, str(exc) or "invalid"
        case InternalError():  # a batch failed on a bug (logged with it: batch_internal_error)
            return ErrorCode.INTERNAL, "internal error"
        case StorageFull():
            return ErrorCode.UNAVAILABLE, "storage full: the broker cannot accept writes now"
        case StorageError():
            return ErrorCode.UNAVAILABLE, "storage unavailable"
        case _:
            return ErrorCode.INTERNAL, "internal error"
