"""Field checkers: the types and limits of PROTOCOL.md §4, one predicate each.

A checker is ``check(value, max_body) -> bool``. It must accept any decoded msgpack value
(int, float, str, bytes, bool, None, tuple, dict, ExtType, ...) without raising, because peers
send anything. `max_body` is the connection's body limit in bytes; only body checkers use it.
Arrays arrive as tuples (the codec decodes with use_list=False); outgoing frames may hold lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable

UINT_MAX = (1 << 63) - 1
"""Largest uint on the wire (§4.1): ids, sequence numbers and times all fit a signed int64."""

MAX_BODY_BYTES = 65536
"""Default largest message body in bytes, UTF-8 length for text (§4.1); larger is INVALID."""

MAX_CID_CHARS = 128
MAX_USER_ID_CHARS = 64
MAX_CONV_CHARS = 160
MAX_NAME_CHARS = 128
MAX_TOKEN_CHARS = 4096
MAX_REASON_CHARS = 256
MAX_MESSAGE_CHARS = 1024
MAX_CAP_CHARS = 64
MAX_CAPS = 16
MAX_VERSIONS = 16
MAX_MEMBERS = 1000
MAX_PAGE_MESSAGES = 1000
MAX_USER_LIST = 100_000
MAX_HISTORY_LIMIT = 200
MAX_CONV_LIST = 1000

Check = Callable[[object, int], bool]

_USER_MATCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}").fullmatch
_CONV_MATCH = re.compile(r"(?:dm|grp|chn):[A-Za-z0-9_.@+:-]+").fullmatch
_LISTS = (tuple, list)


def uint(v: object, _mb: int = 0) -> bool:
    """A non-negative int below 2**63 (bool is not an int here)."""
    return type(v) is int and 0 <= v <= UINT_MAX


def boolean(v: object, _mb: int = 0) -> bool:
    """True or false (not 0/1)."""
    return type(v) is bool




# Ids that matched, remembered: the same few thousand ids come in every frame, and a set lookup
# costs a fifth of the regular expression. Emptied when full, so they hold at most this many.
_KNOWN_MAX = 16_384
_KNOWN_USERS: set[str] = set()
_KNOWN_CONVS: set[str] = set()


def _remember(known: set[str], v: str) -> bool:
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(v)
    return True


def _user_match(v: str) -> bool:
    """`v` (an exact str) matches the user id pattern (remembered if it does)."""
    return _USER_MATCH(v) is not None and _remember(_KNOWN_USERS, v)


def _conv_match(v: str) -> bool:
    """`v` (an exact str) is a conversation id (remembered if it is)."""
    return (len(v) <= MAX_CONV_CHARS and _CONV_MATCH(v) is not None
            and _remember(_KNOWN_CONVS, v))


def user_id(v: object, _mb: int = 0) -> bool:
    """A user or device id, ``^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$``."""
    return type(v) is str and (v in _KNOWN_USERS or _user_match(v))


def user_id_or_empty(v: object, _mb: int = 0) -> bool:
    """A user id, or "" (the ``after`` of a first page of ``receipts`` or ``members``)."""
    return v == "" or user_id(v)


def conv_id(v: object, _mb: int = 0) -> bool:
    """A conversation id, ``^(dm|grp|chn):[A-Za-z0-9_.@+:-]+$``, at most 160 chars."""
    return type(v) is str and (v in _KNOWN_CONVS or _conv_match(v))


def cid(v: object, _mb: int = 0) -> bool:
    """A client message id: 1..128 chars, no NUL."""
    return type(v) is str and 0 < len(v) <= MAX_CID_CHARS and "\0" not in v


def body(v: object, mb: int) -> bool:
    """A message body: text whose UTF-8 form, or bytes, of at most `mb` bytes."""
    t = type(v)
    if t is str:
        # Each char is at most 4 UTF-8 bytes, so short text needs no encoding to measure.
        return len(v) * 4 <= mb or len(v.encode("utf-8", "surrogatepass")) <= mb
    return t is bytes and len(v) <= mb


def body_or_nil(v: object, mb: int) -> bool:
    """A body, or nil (membership entries in ``deliver`` carry no body)."""
    return v is None or body(v, mb)


def cid_or_nil(v: object, _mb: int = 0) -> bool:
    """A cid, or nil."""
    return v is None or cid(v)


_WHAT: dict[Check, str] = {
    uint: "an integer from 0 to 2**63-1",
    boolean: "true or false",
    user_id: "an id of 1 to 64 characters of A-Z a-z 0-9 _ . @ + -, the first a letter or digit",
    user_id_or_empty: ('"" or an id of 1 to 64 characters of A-Z a-z 0-9 _ . @ + -, the first '
                       "a letter or digit"),
    conv_id: (f"a conversation id: dm:, grp: or chn: and then A-Z a-z 0-9 _ . @ + : -, "
              f"at most {MAX_CONV_CHARS} characters"),
    cid: f"a client message id of 1 to {MAX_CID_CHARS} characters, without NUL",
    cid_or_nil: f"a client message id of 1 to {MAX_CID_CHARS} characters, without NUL, or nil",
}
"""What each checker accepts, in words, for the error a refused value gets (`explain`);
the factories below add theirs."""
_ARRAYS: dict[Check, tuple[Check, int, int]] = {}
_SHOWN_CHARS = 40


def _shown(v: object) -> str:
    """`v` as an error message may show it: short values whole, long ones by their size."""
    if v is None or type(v) in (bool, int, float):
        return repr(v)
    if type(v) is str:
        return repr(v) if len(v) <= _SHOWN_CHARS else f"a string of {len(v):,} characters"
    if type(v) is bytes:
        return f"{len(v):,} bytes"
    if type(v) in _LISTS:
        return f"an array of {len(v):,} items"
    return "a map" if type(v) is dict else f"a {type(v).__name__}"


def _body_size(v: object) -> int | None:
    if type(v) is str:
        return len(v.encode("utf-8", "surrogatepass"))
    return len(v) if type(v) is bytes else None


def explain(check: Check, v: object, mb: int) -> str:
    """Why `check` refuses `v`, in words: the text after "bad value for field 'x': ". Only
    for a refused value (an error path: it may take its time)."""
    if check is body or check is body_or_nil:
        size = _body_size(v)
        if size is not None:
            return f"a body of {size:,} byte{'' if size == 1 else 's'}, over the limit of {mb:,}"
        return "not text or bytes" + (" or nil" if check is body_or_nil else "")
    shape = _ARRAYS.get(check)
    if shape is not None and type(v) in _LISTS:
        item, lo, hi = shape
        if not lo <= len(v) <= hi:
            return f"{len(v):,} items, not {lo:,} to {hi:,}"
        for i, x in enumerate(v):
            if not item(x, mb):
                return f"item {i}: {explain(item, x, mb)}"
    what = _WHAT.get(check)
    return f"{_shown(v)} is not {what}" if what else f"{_shown(v)} is not allowed here"


INLINE: dict[Check, str] = {
    uint: "type({v}) is int and 0 <= {v} <= UINT_MAX",
    boolean: "type({v}) is bool",
    user_id: "type({v}) is str and ({v} in KNOWN_USERS or USER_OK({v}))",
    conv_id: "type({v}) is str and ({v} in KNOWN_CONVS or CONV_OK({v}))",
    cid: "type({v}) is str and 0 < len({v}) <= MAX_CID_CHARS and '\\0' not in {v}",
    body: "(type({v}) is str and len({v}) * 4 <= mb) or c{i}({v}, mb)",
}
"""Checks the generated decoders inline (`{v}` the value, `c{i}` the checker itself): each must
mean exactly what its function does. Names they use: `INLINE_NAMES`."""

INLINE_NAMES = {
    "UINT_MAX": UINT_MAX,
    "USER_OK": _user_match,
    "CONV_OK": _conv_match,
    "KNOWN_USERS": _KNOWN_USERS,
    "KNOWN_CONVS": _KNOWN_CONVS,
    "MAX_CONV_CHARS": MAX_CONV_CHARS,
    "MAX_CID_CHARS": MAX_CID_CHARS,
}


def text(lo: int, hi: int) -> Check:
    """A str of `lo`..`hi` characters."""

    def check(v: object, _mb: int = 0) -> bool:
        return type(v) is str and lo <= len(v) <= hi

    _WHAT[check] = f"a string of {lo:,} to {hi:,} characters"
    return check


def one_of(*values: str) -> Check:
    """One of the given strings."""
    allowed = frozenset(values)

    def check(v: object, _mb: int = 0) -> bool:
        return type(v) is str and v in allowed

    _WHAT[check] = "one of " + ", ".join(repr(x) for x in values)
    return check


def int_range(lo: int, hi: int) -> Check:
    """An int in `lo`..`hi`."""

    def check(v: object, _mb: int = 0) -> bool:
        return type(v) is int and lo <= v <= hi

    _WHAT[check] = f"an integer from {lo:,} to {hi:,}"
    return check


def array(item: Check, lo: int, hi: int) -> Check:
    """An array of `lo`..`hi` items, each passing `item`."""

    def check(v: object, mb: int = 0) -> bool:
        if type(v) not in _LISTS or not lo <= len(v) <= hi:
            return False
        return all(item(x, mb) for x in v)

    _ARRAYS[check] = (item, lo, hi)
    _WHAT[check] = f"an array of {lo:,} to {hi:,} items"
    return check


def user_list(hi: int) -> Check:
    """An array of at most `hi` user ids."""
    return array(user_id, 0, hi)
