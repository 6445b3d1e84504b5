"""Replay: fold raw log records into projection tables, at the speed audits need.

`fold(tables, records)` is `projections.apply` over `(lsn, digest || body)` records, cut down to
what a replay needs. Records are decoded once, text as text (as `audit verify` reads them: a
record verify fails is refused, in its words, never applied); `message.accepted` events (nearly
all of a log) go straight to `projections.add_message`, the same function the live path runs,
their ids encoded to the bytes the tables are keyed by, with no `Event` or `Effects` built;
every other event is made an `Event` and handed to `apply`. The rows written are those of
`apply` (the model test, tests/storage/test_model.py, checks it on random logs).

Where storage/_fold.c was built (`projections.COMPILED`), runs of message records are taken
apart and applied in C (`_fold.fold_messages`); it hands any other record back, and this loop
treats it exactly as before (tests/storage/test_fold_compiled.py checks both give equal rows).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import msgpack

from storage import native
from storage import records as r
from storage.errors import CorruptLog, CorruptProjection
from storage.log import EVENT_FIELDS, data_fault, record_fault
from storage.memory_tables import RowsDropped
from storage.projections import (
    COMPILED,
    Effects,
    Tables,
    add_message,
    apply,
    mark_applied,
    message_fault,
    py_add_message,
)
from storage.records import MAX_TS_US, MESSAGE_ACCEPTED, Event

_MESSAGE = MESSAGE_ACCEPTED.encode()
_BODY = (str, bytes)  # the kinds of a message's body (storage.log.data_fault)

CHUNK = 8192  # events between two calls of `on_chunk`


def fold(tables: Tables, records: Iterable[tuple[object, bytes]], *, to_lsn: int | None = None,
         until_us: int | None = None, on_chunk: Callable[[int], None] | None = None,
         compiled: bool = COMPILED, chunk: int = CHUNK,
         after: int = 0, stored: bool = False) -> tuple[int, int | None, int]:
    """Apply `records` (in LSN order, from LSN `after` + 1, onto tables that hold the fold of
    the log up to `after`: a whole replay from LSN 1 by default; the first item of each record
    is not read) to `tables` and mark the position applied.

    Stops after `to_lsn`, or before the first event later than `until_us` (the log's timestamps
    are non-decreasing: one writer, whose clock stamps no time before the last one logged while
    the wall clock is behind it by up to 10 minutes, storage/clock.py; a wall clock further
    behind is taken as it is (`clock_stepped_back`), and a log written before 2026-12-05 may
    step back wherever the wall clock did).
    Calls `on_chunk(events so far)` every `chunk` events. Returns `(last lsn applied, its
    ts_us, events applied)` (`after` and None when none was). `compiled=False` runs the
    Python reference only (the tests compare the two).

    `stored`: `tables` hold rows these records did not write (the stored projections a
    catch-up folds onto): a damaged one that a record reads raises the CorruptProjection naming
    it (`stored_fault`), in the compiled and the Python loop alike, rather than CorruptLog
    blaming the record (a replay onto empty tables reads only rows its records wrote).
    """
    fast = native.ext.fold_messages if compiled and native.ext is not None else None
    if (to_lsn is not None and to_lsn < 0) or (until_us is not None and until_us < 0):
        fast = None  # the C loop takes unsigned bounds; such a fold stops at once anyway
    c_last = to_lsn if to_lsn is not None and to_lsn < 1 << 64 else None
    c_until = until_us if until_us is not None and until_us < 1 << 64 else None
    add = add_message if compiled else py_add_message
    unpack = msgpack.unpackb
    heads: dict[str, int] = {}  # add_message reports inbox heads here; a replay ignores them
    fx = Effects()
    last = to_lsn if to_lsn is not None else float("inf")
    until = until_us if until_us is not None else float("inf")
    lsn, ts, done = after, None, 0
    it = iter(records)
    taken: list = [None]  # `stored`: the record the compiled loop took last
    if stored:
        it = _remembered(it, taken)
    while True:
        if fast is not None and not 0 <= lsn < (1 << 64) - 1:
            # the C loop takes the next lsn as 64 bits: past lsn 2**64 - 1 (or before 0) no
            # record can be the next, and the Python loop says so of any that follows
            fast = None
        if fast is not None:
            try:
                n, f_lsn, f_ts, record, exhausted = fast(it, tables, None, c_last, c_until,
                                                         chunk - done % chunk, lsn + 1)
            except (struct.error, ValueError) as exc:
                if stored and (fault := stored_fault(tables, taken[0], exc)) is not None:
                    raise fault from None
                raise
            if n:
                lsn, ts, done = f_lsn, f_ts, done + n
                if not done % chunk:
                    heads.clear()
                    fx = Effects()
                    if on_chunk is not None:
                        on_chunk(done)
            if exhausted:
                break
            if record is None:  # the chunk is full
                continue
        else:
            record = next(it, None)
            if record is None:
                break
        value = record[1]
        try:
            fields = unpack(value[32:])
        except (ValueError, msgpack.UnpackException) as exc:
            # verify's words (text of bytes no UTF-8 holds, say)
            raise (record_fault(lsn + 1, value[32:])
                   or CorruptLog(lsn + 1, f"undecodable body: {exc}")) from None
        try:
            # The record this LSN holds, as verify requires (`body says lsn ...`): the body's
            # lsn is what the replay marks applied and files messages under (the C loop
            # checks the same, `next_lsn`). Of a body of bytes, its first byte's number.
            if type(fields[0]) is not int or fields[0] != lsn + 1:
                raise refused(lsn + 1, value, None)
            if fields[0] > last or fields[1] > until:
                if type(fields) is not list or len(fields) != EVENT_FIELDS:
                    raise refused(lsn + 1, value, None)  # (bytes, read as their numbers)
                break
            ts = fields[1]
            if type(ts) is not int or not 0 <= ts <= MAX_TS_US:
                raise refused(lsn + 1, value, None)  # (check_time's: a time no date holds)
            if fields[2] == MESSAGE_ACCEPTED:
                data, user, device = fields[5], fields[3], fields[4]
                conv, cid = data["conv"], data["cid"]
                # (fields_fault's and data_fault's tests, inline as in verify_records: a bin
                # for an id or a number for a body, which add_message would take as it is;
                # and record_fields', six fields, not seven: `Event(*fields)` checks it of
                # any other event)
                if (not (str is type(conv) is type(cid) is type(user) is type(device))
                        or type(data.get("body")) not in _BODY or len(fields) != EVENT_FIELDS):
                    raise refused(lsn + 1, value, None)
                ckey, cid, user = conv.encode(), cid.encode(), user.encode()
                # (a device of ASCII has as many bytes as characters; any other is encoded)
                if ((len(ckey) + len(cid) + len(user) + len(device) > r.KEYS_FIT_BYTES
                     or not device.isascii())
                        and (fault := r.key_fault(user, device, ckey, cid)) is not None):
                    raise CorruptLog(lsn + 1, f"{MESSAGE_ACCEPTED} with {fault}")
                add(tables, ckey, conv, user, cid, fields[0], heads)
            else:
                ev = Event(*fields)
                # (fields_fault's test, inline as in verify_records: a type, actor or data of
                # the wrong kind, which `apply` may take as it is, a number for a user, say;
                # then data_fault's, a mute of 1 for true, say)
                if (type(ev.type) is not str or type(ev.user) is not str
                        or type(ev.device) is not str or type(ev.data) is not dict
                        or data_fault(ev.type, ev.data) is not None):
                    raise refused(lsn + 1, value, None)
                if (fault := r.event_key_fault(ev.user, ev.device, ev.data)) is not None:
                    raise CorruptLog(lsn + 1, f"{ev.type} with {fault}")
                apply(tables, ev, fx)
        except (CorruptLog, RowsDropped):  # RowsDropped: check_projections reads the rows
            raise
        except (LookupError, TypeError, ValueError, AttributeError, struct.error,
                CorruptProjection) as exc:  # (rows a replay decodes: its records wrote them)
            if stored and (fault := stored_fault(tables, record, exc)) is not None:
                raise fault from None
            raise refused(lsn + 1, value, exc) from None
        lsn, ts = fields[0], fields[1]
        done += 1
        if not done % chunk:
            heads.clear()
            fx = Effects()
            if on_chunk is not None:
                on_chunk(done)
    mark_applied(tables, lsn)
    return lsn, ts, done


def refused(lsn: int, value: bytes, exc: Exception | None) -> CorruptLog:
    """The CorruptLog of record `lsn` (`digest || body`), which the replay cannot apply (it
    raised `exc`) or found of the wrong kind (`exc` None): chained, so stored as written, yet
    no event this homing writes. `audit verify`'s verdict on it where verify fails it
    (`storage.log.record_fault`: a field of the wrong kind, data without a field the replay
    reads, ...), so that `rebuild` and `verify` name one fault alike; else what it raised."""
    fault = record_fault(lsn, value[32:])
    if fault is not None:
        return fault
    return CorruptLog(lsn, f"a record the replay cannot apply: {exc!r:.200}")


def _remembered(records: Iterable[tuple[object, bytes]], taken: list) -> Iterable:
    """`records`, each put in `taken[0]` as it is taken (the compiled loop names none)."""
    for record in records:
        taken[0] = record
        yield record


def stored_fault(tables: Tables, record: tuple[object, bytes] | None,
                 exc: Exception) -> CorruptProjection | None:
    """The damaged stored row that folding `record` onto `tables` met when it raised `exc`
    (the one named when `exc` is a CorruptProjection; for a message, `message_fault`'s), or
    None: then the record is at fault."""
    if isinstance(exc, CorruptProjection):
        return exc
    try:
        fields = msgpack.unpackb(record[1][32:], raw=True)
        if fields[2] != _MESSAGE:
            return None
        return message_fault(tables, fields[5][b"conv"], exc, fields[3])
    except Exception:  # a record that does not decode: the record's fault
        return None
