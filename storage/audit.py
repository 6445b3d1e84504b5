"""Audit queries over a Store: filtered log reads, verification, time travel, message traces.

Everything here is synchronous, trio-free and read-only: it reads the log through
`store.log.read_raw` (short read transactions, chunk by chunk) and the stored projections through
`store.dump_projections` (one read transaction, so one consistent snapshot), and folds events with
the very `apply` the broker runs live. It is therefore safe next to a running broker. Rules kept:

* The log is the truth: a projection check replays the log up to the `applied_lsn` of the stored
  snapshot it compares with, so a broker appending meanwhile causes no false difference.
* Long walks report progress through an optional `progress(done)` callback, called every
  `PROGRESS_EVERY` events and once at the end; they never print.
* JSON shapes (docs/OPERATIONS.md, "Auditing"): "ts" is an ISO-8601 UTC string with microseconds,
  "ts_us" the same instant in microseconds since the Unix epoch; a text body is "body", a binary
  one "body_b64"; any other value JSON cannot hold (a record chained on by hand: bytes, an
  extension type, a map with a key that is not text) a one-key object (`json_value`).
"""

from __future__ import annotations

import base64
import gc
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from storage import native
from storage import records as r
from storage.errors import CorruptLog
from storage.fold import fold
from storage.log import check_time, data_fault, fields_fault, record_fields, verify_records
from storage.memory_tables import MemoryTables, RowsDropped
from storage.projections import APPLIED_LSN, KIND_MSG, decode_idem
from storage.records import GENESIS, Event, pack_u64, u64
from storage.store import Store
from storage.tables import APPEND_ONLY

Progress = Callable[[int], None] | None

PROGRESS_EVERY = 8192
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Tables whose key is `head \0 u64`; the other two-part keys are `head \0 text`.
_U64_TAIL = frozenset({"msg", "inbox"})
# Tables whose values are msgpack; the integer ones are 8-byte big-endian; idem is packed.
_MSGPACK_VALUES = frozenset({"conv", "inbox"})
_TEXT_VALUES = frozenset({"member", "user_conv", "mute", "created"})
# Tables `audit inbox` does not show and `apply` never reads: its replay keeps their digest only.
_NOT_SHOWN = frozenset({"msg", "idem"})


# ---------------------------------------------------------------- event records


def ts_iso(ts_us: int) -> str:
    """Return `ts_us` (microseconds since the epoch) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
    return (_EPOCH + timedelta(microseconds=ts_us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def body_fields(body: Any) -> dict[str, Any]:
    """Return a body as JSON fields: text as "body", binary as "body_b64"; any other value (a
    record chained on by hand) as "body", in `json_value`'s form."""
    if isinstance(body, bytes):
        return {"body_b64": _b64(body)}
    return {"body": json_value(body)}


# The one-key objects `json_value` shows a value JSON cannot hold as; a map that would read as
# one of them is shown as "$map" too, so that each reads one way only.
JSON_TAGS = frozenset({"$b64", "$ext", "$timestamp", "$float", "$map"})
_JSON_SCALARS = frozenset({str, int, bool, type(None)})
_TEXT = frozenset({str})
_NOT_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_value(value: Any) -> Any:
    """Return a value decoded from a record (msgpack) as JSON holds it, faithfully.

    Text, integers, booleans, null, finite floats, and lists and text-keyed maps of them are
    themselves (so every record homing writes shows as it always did). Any other value, which
    only a record chained on by hand holds, is a one-key object naming what it is: binary
    `{"$b64": BASE64}`, an extension type `{"$ext": [CODE, BASE64]}`, msgpack's timestamp
    (extension -1) `{"$timestamp": [SECONDS, NANOSECONDS]}`, a float JSON has no number for
    `{"$float": "NaN"|"Infinity"|"-Infinity"}`, and a map with a key that is not text, or whose
    one key is one of these names (`JSON_TAGS`), `{"$map": [[KEY, VALUE], ...]}`, keys and
    values shown the same way. TypeError for a value no msgpack decoding makes.
    """
    kind = type(value)  # (loops, not comprehensions: one frame a level, as deep as json goes)
    if kind in _JSON_SCALARS:
        return value
    if kind is dict:
        if not _text_keyed(value):
            return _as_map(value)
        if _JSON_SCALARS.issuperset(map(type, value.values())):
            return value  # (an ack's convs: shown as it is, as the log holds it)
        shown = {}
        for k, v in value.items():
            shown[k] = json_value(v)
        return shown
    if kind is list:
        if _JSON_SCALARS.issuperset(map(type, value)):
            return value
        items = []
        for v in value:
            items.append(json_value(v))
        return items
    if kind is bytes:
        return {"$b64": _b64(value)}
    if kind is float:
        return value if math.isfinite(value) else {"$float": _NOT_FINITE[repr(value)]}
    if kind is msgpack.ExtType:
        return {"$ext": [value.code, _b64(value.data)]}
    if kind is msgpack.Timestamp:
        return {"$timestamp": [value.seconds, value.nanoseconds]}
    raise TypeError(f"no JSON form for a {kind.__name__}")


def _as_map(value: dict[Any, Any]) -> dict[str, Any]:
    """`json_value`'s "$map" form of the map `value`: its pairs, in their order."""
    pairs = []
    for k, v in value.items():
        pairs.append([json_value(k), json_value(v)])
    return {"$map": pairs}


def _text_keyed(value: dict[Any, Any]) -> bool:
    """Whether `json_value` shows the map `value` as a JSON object (its keys as they are)."""
    return _TEXT.issuperset(map(type, value)) and (len(value) != 1 or JSON_TAGS.isdisjoint(value))


def event_record(ev: Event) -> dict[str, Any]:
    """Return `ev` as the JSON object of `audit log --json` and `audit export`.

    `{"lsn", "ts", "ts_us", "type", "actor", "device", "data"}`; `data` holds the event's own
    fields (docs/DESIGN.md, "Stored events") with a binary body as "body_b64", each other
    value as `json_value` shows it. A data map with a key that is not text, or whose one key
    is one of `JSON_TAGS`, or that holds a "body_b64" of its own (which would read as a
    binary body), is `json_value`'s "$map"; a data that is no map (a record `verify` calls
    corrupt) is `json_value` of it. A text body is moved to the end of `data`, as a binary
    one is, so two records apart only in where their body sits show alike (`audit export`
    tells them apart: the line of the one homing did not write carries `record_b64`)."""
    data = ev.data
    if type(data) is not dict:  # a record `verify` calls corrupt
        data = json_value(data)
    elif "body_b64" in data or not _text_keyed(data):
        data = _as_map(data)
    elif "body" in data:
        body = data["body"]
        data = {k: v for k, v in data.items() if k != "body"}
        if not _JSON_SCALARS.issuperset(map(type, data.values())):
            data = {k: json_value(v) for k, v in data.items()}
        if type(body) is bytes:  # (body_fields, inline: every message)
            data["body_b64"] = _b64(body)
        else:
            data["body"] = body if type(body) is str else json_value(body)
    elif not _JSON_SCALARS.issuperset(map(type, data.values())):
        data = {k: json_value(v) for k, v in data.items()}
    rec = {"lsn": ev.lsn, "ts": ts_iso(ev.ts_us), "ts_us": ev.ts_us, "type": ev.type,
           "actor": ev.user, "device": ev.device, "data": data}
    if not (type(ev.type) is str and type(ev.user) is str and type(ev.device) is str
            and type(ev.lsn) is int):  # a record `verify` calls corrupt
        for key in ("lsn", "type", "actor", "device"):
            rec[key] = json_value(rec[key])
    return rec


def dm_parties(conv: str) -> tuple[str, ...]:
    """Return the two users of a direct conversation id `dm:a:b`, () for any other id."""
    if not conv.startswith("dm:"):
        return ()
    return tuple(conv[3:].split(":", 1))


@dataclass(slots=True)
class EventFilter:
    """Which events `audit log` shows; every field set must match (None or empty: any)."""

    from_lsn: int = 1
    to_lsn: int | None = None
    since_us: int | None = None
    until_us: int | None = None
    user: str | None = None
    conv: str | None = None
    types: tuple[str, ...] = ()

    def matches(self, ev: Event) -> bool:
        """Return whether `ev` passes; `user` matches the actor, data.user or a dm: party."""
        if self.since_us is not None and ev.ts_us < self.since_us:
            return False
        if self.until_us is not None and ev.ts_us > self.until_us:
            return False
        if self.types and not (type(ev.type) is str and any(
                ev.type == t or ev.type.startswith(t + ".") for t in self.types)):
            return False
        data = ev.data if type(ev.data) is dict else {}  # else a record `verify` calls corrupt
        conv = data.get("conv")
        if self.conv is not None and conv != self.conv:
            return False
        if self.user is not None and self.user != ev.user and self.user != data.get("user"):
            return isinstance(conv, str) and self.user in dm_parties(conv)
        return True


def decode_event(lsn: int, value: bytes) -> Event:
    """Return the event of log record `lsn`, whose stored value `value` is `digest || body`.

    Raises `CorruptLog` naming `lsn` when the body does not decode into an event's six fields
    (`storage.log.record_fields`: verify's words), or its time is none a date holds (`ts_iso`
    could not print it). Nothing else is checked
    (not the digest: `verify_head` walks the chain): a record of any other kinds of field is
    returned as it is, for `event_record` to show.
    """
    ev = Event(*record_fields(lsn, value[32:]))
    check_time(lsn, ev.ts_us)
    return ev


def raw_records(store: Store, from_lsn: int = 1, to_lsn: int | None = None,
                progress: Progress = None) -> Iterator[tuple[int, bytes]]:
    """Yield the log's records `(lsn, digest || body)` from `from_lsn` to `to_lsn` (inclusive,
    None: the end), in LSN order, as `store.log.read_raw` reads them: chunk by chunk, in short
    read transactions, so safe next to a running broker.

    `progress(done)`, if given, is called every `PROGRESS_EVERY` records and once at the end.
    """
    done = 0
    for rec in store.log.read_raw(from_lsn, to_lsn):
        yield rec
        done += 1
        if progress is not None and not done % PROGRESS_EVERY:
            progress(done)
    if progress is not None:
        progress(done)


def iter_events(store: Store, flt: EventFilter | None = None,
                progress: Progress = None) -> Iterator[Event]:
    """Yield the logged events passing `flt`, in LSN order, reading chunk by chunk."""
    flt = flt or EventFilter()
    for lsn, value in raw_records(store, flt.from_lsn, flt.to_lsn, progress):
        ev = decode_event(lsn, value)
        if flt.matches(ev):
            yield ev


# ---------------------------------------------------------------- verification and replay


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic collector: a fold allocates millions of acyclic objects it would rescan."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def verify_head(store: Store, anchor: tuple[int, bytes] | None = None,
                progress: Progress = None) -> tuple[int, bytes]:
    """Walk the whole log checking LSN continuity and the digest chain; return the count of
    records and the last one's digest (GENESIS when empty). Raises `CorruptLog` naming the
    first bad LSN (an altered byte, a missing or reordered record).

    The chain cannot show records removed from the end, nor records changed by someone who
    computes it again; a head recorded earlier outside the data directory can. With `anchor`
    `(lsn, digest)`, such a head, raises `CorruptLog` unless record `lsn` holds that digest:
    at the first LSN missing when the log ends before it, else at `lsn` itself (the change is
    at or before it; the chain cannot tell where). The anchor is checked as soon as its record
    is verified, so a `CorruptLog` past its LSN means the anchor held.
    """
    want, digest = anchor if anchor is not None else (None, b"")
    last = GENESIS

    def tapped() -> Iterator[tuple[int, bytes]]:
        nonlocal last
        for lsn, value in raw_records(store, 1, None, progress):
            yield lsn, value
            last = value[:32]  # resumed: verify_records found record `lsn` sound
            if lsn == want and last != digest:
                raise CorruptLog(lsn, f"digest {last.hex()} is not the anchor's "
                                 f"{digest.hex()}: a record up to lsn {lsn} was changed, "
                                 "removed or inserted and the chain computed again")

    events = verify_records(tapped(), 1, GENESIS)
    if want is not None and want > events:
        missing = want - events
        raise CorruptLog(events + 1, f"the log ends at lsn {events}, before the anchor's lsn "
                         f"{want}: {missing} record{' was' if missing == 1 else 's were'} "
                         "removed from its end")
    if want == 0 and digest != GENESIS:
        raise CorruptLog(0, f"the anchor's digest of lsn 0 is not {GENESIS.hex()}")
    return events, last


def replay(store: Store, to_lsn: int | None = None, *, until_us: int | None = None,
           progress: Progress = None,
           digested: frozenset[str] = frozenset(),
           key: bytes | None = None,
           user: str | None = None) -> tuple[MemoryTables, int, int | None]:
    """Fold the log into fresh MemoryTables up to `to_lsn`, or while `ts_us <= until_us`.

    Returns `(tables, last_lsn_applied, its ts_us)`. The tables named in `digested` keep only
    a digest of their rows (`memory_tables.DigestTable`, under `key` if given); a fold that
    must read them raises `RowsDropped`. With `user`, the users' tables keep that user's rows
    only.
    """
    tables = MemoryTables(digested, key, user=user)
    folds = [tables.data[name].fold for name in digested]

    def on_chunk(done: int) -> None:
        for fold_rows in folds:
            fold_rows()
        if progress is not None:
            progress(done)

    with _no_cyclic_gc():
        lsn, ts, done = fold(tables, store.log.read_raw(1, to_lsn), to_lsn=to_lsn,
                             until_us=until_us, on_chunk=on_chunk)
        for fold_rows in folds:
            fold_rows()
    if progress is not None:
        progress(done)
    return tables, lsn, ts


@dataclass(slots=True)
class Difference:
    """The first projection row where the stored state and a fresh replay disagree."""

    table: str
    key: bytes
    stored: bytes | None
    replayed: bytes | None

    def describe(self) -> dict[str, Any]:
        """Return the difference as JSON: key and values decoded readably (None = missing), a
        value JSON cannot hold (a record chained on by hand) as `json_value` shows it."""
        return {"table": self.table, "key": decode_key(self.table, self.key),
                "key_hex": self.key.hex(),
                "stored": json_value(decode_value(self.table, self.stored)),
                "replayed": json_value(decode_value(self.table, self.replayed))}


def decode_key(table: str, key: bytes) -> Any:
    """Return a projection key readably: a string, or `[head, tail]` for two-part keys."""
    head, sep, tail = key.partition(b"\0")
    text = head.decode(errors="replace")
    if not sep:
        return text
    if table in _U64_TAIL and len(tail) == 8:
        return [text, u64(tail)]
    return [text, tail.decode(errors="replace")]


def decode_value(table: str, value: bytes | None) -> Any:
    """Return a projection value readably (msgpack decoded, integers as ints), None for None."""
    if value is None:
        return None
    try:
        if table in _MSGPACK_VALUES:
            return msgpack.unpackb(value, raw=False)
        if table in _TEXT_VALUES:
            return value.decode()
        if table == "idem" and len(value) >= 16:
            return list(decode_idem(value))
        if len(value) == 8:
            return u64(value)
    except (ValueError, UnicodeDecodeError, msgpack.UnpackException):
        pass
    return {"hex": value.hex()}


def compare(stored: dict[str, dict[bytes, bytes]],
            replayed: dict[str, dict[bytes, bytes]]) -> Difference | None:
    """Return the first row (in table, key order) where two sets of tables differ, or None.

    Equal tables are recognised by dict equality (in C); only a differing table is sorted to
    find its first differing key.
    """
    for table in sorted(set(stored) | set(replayed)):
        ours, theirs = stored.get(table, {}), replayed.get(table, {})
        if ours == theirs:
            continue
        for key in sorted(ours.keys() ^ theirs.keys() | {
                k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]}):
            return Difference(table, key, ours.get(key), theirs.get(key))
    return None


def check_projections(store: Store, progress: Progress = None) -> tuple[Difference | None, int]:
    """Compare the stored projections with a fresh replay; return `(first difference, events)`.

    The stored rows are one snapshot; the replay goes up to that snapshot's `applied_lsn`.
    The big append-only tables (one row per message or inbox entry) are compared by row count
    and multiset digest (`memory_tables.rows_digest`), both sides streamed, so memory stays bounded;
    the others row by row. Only when something differs (or the fold needed the rows,
    `RowsDropped`) are all rows compared, to name the first that differs.
    """
    key = os.urandom(16) if native.ext is not None else None  # else Python's own hash()
    with _no_cyclic_gc():
        stored, digests, log_lsn = store.projection_digests(APPEND_ONLY, key)
    behind = _ends_apart(stored, log_lsn)
    if behind is not None:
        # Replayed all the same up to where both reach: a record missing below is a corrupt
        # log, named at its LSN, not this difference (a log moved up past a hole looks behind).
        upto = min(log_lsn, u64(behind.stored))
        try:
            _, lsn, _ = replay(store, upto, progress=progress, digested=APPEND_ONLY, key=key)
        except RowsDropped:
            _, lsn, _ = replay(store, upto, progress=progress)
        return behind, lsn
    try:
        tables, lsn, _ = replay(store, _applied(stored, log_lsn), progress=progress,
                                digested=APPEND_ONLY, key=key)
    except RowsDropped:
        return _check_rows(store, progress)
    replayed = {name: (tables.data[name].rows, tables.data[name].digest) for name in APPEND_ONLY}
    if replayed != digests:
        return _check_rows(store, progress)
    with _no_cyclic_gc():
        return compare(stored, {t: v for t, v in tables.data.items() if t not in APPEND_ONLY}), lsn


def _applied(stored: dict[str, dict[bytes, bytes]], log_lsn: int) -> int:
    """The `applied_lsn` of a snapshot of the stored tables (the whole log if it has none)."""
    raw = stored.get("meta", {}).get(APPLIED_LSN)
    return log_lsn if raw is None else u64(raw)


def _ends_apart(stored: dict[str, dict[bytes, bytes]], log_lsn: int) -> Difference | None:
    """The difference when a snapshot's projections and its own log end at different LSNs.

    Events and the projections they cause commit in one transaction, so in any snapshot
    `applied_lsn` is the log's last LSN. A log that goes further was appended to (or the
    projections set back) behind the broker's back; one that stops short had its last records
    removed. Either way a replay of the whole log differs in `meta.applied_lsn`, stored against
    the log's last LSN, which tells how many records: that is the difference named, rather
    than the first row in table order the missing or extra events touch.
    """
    raw = stored.get("meta", {}).get(APPLIED_LSN)
    if raw is None or u64(raw) == log_lsn:
        return None
    return Difference("meta", APPLIED_LSN, raw, pack_u64(log_lsn))


def _check_rows(store: Store, progress: Progress) -> tuple[Difference | None, int]:
    """`check_projections` row by row, in memory: names the first row that differs."""
    stored, log_lsn = store.projection_snapshot()
    tables, lsn, _ = replay(store, _applied(stored, log_lsn), progress=progress)
    with _no_cyclic_gc():
        return compare(stored, tables.data), lsn


# ---------------------------------------------------------------- time travel


def _entry(store: Store, inbox_seq: int, raw: bytes) -> dict[str, Any]:
    kind, conv, seq, lsn = msgpack.unpackb(raw, raw=False)
    out = {"inbox_seq": inbox_seq, "kind": kind, "conv": conv, "seq": seq, "lsn": lsn}
    ev = next((decode_event(n, value) for n, value in store.log.read_raw(lsn, lsn)), None)
    if ev is not None:  # (a record the replay applied though `verify` fails it: json_value)
        out["from"] = json_value(ev.user)
        out["ts"] = ts_iso(ev.ts_us)
        if kind == KIND_MSG:
            out["cid"] = json_value(ev.data.get("cid"))
            out |= body_fields(ev.data.get("body"))
    return out


def inbox_at(store: Store, user: str, to_lsn: int | None = None, until_us: int | None = None,
             progress: Progress = None) -> dict[str, Any]:
    """Return `user`'s inbox, unread counts and device cursors as of LSN `to_lsn` / time.

    Shape: `{"user", "lsn", "ts", "inbox_head", "inbox": [entry], "unread": {conv: n},
    "muted": [conv], "delivered": {device: inbox_seq}}`; an entry is `{"inbox_seq", "kind",
    "conv", "seq", "lsn", "from", "ts"}` plus `cid` and the body for messages.

    The replay keeps `user`'s rows only, and of the tables of every message (`msg`, `idem`)
    a digest (`_NOT_SHOWN`), so its memory grows with that user's inbox, not with the log.
    """
    key = os.urandom(16) if native.ext is not None else None
    tables, lsn, ts = replay(store, to_lsn, until_us=until_us, progress=progress,
                             digested=_NOT_SHOWN, key=key, user=user)
    return inbox_of(store, user, tables, lsn, ts)


def inbox_of(store: Store, user: str, tables: MemoryTables, lsn: int,
             ts: int | None) -> dict[str, Any]:
    """`inbox_at`'s answer from `tables`, a replay up to `lsn` (whose time is `ts`), whole or
    kept to `user`'s rows."""
    if ts is not None:
        check_time(lsn, ts)
    d = tables.data
    prefix = user.encode() + b"\0"
    cut = len(prefix)
    mine = sorted((k, v) for k, v in d["inbox"].items() if k.startswith(prefix))
    inbox = [_entry(store, u64(k[cut:]), v) for k, v in mine]
    unread = {}
    for key in sorted(k for k in d["user_conv"] if k.startswith(prefix)):
        conv = key[cut:].decode()
        seq = d["conv_seq"].get(conv.encode())
        last = 0 if seq is None else u64(seq)
        mark = d["read"].get(conv.encode() + b"\0" + user.encode())
        unread[conv] = max(0, last - (0 if mark is None else u64(mark)))
    head = d["inbox_head"].get(user.encode())
    return {"user": user, "lsn": lsn, "ts": None if ts is None else ts_iso(ts),
            "inbox_head": 0 if head is None else u64(head), "inbox": inbox, "unread": unread,
            "muted": sorted(k[cut:].decode() for k in d["mute"] if k.startswith(prefix)),
            "delivered": {k[cut:].decode(): u64(v) for k, v in sorted(
                (k, v) for k, v in d["delivered"].items() if k.startswith(prefix) and k != prefix)}}


# ---------------------------------------------------------------- message traces


@dataclass(slots=True)
class _Found:
    conv: str
    seq: int
    lsn: int
    ts_us: int
    sender: str
    members: set[str] = field(default_factory=set)


# The events `trace` reads the data of, beside messages (`_fields`).
_TRACED = frozenset({r.MEMBER_ADDED, r.MEMBER_REMOVED, r.DELIVERY_ACKED, r.READ_MARKED})


def _fields(lsn: int, value: bytes) -> list[Any]:
    """The fields `[lsn, ts_us, type, user, device, data]` of record `lsn` (`digest || body`),
    checked as `decode_event` checks them (CorruptLog), without making an Event of them; and,
    as `audit verify` checks them, its type, actor and data of their kinds (`_check_fields`),
    and the data of a message (its conv and cid) and of each event of `_TRACED`."""
    fields = record_fields(lsn, value[32:])
    check_time(lsn, fields[1])
    _, _, kind, user, device, data = fields
    _check_fields(lsn, kind, user, device, data)
    if kind == r.MESSAGE_ACCEPTED:
        if type(data.get("conv")) is str and type(data.get("cid")) is str:
            return fields  # nearly every record
    elif kind not in _TRACED:
        return fields
    fault = data_fault(kind, data)
    if fault is not None:
        raise CorruptLog(lsn, f"{kind} {fault}")
    return fields


def _check_fields(lsn: int, kind: Any, user: Any, device: Any, data: Any) -> None:
    """Raise `CorruptLog` at `lsn` unless a record's type, actor (`user`, `device`) and data
    are of the kinds `audit verify` requires (text, text, text, a map; it fails any other
    record at its LSN, in the same words: `storage.log.fields_fault`): what `stats` and
    `trace` count by and read."""
    fault = fields_fault(kind, user, device, data)
    if fault is not None:
        raise CorruptLog(lsn, fault)


def _find_message(store: Store, match: Callable[[list[Any], int], bool], progress: Progress,
                  conv: str | None = None) -> _Found | None:
    """Scan the log for the first message.accepted satisfying `match(fields, seq)`, counting
    each conversation's messages and tracking its members; those of `conv` only, when given."""
    counts: Counter[str] = Counter()
    members: dict[str, set[str]] = {}
    for lsn, value in raw_records(store, 1, None, progress):
        fields = _fields(lsn, value)
        kind = fields[2]
        if kind == r.MESSAGE_ACCEPTED:
            where = fields[5]["conv"]
            if conv is not None and where != conv:
                continue
            counts[where] += 1
            if match(fields, counts[where]):  # at `lsn`, its key: the body's own lsn (which
                # `verify` holds to it) is not read, so one of text or another is no fault here
                return _Found(where, counts[where], lsn, fields[1], fields[3],
                              set(members.get(where, ())))
        elif kind == r.MEMBER_ADDED or kind == r.MEMBER_REMOVED:
            data = fields[5]
            where = data["conv"]
            if conv is not None and where != conv:
                continue
            if kind == r.MEMBER_ADDED:
                members.setdefault(where, set()).add(data["user"])
            else:
                members.get(where, set()).discard(data["user"])
    return None


def _inbox_seq_of(store: Store, user: str, lsn: int) -> int | None:
    """Return the inbox seq of `user`'s entry for log record `lsn` (binary search), or None."""
    lo, hi = 1, store.inbox_head(user)
    while lo <= hi:
        mid = (lo + hi) // 2
        items = store.inbox_after(user, mid - 1, 1)
        if not items:
            return None
        if items[0].lsn == lsn:
            return mid
        if items[0].lsn < lsn:
            lo = mid + 1
        else:
            hi = mid - 1
    return None


def _by_cid(sender: str, cid: str) -> Callable[[list[Any], int], bool]:
    return lambda fields, _seq: fields[3] == sender and fields[5]["cid"] == cid


def find_by_cid(store: Store, sender: str, cid: str, progress: Progress = None) -> tuple[str, int]:
    """Return `(conv, seq)` of the message `sender` sent with client id `cid` (KeyError if none)."""
    found = _find_message(store, _by_cid(sender, cid), progress)
    if found is None:
        raise KeyError(f"no message from {sender} with cid {cid}")
    return found.conv, found.seq


def trace(store: Store, conv: str, seq: int, progress: Progress = None) -> dict[str, Any]:
    """Return the life of message `seq` of `conv` (KeyError when there is no such message).

    Shape: `{"conv", "seq", "from", "lsn", "ts", "recipients": {user: {"delivered": ts|null,
    "devices": {device: ts}, "read": ts|null}}}`. Recipients are the members at the time of the
    message other than the sender. A device received it at its first `delivery.acked` covering
    the message's inbox seq; "read" is the first `read.marked` of that user in `conv` reaching
    `seq`, or their first post in `conv` after it, whichever comes first (a post moves its
    sender's read mark, as the projections do); "delivered" is the earliest device, or the
    read when earlier (a read mark moves the delivered one too): so a recipient is delivered
    and read here when `homing receipts` lists them so.
    """
    found = _find_message(store, lambda _fields, n: n == seq, progress, conv)
    if found is None:
        raise KeyError(f"no message {seq} in {conv}")
    return _life(store, found, progress)


def trace_cid(store: Store, sender: str, cid: str, progress: Progress = None) -> dict[str, Any]:
    """`trace` of the message `sender` sent with client id `cid` (KeyError if none), reading the
    log once (`find_by_cid` and then `trace` read it twice up to the message)."""
    found = _find_message(store, _by_cid(sender, cid), progress)
    if found is None:
        raise KeyError(f"no message from {sender} with cid {cid}")
    return _life(store, found, progress)


def _life(store: Store, found: _Found, progress: Progress) -> dict[str, Any]:
    """`trace`'s answer: the acks and read marks of the recipients of `found`, after it."""
    conv, seq = found.conv, found.seq
    recipients = sorted(found.members - {found.sender})
    inbox_seq = {u: _inbox_seq_of(store, u, found.lsn) for u in recipients}
    devices: dict[str, dict[str, int]] = {u: {} for u in recipients}
    read: dict[str, int] = {}
    members = set(found.members)  # of `conv` as the scan goes: a post marks read a member's
    after = None if progress is None else (lambda done: progress(found.lsn + done))
    for lsn, value in raw_records(store, found.lsn + 1, None, after):
        fields = _fields(lsn, value)
        kind, user = fields[2], fields[3]
        if (kind == r.MEMBER_ADDED or kind == r.MEMBER_REMOVED) and fields[5]["conv"] == conv:
            (members.add if kind == r.MEMBER_ADDED else members.discard)(fields[5]["user"])
            continue
        if user not in devices:
            continue
        data = fields[5]
        if kind == r.DELIVERY_ACKED:
            want = inbox_seq[user]
            if want is not None and data["upto"] >= want:
                devices[user].setdefault(fields[4], fields[1])
        elif (kind == r.READ_MARKED and user not in read and data["conv"] == conv
              and data["upto"] >= seq):
            read[user] = fields[1]
        elif (kind == r.MESSAGE_ACCEPTED and user not in read and data["conv"] == conv
              and user in members):  # not an admin token's post from outside
            read[user] = fields[1]  # a later post of theirs: its seq is past `seq`
    out = {}
    for u in recipients:
        devs = devices[u]
        marks = [*devs.values(), *([read[u]] if u in read else [])]
        out[u] = {"delivered": ts_iso(min(marks)) if marks else None,
                  "devices": {d: ts_iso(t) for d, t in sorted(devs.items())},
                  "read": ts_iso(read[u]) if u in read else None}
    return {"conv": found.conv, "seq": found.seq, "from": found.sender, "lsn": found.lsn,
            "ts": ts_iso(found.ts_us), "recipients": out}


# ---------------------------------------------------------------- statistics


def stats(store: Store, data_dir: str | None = None, progress: Progress = None) -> dict[str, Any]:
    """Return counts over the whole log: events by type, users, conversations, sizes, time span.

    Shape: `{"events", "by_type": {type: n}, "users", "conversations", "log_bytes",
    "disk_bytes", "first_ts", "last_ts", "first_lsn", "last_lsn"}`. `log_bytes` counts the
    stored records (8-byte key + digest + body); `disk_bytes` the files of `data_dir`. A user
    is an actor or a text `data.user`. CorruptLog at a record it cannot count, which `audit
    verify` fails: its type, actor or data not of their kinds (`_check_fields`), a
    `conv.created` whose conv is no text.
    """
    by_type: Counter[str] = Counter()
    users: set[str] = set()
    convs: set[str] = set()
    count = log_bytes = 0
    first = last = None
    first_lsn = last_lsn = 0
    for lsn, value in raw_records(store, 1, None, progress):
        ev = decode_event(lsn, value)
        _check_fields(lsn, ev.type, ev.user, ev.device, ev.data)
        count += 1
        log_bytes += 8 + len(value)
        by_type[ev.type] += 1
        users.add(ev.user)
        target = ev.data.get("user")
        if type(target) is str:  # (another kind, in an event whose user the replay does not
            users.add(target)    # read, which `verify` passes, is no user)
        if ev.type == r.CONV_CREATED:
            conv = ev.data.get("conv")
            if type(conv) is not str:
                raise CorruptLog(lsn, f"{ev.type} {data_fault(ev.type, ev.data)}")
            convs.add(conv)
        if first is None:
            first, first_lsn = ev.ts_us, lsn
        last, last_lsn = ev.ts_us, lsn
    return {"events": count, "by_type": dict(sorted(by_type.items())), "users": len(users),
            "conversations": len(convs), "log_bytes": log_bytes,
            "disk_bytes": _disk_bytes(data_dir) if data_dir else None,
            "first_ts": None if first is None else ts_iso(first),
            "last_ts": None if last is None else ts_iso(last),
            "first_lsn": first_lsn, "last_lsn": last_lsn}


def _disk_bytes(path: str) -> int:
    """Return the bytes the files directly in `path` occupy on disk (allocated blocks)."""
    total = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat().st_blocks * 512
    return total
