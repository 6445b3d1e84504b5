"""Replay: fold raw log records into projection tables, at the speed audits need.

`fold(tables, records)` is `projections.apply` over `(lsn, digest || body)` records, cut down to
what a replay needs. Records are decoded with `raw=True`, so ids come out as the bytes the tables
are keyed by and no text is decoded; `message.accepted` events (nearly all of a log) go straight
to `projections.add_message`, the same function the live path runs, with no `Event` or `Effects`
built; every other event is decoded again as an `Event` and handed to `apply`. The rows written
are those of `apply` (the model test, tests/storage/test_model.py, checks it on random logs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgpack

from storage import records as r
from storage.projections import Effects, Tables, add_message, apply, mark_applied
from storage.records import decode_body

_MESSAGE = r.MESSAGE_ACCEPTED.encode()

CHUNK = 8192  # events between two calls of `on_chunk`


def fold(tables: Tables, records: Iterable[tuple[int, bytes]], *, to_lsn: int | None = None,
         until_us: int | None = None,
         on_chunk: Callable[[int], None] | None = None) -> tuple[int, int | None, int]:
    """Apply `records` (in LSN order, from LSN 1) to `tables` and mark the position applied.

    Stops after `to_lsn`, or before the first event later than `until_us` (the log's timestamps
    are non-decreasing: one clock, one writer). Calls `on_chunk(events so far)` every CHUNK
    events. Returns `(last lsn applied, its ts_us, events applied)`.
    """
    unpack = msgpack.unpackb
    heads: dict[str, int] = {}  # add_message reports inbox heads here; a replay ignores them
    fx = Effects()
    last = to_lsn if to_lsn is not None else float("inf")
    until = until_us if until_us is not None else float("inf")
    lsn, ts, done = 0, None, 0
    for _lsn, value in records:
        fields = unpack(value[32:], raw=True)
        if fields[0] > last or fields[1] > until:
            break
        lsn, ts = fields[0], fields[1]
        if fields[2] == _MESSAGE:
            data = fields[5]
            ckey = data[b"conv"]
            add_message(tables, ckey, ckey.decode(), fields[3], data[b"cid"], lsn, heads)
        else:
            apply(tables, decode_body(value[32:]), fx)
        done += 1
        if not done % CHUNK:
            heads.clear()
            fx = Effects()
            if on_chunk is not None:
                on_chunk(done)
    mark_applied(tables, lsn)
    return lsn, ts, done
