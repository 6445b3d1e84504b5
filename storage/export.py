"""`homing audit export`'s lines, and their check offline (docs/OPERATIONS.md, "Auditing").

An export line is the event object of `audit log --json` (`audit.event_record`) with keys
appended: `prev`, on the first line only, the digest of the record before it (`GENESIS`'s 64
zeros before lsn 1); `digest`, the record's own (storage/records.py); and `record_b64`, the
record's body, only on a line whose fields do not make that body again (`remake`: a record
homing did not write, chained on by hand). Rules kept:

* A line is a function of its record (`digest || body`) and, on the first line, of the digest
  before it: `line`. The export writes it; the check makes it again and compares.
* The check (`check_lines`) makes each record's body again from its line, walks the chain with
  `storage.log.verify_records` (the walk `audit verify` makes of the log), and then requires
  the line to be byte for byte `line` of that record: so any changed byte is caught, also one
  that JSON reads alike (a digest's hex in capitals, an escape spelt otherwise, base64's spare
  bits, a `ts` that is not `ts_us`).
* One line in memory at a time, of at most `max_line_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from msgpack import packb, unpackb

from storage.audit import Progress, decode_event, event_record, raw_records
from storage.errors import CorruptLog, ExportFault, ExportLineTooLong
from storage.log import verify_records
from storage.records import DIGEST_BYTES, GENESIS, Event
from storage.records import chain as log_chain
from storage.store import Store

# The longest line the check reads by default (`audit verify-export --max-line-bytes`). A line
# takes up to 6 bytes of JSON a body byte when every one is escaped (`\u0000`), plus ids and
# digests: under 400 KiB with serve's default --max-body-bytes (64 KiB), past this bound for a
# body past about 2.7 MiB (the flag raised): such a line is not read (ExportLineTooLong).
MAX_LINE_BYTES = 16 << 20

# How deep an export line's JSON nests at most: the line's object; below it the containers of a
# record msgpack decodes but its own list (1,024 in all), each up to three levels (a map with a
# key that is not text: `{"$map": [[KEY, VALUE]]}`); and the leaf `{"$ext": [CODE, BASE64]}`.
MAX_EXPORT_NESTING = 1 + 3 * (1024 - 1) + 2

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode
_SCALARS = frozenset({str, int, bool, type(None)})
# The keys of a line and the kinds it must hold them in (None: any, as `export` shows the lsn,
# type, actor, device and data of a record `verify` fails: that fault is then named by the
# walk, in verify's words, not as a line that is no export line).
_FIELDS = (("lsn", None), ("ts_us", int), ("type", None), ("actor", None), ("device", None),
           ("data", None), ("digest", str))


# ---------------------------------------------------------------- writing


def line(lsn: int, value: bytes, prev: bytes | None = None) -> str:
    """The export line of record `lsn` (`value` = `digest || body`), `prev` the digest before
    it on a file's first line (None on the others), ending in a line break.

    CorruptLog when the body is no event (`audit.decode_event`), as `audit log` says.
    """
    ev = decode_event(lsn, value)
    rec = event_record(ev)
    if prev is not None:
        rec["prev"] = prev.hex()
    rec["digest"] = value[:DIGEST_BYTES].hex()
    text = _encode(rec)
    body = value[DIGEST_BYTES:]
    if (_packed(ev) if _plain(ev, rec) else _remade(text)) != body:
        rec["record_b64"] = base64.b64encode(body).decode("ascii")
        text = _encode(rec)
    return text + "\n"


def _plain(ev: Event, shown: dict[str, Any]) -> bool:
    """Whether `remake` of `ev`'s line is `encode_body(ev)` (`_packed`), known without parsing
    the line, from `shown`, `ev`'s `event_record`: its data is a map whose values it shows as
    text, integers, booleans or null, which JSON gives back as they were (so the record's data
    is a map of text keys with no `body_b64` of its own and no value JSON cannot hold, each
    of which `event_record` shows otherwise; its binary body is `body_b64`, which `remake`
    turns back), a body is the data's last field (where homing's messages have it, and where
    `event_record` puts it), and its lsn, type and actor are such values too. Nearly every
    record. Another line (an ack's `convs`; one of `json_value`'s one-key objects, which
    `remake` does not turn back) is made again by parsing it (`_remade`); one that does not
    make its record carries `record_b64`."""
    data = ev.data
    return (type(data) is dict and _SCALARS.issuperset(map(type, shown["data"].values()))
            and ("body" not in data or next(reversed(data)) == "body")
            and _SCALARS.issuperset((type(ev.lsn), type(ev.type), type(ev.user),
                                     type(ev.device))))


def _packed(ev: Event) -> bytes:
    return packb([ev.lsn, ev.ts_us, ev.type, ev.user, ev.device, ev.data], use_bin_type=True)


def remake(obj: dict[str, Any]) -> bytes:
    """The record body an export line's fields make (`records.encode_body` of them): the
    `data.body_b64` of `event_record` decoded back into a binary `body`, at the end of `data`
    where homing's messages have it. Raises on fields no body can be made of."""
    data = obj["data"]
    if "body_b64" in data:
        body = base64.b64decode(data["body_b64"], validate=True)
        data = {k: v for k, v in data.items() if k != "body_b64"}
        data["body"] = body
    return packb([obj["lsn"], obj["ts_us"], obj["type"], obj["actor"], obj["device"], data],
                 use_bin_type=True)


def _remade(text: str) -> bytes | None:
    """`remake` of the line `text` as a reader parses it; None when it makes none."""
    try:
        return remake(_decode(text))
    except (ValueError, TypeError, KeyError, OverflowError, binascii.Error):
        return None


def lines(store: Store, from_lsn: int = 1, progress: Progress = None) -> Iterator[str]:
    """The export lines of the log from `from_lsn` (none when it ends before), streamed."""
    first = True
    for lsn, value in raw_records(store, from_lsn, None, progress):
        yield line(lsn, value, _digest_before(store, lsn) if first else None)
        first = False


def _digest_before(store: Store, lsn: int) -> bytes:
    """The digest of record `lsn - 1` (GENESIS before lsn 1); read once a record at `lsn` was,
    so it is there (the log is append-only; CorruptLog from the read when it is not)."""
    if lsn <= 1:
        return GENESIS
    for _, value in store.log.read_raw(lsn - 1, lsn - 1):
        return value[:DIGEST_BYTES]
    raise CorruptLog(lsn - 1, f"record missing (the next is lsn {lsn})")


# ---------------------------------------------------------------- checking


@dataclass(slots=True)
class Walk:
    """What `check_lines` found sound: the lines (and their LSNs), the digest the first one
    follows, the last one's digest, and each anchor's verdict (None: not reached)."""

    lines: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None
    prev: bytes | None = None
    head: bytes | None = None
    anchors: list[tuple[int, bytes, bool | None]] = field(default_factory=list)

    def pinned(self) -> bool:
        """Whether the record the first line follows is known to be the log's: the log's start
        (lsn 1 follows 64 zeros), or an anchor at or after it held (every digest after the
        first line's `prev` holds it). A file starting past lsn 1 without one is sound from
        its first line on, and nothing in it shows what came before: lines cut from the start
        of an export, the first left given the digest before it as `prev`, pass as an export
        `--from-lsn` (docs/OPERATIONS.md, "Verifying an export")."""
        return self.first_lsn == 1 or any(
            ok and self.first_lsn is not None and lsn >= self.first_lsn - 1
            for lsn, _, ok in self.anchors)


def check_lines(source: Iterable[bytes], anchors: Sequence[tuple[int, bytes]] = (),
                max_line_bytes: int = MAX_LINE_BYTES, walk: Walk | None = None) -> Walk:
    """Check the lines of an export file (bytes, each with its line break; the last may lack
    it), and that each anchor `(lsn, digest)` holds: record `lsn` has that digest (lsn first-1:
    the first line's `prev`). Return the Walk; raise ExportFault at the first line at fault,
    `walk` (if given) then holding what was sound before it.

    An anchor past the last line fails at the line after it: records missing from the end.
    One before the first line's `prev` cannot be checked here: its verdict stays None.
    """
    walk = walk if walk is not None else Walk()
    walk.anchors = [(lsn, digest, None) for lsn, digest in anchors]
    lines_in = iter(source)
    first = next(lines_in, None)
    if first is None:
        _anchor_at(walk, 0, GENESIS, 1, None)
        return _ends(walk, 0)
    lsn, value, obj = _parse(1, first, max_line_bytes, None, None)
    walk.first_lsn, walk.prev = lsn, bytes.fromhex(obj["prev"])
    if lsn < 1 or (lsn == 1 and walk.prev != GENESIS):
        raise ExportFault(1, lsn, f"lsn {lsn} follows no record: the log starts at lsn 1, "
                          f"whose prev is {GENESIS.hex()}")
    _anchor_at(walk, lsn - 1, walk.prev, 1, lsn)
    number = 0

    def records() -> Iterator[tuple[int, bytes]]:
        nonlocal number, lsn, value
        for number, raw in enumerate(chain([first], lines_in), 1):
            if number > 1:
                lsn, value, _ = _parse(number, raw, max_line_bytes, walk.last_lsn + 1,
                                       walk.head)
            yield lsn, value
            # resumed: verify_records found the record sound, and it chains on
            want = line(lsn, value, walk.prev if number == 1 else None).encode()
            if raw != want and raw != want[:-1]:  # the last line may lack its break
                raise ExportFault(number, lsn, _unlike(raw, want))
            _anchor_at(walk, lsn, value[:DIGEST_BYTES], number, lsn)
            walk.lines, walk.last_lsn, walk.head = number, lsn, value[:DIGEST_BYTES]

    try:
        verify_records(records(), walk.first_lsn, walk.prev)
    except CorruptLog as exc:
        raise ExportFault(number, exc.lsn, _chain_reason(exc.reason)) from None
    return _ends(walk, number)


def _parse(number: int, raw: bytes, max_line_bytes: int, expected: int | None,
           before: bytes | None) -> tuple[int, bytes, dict[str, Any]]:
    """Line `number`'s LSN, its record (`digest || body`, the body remade or its `record_b64`)
    and its object; ExportFault when it is none (`expected`: the LSN it should hold, None on
    the first line, which must carry `prev` and holds any LSN; `before`: the digest of the
    line before it).

    A line whose lsn is none a record of homing's holds (text, or another number than
    `expected` while its record chains on `before`: the export's line of a record `verify`
    fails, `body says lsn ...`) is given `expected`, for the walk to name its record's fault
    in verify's words, as of a record's other fields; one of another number that does not
    chain there is a line moved, inserted or removed."""
    if len(raw) > max_line_bytes:
        raise ExportLineTooLong(number, expected, (
            f"longer than {max_line_bytes:,} bytes (--max-line-bytes), not read: a line takes "
            "up to about 6 bytes a byte of its message's body, so a broker whose "
            "--max-body-bytes was raised writes longer ones; check again with a larger bound"))
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ExportFault(number, expected, "it starts with a UTF-8 byte order mark (EF BB "
                          "BF), which an export never writes: a Windows editor added it; "
                          "remove it and check again")
    if raw.isspace():
        raise ExportFault(number, expected, "an empty line, which no export holds (added at "
                          "the end by an editor, or files joined?)")
    try:
        obj = _decode(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        cut = "" if raw.endswith(b"\n") else " (the file ends inside it: cut short?)"
        raise ExportFault(number, expected, f"not a JSON line: {exc}{cut}") from None
    except RecursionError:  # json's decoder, past the interpreter's recursion limit
        raise ExportFault(number, expected, (
            "not a JSON line: nested deeper than it can be read (Python's recursion limit, "
            f"{sys.getrecursionlimit():,} in homing audit), where an export line of "
            f"homing's nests at most {MAX_EXPORT_NESTING:,} deep")) from None
    if type(obj) is not dict:
        raise ExportFault(number, expected, "not an export line: not a JSON object")
    for key, kind in _FIELDS:
        if key not in obj or (kind is not None and type(obj[key]) is not kind):
            of = "" if kind is None else f" of type {kind.__name__}"
            raise ExportFault(number, expected, f"not an export line: no {key}{of} (exported "
                              "by a homing before 2026-12-06?)")
    lsn = obj["lsn"] if type(obj["lsn"]) is int else expected
    if expected is None and type(obj.get("prev")) is not str:
        raise ExportFault(number, lsn, "the first line carries no prev, the digest of the "
                          "record before it: lines before it were removed, or it is not the "
                          "first line of an export")
    if expected is not None and "prev" in obj:
        raise ExportFault(number, lsn, "a prev, which only an export's first line carries: "
                          "a first line moved here, or lines added before it")
    digests = (obj["digest"], obj.get("prev", "0" * 2 * DIGEST_BYTES))
    if any(len(d) != 2 * DIGEST_BYTES or not _hex(d) for d in digests):
        raise ExportFault(number, lsn, f"its digest or prev is not {2 * DIGEST_BYTES} hex "
                          "digits")
    body = _body(obj)
    if body is None:
        raise ExportFault(number, lsn, "its fields make no record (a data.body_b64 or "
                          "record_b64 that is no base64, a number past 64 bits, a value "
                          "nested deeper than msgpack packs)")
    value = bytes.fromhex(obj["digest"]) + body
    if expected is None and "record_b64" in obj and type(own := _own_lsn(body)) is int:
        lsn = own  # the first line of a record's own bytes: placed where the record says
    if lsn is None:  # the first line, of an lsn no record of homing's holds: placed nowhere
        raise ExportFault(number, None, _unplaced(value, bytes.fromhex(obj["prev"])))
    if expected is not None and lsn != expected and value[:DIGEST_BYTES] != log_chain(
            before, body):
        how = ("missing before it, or it was moved up" if lsn > expected
               else "inserted, or moved down from before it")
        raise ExportFault(number, lsn, f"lsn {lsn} where lsn {expected} belongs: lines {how}")
    return expected if expected is not None else lsn, value, obj


def _own_lsn(body: bytes) -> object:
    """The lsn record `body` holds (None when it holds no list of fields): where a first line
    carrying its record's bytes (`record_b64`) belongs, its own `lsn` changed or not (the
    comparison with the record's line then names the change, not the record)."""
    try:
        fields = unpackb(body)
    except Exception:  # (any body: `verify_records` names its fault)
        return None
    return fields[0] if type(fields) is list and fields else None


def _unplaced(value: bytes, prev: bytes) -> str:
    """Why the first line, whose lsn is none a record of homing's holds, is at fault: the
    walk's reason for its record (`value`, after `prev`), where the file's first LSN is not
    known (a record that says lsn 0 is none of a log's either)."""
    try:
        verify_records(((0, value),), 0, prev)
    except CorruptLog as exc:
        return _chain_reason(exc.reason)
    return "its record says lsn 0, where a log starts at lsn 1"


def _hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _body(obj: dict[str, Any]) -> bytes | None:
    """The record body line `obj` stands for: its `record_b64`, else `remake` of its fields."""
    try:
        if "record_b64" in obj:
            return base64.b64decode(obj["record_b64"], validate=True)
        return remake(obj)
    except (ValueError, TypeError, KeyError, OverflowError, binascii.Error):
        return None


def _chain_reason(reason: str) -> str:
    """An export line's reason for `verify_records`'s CorruptLog `reason`."""
    if reason == "digest mismatch":
        return ("its digest is not that of the digest before it and its record: the line was "
                "changed (its fields are not the record digested), or the line before it is "
                "not the one it followed")
    return f"its record is none homing wrote: {reason}"


def _unlike(raw: bytes, want: bytes) -> str:
    """Why a line whose record chains is not that record's line: where the two part."""
    if raw.endswith((b"\r\n", b"\r")) and raw.rstrip(b"\r\n") == want[:-1]:
        return ("its line ends in CR LF (\\r\\n) where the export wrote LF alone: the line "
                "breaks were changed (a Windows editor, a copy in text mode); the line is "
                "otherwise its record's own: turn them back (dos2unix) and check again")
    at = next((i for i, (a, b) in enumerate(zip(raw, want, strict=False)) if a != b),
              min(len(raw), len(want)))
    return (f"the line is not its record's own from byte {at} on (it reads "
            f"{raw[at:at + 24]!r}, the record's line {want[at:at + 24]!r}): changed in a way "
            "the record's fields do not show (ts, a digest's spelling, an escape, a key)")


def _anchor_at(walk: Walk, lsn: int, digest: bytes, number: int,
               line_lsn: int | None) -> None:
    """Judge the anchors at `lsn`, whose digest is `digest` (line `number`'s record, or the
    digest before it, its `prev`: the line then holds `line_lsn`, lsn + 1); ExportFault for one
    that does not hold."""
    for i, (at, want, _) in enumerate(walk.anchors):
        if at != lsn:
            continue
        walk.anchors[i] = (at, want, digest == want)
        if digest != want:
            raise ExportFault(number, line_lsn, (
                f"digest {digest.hex()} of lsn {lsn} is not the anchor's {want.hex()}: "
                f"a line up to lsn {lsn} was changed, removed or inserted and the chain "
                "computed again"))


def _ends(walk: Walk, number: int) -> Walk:
    """The end of the file at line `number`: ExportFault for an anchor past its last LSN."""
    last = walk.last_lsn or 0
    for at, _, _ in walk.anchors:
        if at > last:
            missing = at - last
            raise ExportFault(number + 1, last + 1, (
                f"the file ends at lsn {last}, before the anchor's lsn {at}: {missing:,} "
                f"line{' is' if missing == 1 else 's are'} missing from its end"))
    return walk
