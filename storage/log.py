"""The narrow event-log interface every backend implements, and an in-memory backend.

Rules every backend keeps (docs/DESIGN.md, "Stored events"):

* LSNs are gapless and start at 1; `append` assigns them, callers never choose them.
* Each record carries `digest = blake2b(prev_digest || body)`, so any altered, removed or
  reordered record is detectable by walking the chain, except records removed from the end:
  the chain has no anchor. The store's `meta.applied_lsn`, committed with the records, is what
  `audit verify` holds the log's end against (docs/OPERATIONS.md, "Auditing").
* `append` is all or nothing, and returns LSNs only once their records are durable; a record
  already at an LSN it would assign (the log appended to by someone else) makes it refuse
  (StorageError), never skip or overwrite. The whole contract: docs/DESIGN.md, "The event log".
* There is no waiting here: the broker tails the log by waiting on a trio condition that the
  committer signals when `last_lsn()` moves, then calls `read(from_lsn)`.

Four methods keep the door open to another backend (e.g. NATS JetStream).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from hashlib import blake2b
from typing import Any, Protocol, runtime_checkable

from msgpack import StackError, packb, unpackb

from storage.errors import CorruptLog
from storage.records import (
    DIGEST_BYTES,
    EVENT_TYPES,
    GENESIS,
    KEYS_FIT_BYTES,
    MAX_TS_US,
    Event,
    chain,
    decode_body,
    event_key_fault,
    unkeyable_cid,
)

EventInput = Event | tuple[int, str, str, str, dict[str, Any]]


@runtime_checkable
class EventLog(Protocol):
    """An append-only, hash-chained sequence of events numbered by LSN from 1."""

    def append(self, events: Sequence[EventInput]) -> int:
        """Durably append `events` (their `lsn` is ignored) and return the last LSN assigned."""
        ...

    def read(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[Event]:
        """Yield events with `from_lsn <= lsn <= to_lsn` (to the end when `to_lsn` is None)."""
        ...

    def last_lsn(self) -> int:
        """Return the LSN of the last appended event, 0 when empty."""
        ...

    def close(self) -> None:
        """Release the backend; further calls are errors."""
        ...


def as_event(item: EventInput) -> Event:
    """Return `item` as an `Event` (accepts an Event or a `(ts_us, type, user, device, data)`)."""
    if isinstance(item, Event):
        return item
    ts_us, type_, user, device, data = item
    return Event(0, ts_us, type_, user, device, data)


def seal(
    items: Iterable[EventInput], next_lsn: int, prev_digest: bytes
) -> tuple[list[tuple[int, bytes, Event]], bytes]:
    """Number, encode and chain `items`; return `[(lsn, digest || body, event)]` and last digest.

    The returned events are fresh copies carrying their LSN; the inputs are not modified.
    This is `encode_body` and `chain` inlined: it runs once per appended event.
    """
    out = []
    lsn = next_lsn
    digest = prev_digest
    for item in items:
        if isinstance(item, Event):
            ev = Event(lsn, item.ts_us, item.type, item.user, item.device, item.data)
        else:
            ev = Event(lsn, *item)
        body = packb([lsn, ev.ts_us, ev.type, ev.user, ev.device, ev.data], use_bin_type=True)
        h = blake2b(digest, digest_size=DIGEST_BYTES)
        h.update(body)
        digest = h.digest()
        out.append((lsn, digest + body, ev))
        lsn += 1
    return out, digest


def verify_records(records: Iterable[tuple[int, bytes]], from_lsn: int, prev_digest: bytes) -> int:
    """Check `(lsn, value)` records for continuity and chain from `from_lsn`; return the count.

    Raises `CorruptLog` at the first LSN that is missing, out of order, or whose digest or body
    does not match.
    """
    expected = from_lsn
    digest = prev_digest
    for lsn, value in records:
        if lsn != expected:
            raise CorruptLog(expected, f"expected lsn {expected}, found {lsn}")
        stored, body = value[:32], value[32:]
        digest = chain(digest, body)
        if stored != digest:
            raise CorruptLog(lsn, "digest mismatch")
        try:
            ev = decode_body(body)
        except Exception as exc:
            record_fields(lsn, body)  # raises: no list of an event's six fields
            raise CorruptLog(lsn, f"undecodable body: {exc}") from None
        if type(ev.lsn) is not int or ev.lsn != lsn:
            record_fields(lsn, body)  # (six characters of text, a map of six keys: no list)
            raise CorruptLog(lsn, f"body says lsn {ev.lsn!r}")
        # Chained, so written as such, yet not by this homing: a record no replay or audit
        # could read (a time no date holds, fields of the wrong kind, a type of no event) is
        # named here, where its LSN is known, rather than crashing whatever reads it next; in
        # the order and words `audit stats` and `trace` name it (check_time, fields_fault).
        check_time(lsn, ev.ts_us)
        # (fields_fault's test, inline: calling it on every record cost 33 ns, 1.4 % of the walk)
        if (type(ev.type) is not str or type(ev.user) is not str or type(ev.device) is not str
                or type(ev.data) is not dict):
            record_fields(lsn, body)  # (six bytes, the first the lsn: no list)
            raise CorruptLog(lsn, fields_fault(ev.type, ev.user, ev.device, ev.data))
        if ev.type not in EVENT_TYPES:
            raise CorruptLog(lsn, f"unknown event type {ev.type!r}")
        data = ev.data
        # Its ids are inside the record's bytes but for the message's body (of at least as
        # many bytes as characters): with the rest no longer than KEYS_FIT_BYTES, their keys fit.
        if ev.type == "message.accepted" and type(data.get("conv")) is str and type(
                data.get("cid")) is str and type(text := data.get("body")) in _BODY and len(
                body) - len(text) <= KEYS_FIT_BYTES:
            pass  # nearly every record: its data checked inline, as data_fault would
        else:
            fault = data_fault(ev.type, data)
            if fault is not None:
                raise CorruptLog(lsn, f"{ev.type} {fault}")
            if (fault := event_key_fault(ev.user, ev.device, data)) is not None:
                raise CorruptLog(lsn, f"{ev.type} with {fault}")
        expected += 1
    return expected - from_lsn


EVENT_FIELDS = len(Event.__slots__)  # lsn, ts_us, type, user, device, data


def record_fields(lsn: int, body: bytes) -> list[Any]:
    """The fields `[lsn, ts_us, type, user, device, data]` of record `lsn` from its `body`;
    CorruptLog at `lsn` when it holds none (`undecodable body: ...`, msgpack's reason, or `not
    the fields of an event`: no list, or one of another length). The one wording of this fault
    in `audit verify` (`verify_records`, which calls it only once its own decoding failed),
    `log`, `export`, `stats` (`audit.decode_event`), `trace` and `rebuild`."""
    try:
        fields = unpackb(body, raw=False)
    except StackError:  # (msgpack gives it no words)
        raise CorruptLog(lsn, "undecodable body: nested deeper than msgpack unpacks (1,024 "
                         "levels)") from None
    except Exception as exc:
        raise CorruptLog(lsn, f"undecodable body: {exc}") from None
    if type(fields) is not list or len(fields) != EVENT_FIELDS:
        raise CorruptLog(lsn, "undecodable body: not the fields of an event")
    return fields


def record_fault(lsn: int, body: bytes) -> CorruptLog | None:
    """The CorruptLog `audit verify` raises of a record at `lsn` whose body is `body`, its
    chain aside (`verify_records` of it alone), or None when verify passes it: the verdict a
    replay that cannot apply a record (storage/fold.py) names, in verify's words. Called only
    once a replay failed or found a field of the wrong kind, never on its common path."""
    try:
        verify_records(((lsn, chain(GENESIS, body) + body),), lsn, GENESIS)
    except CorruptLog as exc:
        return exc
    return None


def check_time(lsn: int, ts_us: object) -> None:
    """CorruptLog unless `ts_us`, the time of record `lsn`, is one a date holds (0 to
    MAX_TS_US microseconds: what a homing's clock writes, and what an audit can print)."""
    if type(ts_us) is not int or not 0 <= ts_us <= MAX_TS_US:
        raise CorruptLog(lsn, f"a time of {ts_us!r} us, which no date holds")


def fields_fault(type_: object, user: object, device: object, data: object) -> str | None:
    """Why a record's type, actor (`user`, `device`) and data are of kinds homing never writes
    (text, text, text, a map), or None when they are of theirs: the one wording of this fault
    in `audit verify` (`verify_records`), `audit stats` and `audit trace`, which check the
    time first (`check_time`), and a type's name after (verify; `stats` counts any text)."""
    if type(type_) is str and type(user) is str and type(device) is str and type(data) is dict:
        return None
    return (f"a field of the wrong kind: type {type(type_).__name__}, user "
            f"{type(user).__name__}, device {type(device).__name__}, data {type(data).__name__}")


_STR, _INT = (str,), (int,)
_BODY = (str, bytes)
# The fields of each event's data that the replay reads (storage/projections.py, fold.py), and
# the kinds it can apply; optional ones (`name`, `open`, a create's `cid`, older acks' `convs`)
# are checked apart.
_FIELDS: dict[str, tuple[tuple[str, tuple[type, ...]], ...]] = {
    "conv.created": (("conv", _STR), ("kind", _STR)),
    "member.added": (("conv", _STR), ("user", _STR), ("role", _STR)),
    "member.removed": (("conv", _STR), ("user", _STR)),
    "member.role_set": (("conv", _STR), ("user", _STR), ("role", _STR)),
    "message.accepted": (("conv", _STR), ("cid", _STR), ("body", _BODY)),
    "delivery.acked": (("upto", _INT),),
    "read.marked": (("conv", _STR), ("upto", _INT)),
    "mute.set": (("conv", _STR), ("muted", (bool,))),
    "tokens.revoked": (("user", _STR), ("before", _INT)),
}


def _u64_ok(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def data_fault(type_: str, data: dict) -> str | None:
    """Why the data of an event of `type_` is none the replay can apply (a field missing or
    of the wrong kind), or None when it can."""
    for name, kinds in _FIELDS.get(type_, ()):
        if name not in data:
            return f"data without {name!r}"
        if type(data[name]) not in kinds or (kinds is _INT and not _u64_ok(data[name])):
            return f"data.{name} of the wrong kind: {data[name]!r:.60}"
    if type_ == "conv.created" and unkeyable_cid(cid := data.get("cid")):
        return f"data.cid of the wrong kind: {cid!r:.60}"
    if type_ == "delivery.acked":
        convs = data.get("convs")
        if convs is not None and (type(convs) is not dict or not all(
                type(k) is str and _u64_ok(v) for k, v in convs.items())):
            return f"data.convs of the wrong kind: {convs!r:.60}"
    return None


class MemoryLog:
    """An `EventLog` held in a list, with the same records and chain as the LMDB log."""

    def __init__(self) -> None:
        self._values: list[bytes] = []
        self._digest = GENESIS
        self._closed = False

    def append(self, events: Sequence[EventInput]) -> int:
        """Append `events` and return the last LSN (the current last LSN when empty)."""
        self._check_open()
        sealed, digest = seal(events, len(self._values) + 1, self._digest)
        self._values.extend(value for _, value, _ in sealed)
        self._digest = digest
        return len(self._values)

    def read(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[Event]:
        """Yield stored events from `from_lsn` to `to_lsn` inclusive."""
        self._check_open()
        end = len(self._values) if to_lsn is None else min(to_lsn, len(self._values))
        for lsn in range(max(from_lsn, 1), end + 1):
            yield decode_body(self._values[lsn - 1][32:])

    def read_raw(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield `(lsn, digest || body)` records from `from_lsn` to `to_lsn` inclusive."""
        self._check_open()
        end = len(self._values) if to_lsn is None else min(to_lsn, len(self._values))
        for lsn in range(max(from_lsn, 1), end + 1):
            yield lsn, self._values[lsn - 1]

    def last_lsn(self) -> int:
        """Return the last LSN, 0 when empty."""
        self._check_open()
        return len(self._values)

    def verify(self, from_lsn: int = 1) -> int:
        """Walk the chain from `from_lsn`; return the number of records checked."""
        if from_lsn > len(self._values):
            return 0  # nothing from there on (as read() yields nothing)
        prev = GENESIS if from_lsn <= 1 else self._values[from_lsn - 2][:32]
        return verify_records(
            ((i + 1, v) for i, v in enumerate(self._values) if i + 1 >= from_lsn),
            max(from_lsn, 1), prev,
        )

    def close(self) -> None:
        """Mark the log closed."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("log is closed")
