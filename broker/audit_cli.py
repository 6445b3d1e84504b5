"""`homing audit ...`: read the event log of a data directory for auditing (docs/OPERATIONS.md).

Every subcommand opens the data directory read-only (safe while the broker runs) except
`rebuild` without `--check`, which takes the writer lock and so refuses while a broker holds it.
Output follows the `homing` command's contract (broker/cli.py): JSON lines on stdout (or a
readable table), errors on stderr as one JSON object; exit 1 when a check finds a fault, 2 for
bad usage or an unusable data directory. Long walks draw a progress bar on stderr when it is a
terminal, and print nothing extra when it is not.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from broker.cli import EXIT_REFUSED, EXIT_USAGE, CliError, _number, _reader_gone, emit, warn
from broker.config import DEFAULT_DATA_DIR
from protocol import UINT_MAX

if TYPE_CHECKING:
    from storage import audit, export
    from storage.store import LAYOUT, Store

EXIT_FAULT = EXIT_REFUSED  # a check found a corrupt log or a projection difference
PROGRESS_HZ = 10
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_LSN = UINT_MAX  # the protocol's uint (LSNs are keyed as unsigned 64-bit integers)


# ---------------------------------------------------------------- progress bar


class ProgressBar:
    """A one-line progress bar on a terminal stream; does nothing when the stream is not a tty."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total = label, total
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        """Record `done` items processed (of `total`, if it is known only now); redraw at most
        PROGRESS_HZ times a second."""
        if not self.enabled:
            return
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self._last_draw < 1 / PROGRESS_HZ and done != self.total:
            return
        self._last_draw = now
        self._draw(done, now - self.started)

    def _draw(self, done: int, elapsed: float) -> None:
        if self.total:
            rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 else ""
            frac = min(1.0, done / self.total)
            bar = "#" * int(frac * 30)
            line = f"{self.label} [{bar:<30}] {frac:4.0%} {done:,}/{self.total:,} {rate}"
        else:
            line = f"{self.label} {done:,} {elapsed:.1f}s"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar so the terminal is left clean."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[ProgressBar]:
    """Yield a ProgressBar on stderr, erased at the end."""
    bar = ProgressBar(label, total)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------- parsing


def parse_time(text: str, now: datetime | None = None) -> int:
    """Return TIME as microseconds since the epoch.

    TIME is ISO-8601 (`2026-11-22T10:00:00Z`, `2026-11-22T12:00+02:00`, a date alone meaning its
    midnight UTC; no zone means UTC) or a duration ago (`90s`, `10m`, `2h`, `3d`, `1w`).
    """
    text = text.strip()
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text)
    if m:
        when = (now.timestamp() - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1_000_000
        if not math.isfinite(when):  # more digits than a float holds: no time at all
            raise argparse.ArgumentTypeError(f"bad time {text!r}: too long ago")
        return int(when)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text)
            dt = datetime(d.year, d.month, d.day, tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use ISO-8601 (2026-11-22T10:00:00Z, 2026-11-22) "
            "or a duration ago (10m, 2h, 3d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _lsn(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LSN:  # past it no log key can be made (a struct.error)
        raise argparse.ArgumentTypeError(f"bad LSN {text!r}: an integer from 0 to 2**63-1")
    return value


# ---------------------------------------------------------------- opening the store


def _import_storage() -> None:
    """Bind storage's modules on first use, so other `homing` commands do not pay for them."""
    global audit, export, CorruptLog, DataDirLocked, ExportFault, ExportLineTooLong, LAYOUT
    global MissingTables, StorageError, Store, structlog
    import structlog

    from storage import audit, export
    from storage.errors import (
        CorruptLog,
        DataDirLocked,
        ExportFault,
        ExportLineTooLong,
        MissingTables,
        StorageError,
    )
    from storage.store import LAYOUT, Store


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep storage's lifecycle logs (storage_opened ...) off stdout: warnings only, each as
    the command's own warning line on stderr (`_as_warning`).

    The previous structlog configuration is restored afterwards (tests call `main` in-process).
    """
    saved = structlog.get_config()
    structlog.configure(
        processors=[_as_warning],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    try:
        yield
    finally:
        structlog.configure(**saved)


# msgpack decodes values nested up to 1,024 deep (deeper: StackError, a record `verify` fails),
# and a record chained on by hand may hold one that deep. Showing it takes up to two Python
# frames a level (`audit.json_value` and its "$map" form) and `json`'s encoder and decoder one
# more each: within Python's default limit of 1,000 such a record ended `log`, `export` and
# `verify-export` in a RecursionError. The actions run with this much more room (a few hundred
# kilobytes of the C stack at most: json's C encoder and decoder take a few hundred bytes a
# level, and Python's own calls none).
NESTING_FRAMES = 4 * 1024


@contextmanager
def room_for_nesting() -> Iterator[None]:
    """Raise the interpreter's recursion limit by NESTING_FRAMES for the block; restored after
    (tests call `main` in-process)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + NESTING_FRAMES)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _as_warning(logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A storage warning met by an audit action or `homing backup` (`unclean_stop_found` when
    `audit rebuild` opens a directory whose broker was killed, `storage_stale_readers_cleared`)
    as a `{"warning": NAME, "message": TEXT}` line, as every warning of `homing` is
    (docs/CLI.md, Conventions): structlog's console text there was the one stderr line a
    script could not parse. Its fields go into the message, the hint last (`path /d, pid
    4242: the last writer ...`)."""
    fields = {key: value for key, value in event.items() if key not in ("event", "hint")}
    said = ", ".join(f"{key} {value}" for key, value in fields.items())
    hint = event.get("hint")
    warn(str(event["event"]), f"{said}: {hint}" if said and hint else said or hint or "")
    raise structlog.DropEvent


def _cannot_open(path: str, exc: BaseException) -> str:
    """The message of a data directory that would not open: storage's own when it names the
    directory already ("cannot open DIR: ...", "cannot read DIR: ..."), not said twice."""
    return str(exc) if str(path) in str(exc) else f"cannot open {path}: {exc}"


def quietly(func):
    """Wrap an action: quiet storage logs, and end silently when stdout's reader goes away."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        _import_storage()
        try:
            with quiet_logs(), room_for_nesting():
                return func(args)
        except CorruptLog as exc:
            raise CliError(EXIT_FAULT, "corrupt_log", f"{exc} (`homing audit verify` "
                           "tells what is sound)") from None
        except MissingTables as exc:  # a projection read of a table an older homing lacks
            raise _outdated(exc) from None
        except StorageError as exc:
            # A read that failed after the open (LMDB's reader table filled up by other
            # processes between two of its short read transactions): as when the open fails.
            raise CliError(EXIT_USAGE, "no_data", str(exc)) from None
        except BrokenPipeError:  # `homing audit export | head`: the reader is gone
            return _reader_gone()
    return run



def _require_data_dir(path: str) -> None:
    """Raise CliError unless `path` holds a homing data directory."""
    if not (Path(path) / "data.mdb").is_file():
        what = "does not exist" if not Path(path).exists() else (
            "is not a homing data directory (no data.mdb in it)")
        raise CliError(EXIT_USAGE, "no_data", f"{path} {what}: --data names the broker's data "
                       f"directory (default ./{DEFAULT_DATA_DIR})")


def _outdated(exc: Exception) -> CliError:
    return CliError(EXIT_FAULT, "outdated_layout", (
        f"{exc}; a broker brings it up to date when it starts, or stop it and run "
        "`homing audit rebuild`"))


def open_readonly(path: str) -> Store:
    """Open the data directory read-only, or raise CliError when it is not one (or one written
    before layouts were recorded, without a `layout` table: `outdated_layout`, as the checks
    say of one of another layout). One of an older layout opens though it lacks a table added
    since: its log reads, and a read of that table raises MissingTables (`quietly`)."""
    _require_data_dir(path)
    try:
        return Store.open(path, readonly=True)
    except MissingTables as exc:
        raise _outdated(exc) from None
    except StorageError as exc:
        raise CliError(EXIT_USAGE, "no_data", _cannot_open(path, exc)) from None


@contextmanager
def readonly_store(args: argparse.Namespace) -> Iterator[Store]:
    """Yield the read-only Store of `--data`, closed afterwards."""
    store = open_readonly(args.data)
    try:
        yield store
    finally:
        store.close()


# ---------------------------------------------------------------- log and export


def _summary(ev_data: dict[str, Any], width: int = 60) -> str:
    """Return an event's data as `k=v` pairs, cut to `width` characters: each value as the
    JSON of `--json` spells it (null, false, ["a","b"]), bodies quoted, other text bare unless
    `_bare` refuses it (a name is any text its creator chose: a line break in it made a row of
    the table, an escape sequence reached the operator's terminal, a `"` first or an `=` made
    it read as another value or as a pair of its own). A key is bare on the same terms; a data
    that is no map (a record `verify` calls corrupt) is its JSON."""
    if type(ev_data) is not dict:
        return _cut(_printable_json(ev_data), width)
    parts = []
    for key, value in ev_data.items():
        # (`_bare`, inline: the call cost 0.1 us a value, a key, a row of the table)
        bare = (type(value) is str and key not in ("body", "body_b64") and value.isprintable()
                and "=" not in value and value[:1] != '"')
        name = (key if key.isprintable() and "=" not in key and key[:1] != '"'
                else _printable_json(key))
        parts.append(f"{name}={value if bare else _printable_json(value)}")
    return _cut(" ".join(parts), width)


def _cut(line: str, width: int) -> str:
    """`line`, cut to `width` characters, the last of a longer one an ellipsis."""
    return line if len(line) <= width else line[: width - 1] + "…"


def _printable_json(value: Any) -> str:
    """`value` as compact JSON, each character `isprintable` refuses escaped: JSON escapes
    only U+0000-U+001F, and leaves C1 controls (U+009B starts an escape sequence on some
    terminals) and bidi overrides (U+202E) as they are."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _table_row(rec: dict[str, Any], lsn_width: int) -> str:
    lsn, kind, actor, device = rec["lsn"], rec["type"], rec["actor"], rec["device"]
    if not (type(lsn) is int and type(kind) is str and type(actor) is str
            and type(device) is str and (text := kind + actor + device).isprintable()
            and '"' not in text and "=" not in text):  # (else `_cell`'s: every record homing
        # writes, its ids and types of `ID_RE`'s letters, is printed as it is)
        lsn, kind, actor, device = map(_cell, (lsn, kind, actor, device))
    who = f"{actor}/{device}"
    return f"{lsn:>{lsn_width}}  {rec['ts']}  {kind:<16}  {who:<24}  {_summary(rec['data'])}"


def _bare(text: str) -> bool:
    """Whether text is spelt bare: printable, not starting with `"` (the quoted spelling of
    other text: the printable `"\\u001b"` and an escape were one cell), without `=` (a cid
    `x body="..."` made a pair of its own in `log`'s DATA, a conv `a=1, b` two unread counts
    in `inbox`). Else `_printable_json` spells it, so a cell spells one text."""
    return text.isprintable() and text[:1] != '"' and "=" not in text


def _cell(value: Any) -> str:
    """A column's value: text bare while `_bare`, else (or when no text: a record `verify`
    calls corrupt) its JSON, as `_summary` spells values."""
    if type(value) is str and _bare(value):
        return value
    return str(value) if type(value) is int else _printable_json(value)


def cmd_log(args: argparse.Namespace) -> int:
    flt = audit.EventFilter(
        from_lsn=args.from_lsn or 1, to_lsn=args.to_lsn, since_us=args.since,
        until_us=args.until, user=args.user, conv=args.conv,
        types=tuple(t for group in (args.type or []) for t in group.split(",") if t))
    with readonly_store(args) as store:
        width = max(3, len(str(store.last_lsn())))
        if not args.json:
            sys.stdout.write(f"{'LSN':>{width}}  {'TIME (UTC)':<27}  {'TYPE':<16}  "
                             f"{'ACTOR/DEVICE':<24}  DATA\n")
        for ev in audit.iter_events(store, flt):
            rec = audit.event_record(ev)
            if args.json:
                emit(rec)
            else:
                sys.stdout.write(_table_row(rec, width) + "\n")
    sys.stdout.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = sys.stdout
    with readonly_store(args) as store:
        start = args.from_lsn or 1
        total = max(0, store.last_lsn() - start + 1)
        with progress_bar("export", total) as bar:
            out.writelines(export.lines(store, start, bar))
    out.flush()
    return 0


def cmd_verify_export(args: argparse.Namespace) -> int:
    walk = export.Walk()
    report: dict[str, Any] = {"ok": False}
    try:
        with _export_file(args.file) as f, progress_bar("verify export", None) as bar:
            most = args.max_line_bytes or export.MAX_LINE_BYTES
            export.check_lines(_counted(iter(lambda: f.readline(most + 1), b""), bar),
                               args.anchor or (), most, walk)
    except ExportFault as exc:
        # a line past the bound is not found at fault, only not read (ok null): usage
        long = isinstance(exc, ExportLineTooLong)
        report |= _walked(walk) | {"file": {"ok": None if long else False, "line": exc.line,
                                            "lsn": exc.lsn, "reason": exc.reason}}
        emit(report | _anchors(walk))
        raise CliError(EXIT_USAGE if long else EXIT_FAULT, "usage" if long else "corrupt_export",
                       str(exc)) from None
    except OSError as exc:
        raise CliError(EXIT_USAGE, "no_data", f"cannot read {args.file}: "
                       f"{exc.strerror or exc}") from None
    report |= _walked(walk) | {"file": {"ok": True}}
    # The file's own head: what the auditor compares with a head kept apart (or --anchor).
    report["head"] = {"lsn": walk.last_lsn or 0, "digest": (walk.head or export.GENESIS).hex()}
    unchecked = [lsn for lsn, _, ok in walk.anchors if ok is None]
    report["ok"] = not unchecked
    emit(report | _anchors(walk))
    if unchecked:
        raise CliError(EXIT_USAGE, "usage", (
            f"--anchor {unchecked[0]}:...: this file cannot check it, its first line follows "
            f"lsn {(walk.first_lsn or 1) - 1}: give a head from that lsn on"))
    return 0


@contextmanager
def _export_file(name: str) -> Iterator[Any]:
    """The file `verify-export` reads, binary (`-`: standard input, left open)."""
    if name == "-":
        if sys.stdin is None:  # started without one (`<&-`)
            raise CliError(EXIT_USAGE, "usage", "FILE is -, and standard input is closed")
        yield sys.stdin.buffer
        return
    with open(name, "rb") as f:
        yield f


def _counted(lines: Iterator[bytes], bar: ProgressBar) -> Iterator[bytes]:
    """`lines`, with the progress bar told every `audit.PROGRESS_EVERY` of them."""
    for done, raw in enumerate(lines, 1):
        yield raw
        if not done % audit.PROGRESS_EVERY:
            bar(done)


def _walked(walk: export.Walk) -> dict[str, Any]:
    """The part of the verify-export report that says what was found sound."""
    prev = None if walk.prev is None else {"lsn": walk.first_lsn - 1, "digest": walk.prev.hex(),
                                           "pinned": walk.pinned()}
    return {"lines": walk.lines, "first_lsn": walk.first_lsn, "last_lsn": walk.last_lsn,
            "prev": prev}


def _anchors(walk: export.Walk) -> dict[str, Any]:
    """The anchors' verdicts (null: not reached, or before the file), when there are any."""
    if not walk.anchors:
        return {}
    return {"anchors": [{"lsn": lsn, "digest": digest.hex(), "ok": ok}
                        for lsn, digest, ok in walk.anchors]}


# ---------------------------------------------------------------- verify and rebuild


def _check(store: Store) -> tuple[dict[str, Any], audit.Difference | None]:
    """Run the projection check with a progress bar; return its JSON part and the difference."""
    have = store.stored_layout()
    if have != LAYOUT and store.last_lsn():
        stored = "none" if have is None else have.decode(errors="replace")
        raise CliError(EXIT_FAULT, "outdated_layout", (
            f"the projections were written by another homing, older or newer (layout {stored}, "
            f"this version checks layout {LAYOUT.decode()}); a broker rebuilds them when it "
            "starts, or stop it and run `homing audit rebuild`"))
    with progress_bar("replay", store.last_lsn()) as bar:
        diff, events = audit.check_projections(store, bar)
    part: dict[str, Any] = {"ok": diff is None, "replayed": events}
    if diff is not None:
        part["difference"] = diff.describe()
    return part, diff


def _diff_message(diff: audit.Difference) -> str:
    d = diff.describe()
    return (f"projection {d['table']} differs at key {json.dumps(d['key'])}: "
            f"stored {json.dumps(d['stored'])}, replayed {json.dumps(d['replayed'])}")


def _anchor(text: str) -> tuple[int, bytes]:
    """`--anchor LSN:DIGEST`: a head `verify` printed, 64 hex digits of digest."""
    lsn, _, digest = text.partition(":")
    try:
        value = (_lsn(lsn), bytes.fromhex(digest))
    except (argparse.ArgumentTypeError, ValueError):
        value = (0, b"")
    if len(value[1]) != 32:
        raise argparse.ArgumentTypeError(f"bad anchor {text!r}: LSN:DIGEST, as verify's "
                                         "head prints them (64 hex digits)")
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    anchor = args.anchor
    with readonly_store(args) as store:
        report: dict[str, Any] = {"ok": False, "events": 0}
        try:
            with progress_bar("verify log", store.last_lsn()) as bar:
                report["events"], head = audit.verify_head(store, anchor, bar)
        except CorruptLog as exc:
            report["events"] = max(0, exc.lsn - 1)  # the records before it are sound
            report["log"] = {"ok": False, "lsn": exc.lsn, "reason": str(exc)}
            report["projections"] = {"ok": None, "skipped": "log is corrupt"}
            if anchor is not None:  # checked once its record verified, before the next
                report["anchor"] = {"lsn": anchor[0], "digest": anchor[1].hex(),
                                    "ok": exc.lsn > anchor[0]}
            emit(report)
            raise CliError(EXIT_FAULT, "corrupt_log", str(exc)) from None
        report["log"] = {"ok": True}
        # What to keep outside the data directory, to pass as --anchor to a later verify.
        report["head"] = {"lsn": report["events"], "digest": head.hex()}
        if anchor is not None:
            report["anchor"] = {"lsn": anchor[0], "digest": anchor[1].hex(), "ok": True}
        report["projections"], diff = _check(store)
        report["ok"] = diff is None
        emit(report)
    if diff is not None:
        raise CliError(EXIT_FAULT, "projection_mismatch", _diff_message(diff))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    if args.check:
        with readonly_store(args) as store:
            part, diff = _check(store)
            emit({"ok": diff is None, "check": True, **part})
        if diff is not None:
            raise CliError(EXIT_FAULT, "projection_mismatch", _diff_message(diff))
        return 0
    _require_data_dir(args.data)  # refuse a directory that is not one, without creating it
    try:
        with progress_bar("rebuild (new layout)", None) as bar:  # one of an older layout is
            # No catch-up: the rebuild remakes every row, a damaged one it would stop at too.
            store = Store.open(args.data, on_rebuild=bar, catch_up=False)
    except DataDirLocked as exc:
        who = "" if exc.holder is None else f" (process {exc.holder})"
        raise CliError(EXIT_USAGE, "locked", f"{args.data} is held by a running broker{who}: "
                       "stop it first (`homing audit rebuild --check` is read-only)") from None
    except CorruptLog:  # a log cut behind its projections: `corrupt_log`, as a read ends
        raise
    except (StorageError, OSError) as exc:
        raise CliError(EXIT_USAGE, "no_data", _cannot_open(args.data, exc)) from None
    try:
        started = time.perf_counter()
        with progress_bar("rebuild", store.last_lsn()) as bar:
            try:
                events = store.rebuild(bar)
            except CorruptLog:
                raise
            except StorageError as exc:  # the disk filled up: nothing was changed
                raise CliError(EXIT_FAULT, "storage_error", f"rebuild failed, nothing "
                               f"changed: {exc}") from None
        emit({"ok": True, "rebuilt": events,
              "seconds": round(time.perf_counter() - started, 3)})
    finally:
        store.close()
    return 0


# ---------------------------------------------------------------- trace, inbox, stats


def cmd_trace(args: argparse.Namespace) -> int:
    if (args.conv is None) == (args.cid is None):
        raise CliError(EXIT_USAGE, "usage", "trace needs --conv C --seq N, or --cid ID --from U")
    if args.conv is not None and args.seq is None:
        raise CliError(EXIT_USAGE, "usage", "--conv needs --seq")
    if args.cid is not None and args.sender is None:
        raise CliError(EXIT_USAGE, "usage", "--cid needs --from")
    with readonly_store(args) as store, progress_bar("trace", store.last_lsn()) as bar:
        try:
            if args.cid is not None:
                result = audit.trace_cid(store, args.sender, args.cid, bar)
            else:
                result = audit.trace(store, args.conv, args.seq, bar)
        except KeyError as exc:
            raise CliError(EXIT_REFUSED, "not_found", exc.args[0]) from None
    if args.json:
        emit(result)
        return 0
    # (ids as `log`'s table spells them: a record chained on by hand may name any text)
    out = [f"message {_cell(result['conv'])} #{result['seq']} from {_cell(result['from'])} "
           f"at {result['ts']} (lsn {result['lsn']})"]
    for user, r in result["recipients"].items():
        out.append(f"  {_cell(user)}: delivered {r['delivered'] or '-'}  "
                   f"read {r['read'] or '-'}")
        out.extend(f"      device {_cell(dev)}: {ts}" for dev, ts in r["devices"].items())
    if not result["recipients"]:
        out.append("  (no recipients)")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_inbox(args: argparse.Namespace) -> int:
    with readonly_store(args) as store:
        total = args.at_lsn if args.at_lsn is not None else store.last_lsn()
        with progress_bar("replay", total) as bar:
            result = audit.inbox_at(store, args.user, args.at_lsn, args.at, bar)
    if args.json:
        emit(result)
        return 0
    out = [f"inbox of {_cell(result['user'])} at lsn {result['lsn']} "
           f"({result['ts'] or 'empty log'}): {len(result['inbox'])} entries, "
           f"head {result['inbox_head']}"]
    out.extend(map(_inbox_row, result["inbox"]))
    out.append("unread: " + (", ".join(f"{_cell(c)}={n}" for c, n in result["unread"].items())
                             or "-"))
    out.append("devices: " + (", ".join(f"{_cell(d)}@{n}"
                                        for d, n in result["delivered"].items()) or "-"))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _inbox_row(e: dict[str, Any]) -> str:
    """An inbox entry's row of the `inbox` table: its ids as `_cell` spells them, its body as
    `log`'s table does (`body="..."` or `body_b64="..."`, quoted, each unprintable character
    escaped, whole): any sender chooses a body, and one holding a line break or an escape
    sequence made rows of its own or reached the operator's terminal."""
    body = _summary({k: e[k] for k in ("body", "body_b64") if k in e}, sys.maxsize)
    return (f"  {e['inbox_seq']:>6}  {_cell(e['kind']):<7}  {_cell(e['conv'])}#{e['seq']}  "
            f"lsn {e['lsn']}  from {_cell(e.get('from', '?'))}  {body}").rstrip()


def cmd_stats(args: argparse.Namespace) -> int:
    with readonly_store(args) as store, progress_bar("stats", store.last_lsn()) as bar:
        result = audit.stats(store, args.data, bar)
    if args.json:
        emit(result)
        return 0
    out = [f"events        {result['events']:,} (lsn {result['first_lsn']}..{result['last_lsn']})",
           f"first         {result['first_ts'] or '-'}",
           f"last          {result['last_ts'] or '-'}",
           f"users         {result['users']:,}",
           f"conversations {result['conversations']:,}",
           f"log bytes     {result['log_bytes']:,}",
           f"disk bytes    {result['disk_bytes']:,}"]
    # (a type of no event, which `verify` fails, is counted too: spelt as `log`'s table does)
    out += [f"  {_cell(t):<16} {n:,}" for t, n in result["by_type"].items()]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


# ---------------------------------------------------------------- argument parsing


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing audit` and its subcommands on the `homing` subparsers."""
    p = sub.add_parser("audit", help="audit the event log (read-only, safe while serving)")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, func, json_flag: bool = True,
               data: bool = True) -> argparse.ArgumentParser:
        a = asub.add_parser(name, help=help)
        if data:
            a.add_argument("--data", default=DEFAULT_DATA_DIR,
                           help="data directory (default ./%(default)s)")
        if json_flag:
            a.add_argument("--json", action="store_true", help="JSON lines instead of a table")
        a.set_defaults(func=quietly(func))
        return a

    lg = action("log", "print events, filtered", cmd_log)
    lg.add_argument("--from-lsn", type=_lsn, help="first LSN")
    lg.add_argument("--to-lsn", type=_lsn, help="last LSN")
    lg.add_argument("--since", type=parse_time, help="TIME: ISO-8601 or a duration ago (2h)")
    lg.add_argument("--until", type=parse_time, help="TIME: ISO-8601 or a duration ago")
    lg.add_argument("--user", help="actor, data.user, or a party of a dm: conversation")
    lg.add_argument("--conv", help="data.conv")
    lg.add_argument("--type", action="append",
                    help="event type (repeatable, comma-separated; `message` = message.*)")

    vf = action("verify", "check the digest chain and every projection", cmd_verify,
                json_flag=False)
    vf.add_argument("--anchor", type=_anchor, metavar="LSN:DIGEST",
                    help="a head an earlier verify printed, kept outside the data directory: "
                         "fail unless record LSN still holds DIGEST")

    rb = action("rebuild", "replay the log into fresh projections", cmd_rebuild, json_flag=False)
    rb.add_argument("--check", action="store_true",
                    help="only compare with a fresh replay (read-only); exit 1 on a difference")

    tr = action("trace", "the life of one message", cmd_trace)
    tr.add_argument("--conv")
    tr.add_argument("--seq", type=int)
    tr.add_argument("--cid", help="client message id (with --from)")
    tr.add_argument("--from", dest="sender", help="sender of --cid")

    ib = action("inbox", "a user's inbox and unread counts at a point of the log", cmd_inbox)
    ib.add_argument("--user", required=True)
    at = ib.add_mutually_exclusive_group()
    at.add_argument("--at-lsn", type=_lsn, help="as of this LSN (default: the end)")
    at.add_argument("--at", type=parse_time, help="as of TIME (events with ts <= TIME)")

    action("stats", "events by type, users, conversations, sizes", cmd_stats)

    ex = action("export", "stream every event as JSON lines", cmd_export, json_flag=False)
    ex.add_argument("--format", choices=("jsonl",), default="jsonl")
    ex.add_argument("--from-lsn", type=_lsn, help="first LSN")

    ve = action("verify-export", "check an export file offline: every line, the chain through "
                "them, and anchors", cmd_verify_export, json_flag=False, data=False)
    ve.add_argument("file", metavar="FILE", help="the export's JSON lines (- for stdin)")
    ve.add_argument("--anchor", type=_anchor, metavar="LSN:DIGEST", action="append",
                    help="a head verify or backup printed, kept apart (repeatable): fail unless "
                         "record LSN has DIGEST (LSN first-1: the first line's prev)")
    ve.add_argument("--max-line-bytes", type=_number(int, 1024), metavar="N",
                    help="longest line read, in bytes (default 16 MiB); a longer one is not "
                         "read: exit 2, check again with a larger N")
