"""The store: one LMDB environment holding the event log and its projections.

`execute` runs a batch of commands in ONE write transaction (decide, append, apply each, then
one durable commit); the reads, inherited from `storage.queries.Queries`, each open their own
short read transaction and may be called from any thread. Rules kept (docs/DESIGN.md, "The store"):

* The log and the projections change in the same transaction, and `meta.applied_lsn` with them,
  so after any crash the projections are exactly the fold of the log.
* A `DomainError` fails only its own command: `decide` writes nothing, and a command's events are
  appended and applied only after it was accepted. So does any other exception out of `decide`
  but a storage failure (a bug of the rule: `CommandInternalError`, logged once the batch
  committed, `command_internal_error`; since 2026-12-05).
* A batch runs against a write-back buffer (`buffered_tables.BufferedTables`) that is flushed,
  sorted, just before the commit: a row touched by every command of the batch is written once.
  The buffer's hot rows (conv seqs, inbox heads, members, marks) stay cached across batches; a
  batch that fails anywhere (a rule bug, `StorageFull`, the commit) rolls its rows out of the
  cache.
* A batch given a row bound (`max_rows`, the committer's `--max-batch-rows`) stops once the
  commands it ran wrote that many rows (inbox entries) and commits those: the broker's
  estimates of a command's rows may be wrong, the bound may not (since 2026-12-06).
* A whole-batch failure (`StorageFull`, any other LMDB error) raises and leaves nothing written.
  A command that fails a batch of its own on a damaged row (`CorruptProjection`) is remembered,
  by what it acts on, until a reopen or a rebuild (`set_aside`, for the committer).
* Projections behind the log (a log that goes past `meta.applied_lsn`: a directory put together
  from two backups; a backend whose log lives elsewhere) are caught up by a writable open: the
  missing events are folded into the stored tables (`fold`, through the same buffer as the
  batches), `CATCH_UP_EVENTS` a transaction, before anything else is written (since
  2026-12-05; until then the next batch applied on top of them).
* A batch's time is not before the log's last record's when the wall clock is behind it by up
  to 10 minutes (storage/clock.py): times rise with LSNs, which the replay's `until_us` relies
  on. A wall clock further behind is taken as it is (the log's times go back there, once).
"""

from __future__ import annotations

import gc
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import lmdb
import msgpack
import structlog

from storage import native
from storage.buffered_tables import BufferedTables
from storage.clock import LogClock
from storage.commands import Command, SendMessage
from storage.errors import (
    CommandInternalError,
    CorruptLog,
    CorruptProjection,
    DomainError,
    InternalError,
    StorageError,
    undecodable,
)
from storage.fold import fold
from storage.lmdb_env import DEFAULT_MAP_SIZE, LmdbEnv
from storage.lmdb_log import LmdbLog
from storage.log import seal
from storage.memory_tables import MemoryTables, sorted_rows
from storage.projections import (
    APPLIED_LSN,
    COMPILED,
    Effects,
    apply,
    mark_applied,
    message_fault,
)
from storage.queries import RECORD_CACHE, Queries, Record, _record
from storage.records import MAX_TS_US, lsn_key, pack_u64, u64
from storage.rowio import Rows
from storage.rules import (
    MAX_CID_BYTES,
    MAX_CID_CHARS,
    MAX_CONV_ID_CHARS,
    Limits,
    decide,
    direct_conv,
)
from storage.tables import APPEND_ONLY, TABLES

log = structlog.get_logger()

# The projection layout (docs/DESIGN.md, "Projections"). A writable open of a directory written
# with another layout rebuilds the projections from the log, which is the truth.
LAYOUT_KEY = b"projections"
LAYOUT = b"7"
DB_NAMES = ["log", "layout", *TABLES]
# Events of the log past `meta.applied_lsn` that a writable open folds into the stored
# projections per write transaction (`Store._catch_up`): a long tail is not one huge one.
CATCH_UP_EVENTS = 8192
# Commands that failed on a damaged projection row in a batch of their own, remembered by what
# they act on (`_subject`) with the row they met, so that the committer runs later ones apart
# from the start (`Store.set_aside`): up to this many, the oldest forgotten first. Kept in
# memory only: a reopen forgets them, and so does a rebuild (the rows written again).
DAMAGED_KEPT = 1024
# `Store.execute`'s row bound when it is given none (an int: compared once a command).
_UNBOUNDED = 1 << 62
# Event bodies that decode from the log as the same type (a subclass of str or bytes would not):
# only events carrying these are remembered from the commit rather than read back.
_PLAIN_BODY = (str, bytes, type(None))


# The compiled common case of a send (storage/_fold.c, `send_message`): decided, sealed and
# applied in one call when it succeeds into a conversation that exists; None otherwise, and
# `decide` runs as ever. Tests set it to None to run the Python rules alone.
SEND_MESSAGE = None
# It reads a SendMessage's fields by position, and `execute` unpacks them so: in this order.
assert SendMessage._fields == ("user", "device", "role", "cid", "body", "conv", "to")
if native.ext is not None:
    native.ext.configure_send(blake2b, MAX_CID_CHARS, MAX_CID_BYTES, MAX_CONV_ID_CHARS)
    SEND_MESSAGE = native.ext.send_message


def _subject(cmd: Command) -> tuple[str, str] | None:
    """What `cmd` acts on, for `Store.set_aside`: its kind with its conversation (a send `to` a
    user: their direct one), or with its user for an ack or a create (a revocation: its
    target). None when that is not text (no batch of it met a row)."""
    kind = type(cmd)
    if kind is SendMessage:
        on = cmd.conv
        if on is None and isinstance(cmd.to, str) and isinstance(cmd.user, str):
            on = direct_conv(cmd.user, cmd.to)
    else:
        on = getattr(cmd, "conv", None) or getattr(cmd, "target", None) or cmd.user
    return (kind.__name__, on) if isinstance(on, str) else None


def _send_fault(tables: BufferedTables, cmd: SendMessage,
                exc: Exception) -> CorruptProjection | None:
    """The damaged row the compiled send of `cmd` met when it raised `exc` (None: none did)."""
    conv = cmd.conv if cmd.conv is not None else direct_conv(cmd.user, cmd.to)
    return message_fault(tables, conv.encode(), exc, cmd.user.encode())


def _log_rule_bug(cmd: Command, failed: CommandInternalError) -> None:
    """Log the command a bug of its rule failed, with its context and the traceback. Any
    object that is not a command (a plain tuple: the rules fail on it, as on a bug) is logged
    too, its fields None: this runs once the batch committed, and raising here would report a
    durable batch as failed (until 2026-12-06, AttributeError from `execute`)."""
    log.error("command_internal_error", command=type(cmd).__name__,
              user=getattr(cmd, "user", None), device=getattr(cmd, "device", None),
              conv=getattr(cmd, "conv", None), cid=getattr(cmd, "cid", None),
              error=str(failed), exc_info=failed.__cause__)


# A new message's receipts and membership changes: none, in one shared empty tuple where two
# empty lists were made in the commit thread and freed in the event loop a send. Only the
# readers of a batch's outcomes see it (they iterate); `apply` appends to Effects it made.
NO_CHANGES: tuple[()] = ()


class _InjectedAbort(Exception):
    """Raised by the test-only `_abort_after` hook to abort a batch mid-way."""


@dataclass(slots=True)
class Outcome:
    """The result of one command of a batch: a reply, or the error that failed it alone (a
    DomainError, or CommandInternalError: a bug of its rule)."""

    reply: dict[str, Any] | None
    error: DomainError | CommandInternalError | None
    effects: Effects = field(default_factory=Effects)
    lsn: int = 0  # LSN of the command's last event, 0 when it appended none

    @property
    def rows(self) -> int:
        """The rows the command wrote as `execute`'s `max_rows` counts them: the inbox entries
        it wrote (the inboxes it moved), one at least (a command refused counts one too)."""
        return len(self.effects.inbox_heads) or 1


class Store(Queries):
    """Event log plus projections in one LMDB environment; the broker's only storage object.

    This class opens, writes, rebuilds and closes; the reads (`history`, `deliverable`, the
    audits' snapshots, ...) are inherited from `Queries` (storage/queries.py), whose
    constructor takes the environment and the log they read.
    """

    def __init__(self, env: LmdbEnv, limits: Limits,
                 on_rebuild: Callable[[int, int], None] | None = None,
                 on_catch_up: Callable[[int, int], None] | None = None,
                 catch_up: bool = True, record_cache: int = RECORD_CACHE,
                 table_cache_rows: int | None = None) -> None:
        super().__init__(env, LmdbLog(env), record_cache)
        self.limits = limits
        self._abort_after: int | None = None  # test-only: abort a batch after k commands
        # `_subject`s of the commands that met a damaged row alone: (table, key) of the row.
        self._damaged: OrderedDict[tuple[str, str], tuple[str | None, bytes | None]] = (
            OrderedDict())
        # The live tables of execute: hot rows stay cached across batches
        # (buffered_tables.PERSISTENT).
        # How the batches' rows go in (storage/rowio.py): checked on the first write.
        self._rows = Rows(env.env)
        self._db_list = list(self._dbs.values())
        # (None read-only: a directory of an older layout may lack some of the tables.)
        self._tables = (None if env.readonly else
                        BufferedTables(self._dbs, self._rows, table_cache_rows))
        # The batches' times do not go back along the log across a wall clock set back by up
        # to 10 minutes (storage/clock.py).
        self._clock = LogClock(0 if env.readonly else self._last_logged_us())
        if not env.readonly:
            self._check_applied()
            self._check_layout(on_rebuild)
            if catch_up:
                self._catch_up(on_catch_up)

    def _last_logged_us(self) -> int:
        """The time of the log's last record; 0 for an empty log, or a last record whose time
        cannot be read (`audit verify` names it; the broker serves on regardless)."""
        lsn = self._log.last_lsn()
        if not lsn:
            return 0
        with self._env.read() as txn:
            try:
                ts = self._log.get(txn, lsn).ts_us
            except (ValueError, TypeError, msgpack.UnpackException):
                return 0
        return ts if type(ts) is int and 0 <= ts <= MAX_TS_US else 0

    def _positions(self) -> tuple[int | None, int]:
        """`meta.applied_lsn` (None: none is stored) and the log's last LSN, read in one
        transaction (CorruptProjection when the applied LSN does not decode)."""
        with self._env.read() as txn:
            raw = txn.get(APPLIED_LSN, db=self._dbs["meta"])
            last = self._log.last_lsn_in(txn)
        if raw is None:
            return None, last
        try:
            return u64(raw), last
        except struct.error as exc:
            raise undecodable("meta", APPLIED_LSN, exc) from None

    def projections_behind(self) -> int:
        """The events of the log past `meta.applied_lsn`, which the stored projections lack
        (all of them when no applied LSN is stored: nothing was applied to the tables). A
        writable store is never behind: its open caught them up. A read-only one
        serves the projections as they are stored (it writes nothing); this says how far
        behind they are, and `audit verify` reports the difference at `meta.applied_lsn`."""
        applied, last = self._positions()
        return max(0, last - (applied or 0))

    def _check_applied(self) -> None:
        """Refuse to write past a log that ends before `meta.applied_lsn` (CorruptLog after its
        last record): its last records were removed behind homing's back, and the next batch
        would append over them, reusing LSNs that inbox entries and `msg` rows name. Read-only
        opens take it as it is, so that `audit verify` can report it. (A log past
        `applied_lsn`, the mirror case, is caught up: `_catch_up`.)"""
        applied, last = self._positions()
        if applied is not None and applied > last:
            raise CorruptLog(last + 1, f"the log ends at lsn {last}, yet its projections were "
                             f"applied up to lsn {applied}: its last records were removed "
                             "behind homing's back, and appending would reuse their lsns; "
                             "restore the data directory from a backup")

    def _catch_up(self, progress: Callable[[int, int], None] | None) -> None:
        """Fold the events of the log past `meta.applied_lsn` into the stored projections, so
        that they are the fold of the whole log (byte-equal to a rebuild) before a batch
        applies on top of them: `CATCH_UP_EVENTS` a write transaction, each committed with the
        applied LSN it reached, so that a catch-up cut short (a kill, a damaged record: its
        CorruptLog) goes on from there at the next open. `progress(events applied, events to
        apply)` after each transaction. No applied LSN stored: nothing was applied (each
        batch and rebuild that folds an event stores one), so the whole log is folded."""
        applied, last = self._positions()
        applied = applied or 0
        if applied >= last:
            return
        started = time.perf_counter()
        log.warning("projections_behind_log", applied_lsn=applied, log_lsn=last,
                    events=last - applied)
        lsn = applied
        while lsn < last:
            lsn = self._fold_logged(lsn, min(lsn + CATCH_UP_EVENTS, last))
            if progress is not None:
                progress(lsn - applied, last - applied)
        log.info("projections_caught_up", from_lsn=applied + 1, to_lsn=last,
                 events=last - applied, seconds=round(time.perf_counter() - started, 3))

    def _fold_logged(self, after: int, upto: int) -> int:
        """Fold the log's records `after` + 1 to `upto` into the stored projections in one
        write transaction, through the batches' buffer; return `upto` (CorruptLog at a record
        missing, or one the replay cannot apply; CorruptProjection naming a damaged stored row
        the records read, since 2026-12-05: nothing of this transaction is written). The
        records are read in that transaction, 1,024 at a time (`LmdbLog.read_raw_in`): those
        of a transaction, up to CATCH_UP_EVENTS x `--max-body-bytes`, are never all in memory."""
        tables = self._tables

        def work(txn: lmdb.Transaction) -> int:
            self._rows.check(txn, self._db_list)
            tables.begin(txn)
            records = self._log.read_raw_in(txn, after + 1, upto)  # gapless, or CorruptLog
            lsn, _ts, _count = fold(tables, records, to_lsn=upto, after=after, stored=True)
            if lsn != upto:  # a record missing at the end, or one naming another lsn
                raise CorruptLog(lsn + 1, f"no event of lsn {lsn + 1} where the log has it")
            tables.flush()
            self._env.after_commit(tables.committed)
            return lsn

        try:
            return self._env.write(work)
        except BaseException:
            with self._env.exclusive():  # as in execute: drop the rows of the failed fold
                tables.rollback()
            raise

    def stored_layout(self) -> bytes | None:
        """The projection layout the stored tables were written in (`LAYOUT` when current;
        None for a directory written before layouts were recorded, or an empty one)."""
        with self._env.read() as txn:
            return txn.get(LAYOUT_KEY, db=self._dbs["layout"])

    def _check_layout(self, on_rebuild: Callable[[int, int], None] | None) -> None:
        have = self.stored_layout()
        if have == LAYOUT:
            return
        if self._log.last_lsn():
            # As text ("5"): bytes came out of the JSON log as Python's repr, "b'5'".
            stored = None if have is None else have.decode("ascii", "replace")
            log.info("projections_layout_changed", stored=stored, layout=LAYOUT.decode())
            self.rebuild(on_rebuild)
        else:
            self._env.write(lambda txn: txn.put(LAYOUT_KEY, LAYOUT, db=self._dbs["layout"]))

    @classmethod
    def open(cls, path: str, *, map_size: int = DEFAULT_MAP_SIZE, limits: Limits | None = None,
             readonly: bool = False,
             on_rebuild: Callable[[int, int], None] | None = None,
             on_catch_up: Callable[[int, int], None] | None = None,
             catch_up: bool = True, record_cache: int = RECORD_CACHE,
             table_cache_rows: int | None = None) -> Store:
        """Open the data directory at `path` (created unless `readonly`).

        Writers take the directory lock (`DataDirLocked` if another process holds it); read-only
        opens work next to a running broker, for audits. A writable open of a directory of
        another projection layout rebuilds the projections first, calling `on_rebuild(events
        replayed, events in the log)` every few thousand events. A writable open of projections
        behind the log catches them up first (`_catch_up`), calling `on_catch_up(events
        applied, events to apply)` after each of its transactions; a read-only open serves them
        as they are (`projections_behind` says how far behind). `catch_up=False` leaves them
        behind, for a caller that `rebuild`s them next (`homing audit rebuild`: the remedy for a
        damaged row, which a catch-up that reads it stops at). `record_cache`: the log records
        kept in memory for the deliveries that follow their commit (`Queries`).
        `table_cache_rows`: the rows each table's view keeps between commits (None:
        `buffered_tables.CACHE_ROWS`; `homing serve --table-cache-rows`).
        """
        # Read-only, the tables are optional: the log of a directory of an older layout (one
        # lacking tables added since) is read all the same; a projection read that needs a
        # table it lacks raises MissingTables.
        env = LmdbEnv(path, DB_NAMES, map_size=map_size, readonly=readonly,
                      optional=TABLES if readonly else ())
        try:
            return cls(env, limits or Limits(), on_rebuild, on_catch_up, catch_up, record_cache,
                       table_cache_rows)
        except BaseException:
            env.close()
            raise

    @property
    def log(self) -> LmdbLog:
        """The event log (an `EventLog`)."""
        return self._log

    def close(self) -> None:
        """Close the environment and release the directory lock."""
        self._env.close()

    def backup(self, dest: str, *, made: bool = False) -> tuple[int, bytes]:
        """Copy the log and projections, as one committed transaction left them, into the empty
        directory `dest` (synced; safe while a broker writes; `made`: into the empty `data.mdb`
        the caller made there); return the copy's last LSN and that record's digest."""
        return self._log.backup(dest, made=made)

    # ---------------------------------------------------------------- writes

    def execute(self, commands: Sequence[Command], now_us: int | None = None,
                max_rows: int | None = None) -> list[Outcome]:
        """Run `commands` in one write transaction with one durable commit; one Outcome each,
        in order, for those it ran: all of them, unless `max_rows` stopped it.

        The batch's time is the wall clock (`now_us` stands in for it: tests), or the time of
        the log's last record while the wall clock is behind it (`storage.clock`).

        `max_rows` bounds the rows the batch writes, as they are written (the committer's
        `--max-batch-rows`): once the commands run have written that many, the batch stops
        there and commits them; the commands after them are not run (no Outcome: the caller
        runs them in a later batch). A command counts the inbox entries it wrote (the inboxes
        it moved), one at least, as broker/weight.py estimates them; so a batch writes at most
        `max_rows` - 1 plus its last command's rows, and runs one command at least; a
        `max_rows` below 1 raises ValueError.

        Raises `StorageFull` (or another `StorageError`: `CorruptProjection` naming a row it
        read that does not decode, `InternalError` chained to any other exception, a bug) when
        the whole batch failed; then nothing was written. A command whose rule fails on a bug
        fails alone: its Outcome's error is `CommandInternalError`, chained to the exception.
        """
        tables, rows, dbs, clock = self._tables, self._rows, self._db_list, self._clock
        bound = _UNBOUNDED if max_rows is None else max_rows
        if bound < 1:  # (a batch that ran nothing would be put back and taken again, forever)
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        if tables is None:  # opened read-only: no buffered tables (the failure path needs them)
            raise StorageError(f"{self._env.path} is open read-only: it runs no batch")

        def work(txn: lmdb.Transaction):
            # Runs under the environment's write lock: the tail cannot move underneath. The
            # time is taken here too, so that batches of several threads get their times in
            # the order of their LSNs (the replay's `until_us` relies on it), not in the order
            # they asked for the lock. Not before the last record's: a clock set back by up
            # to 10 minutes does not set the log's times back (storage/clock.py).
            wall = time.time_ns() // 1000 if now_us is None else now_us
            now = clock.stamp(wall)
            bugs.clear()  # (work runs again after the map grew)
            rows.check(txn, dbs)
            tables.begin(txn)
            tail = self._log.tail()
            outcomes = []
            records: list[tuple[bytes, bytes]] = []
            fresh: dict[int, Record] = {}  # for `deliverable`, once committed
            send_message, max_body = SEND_MESSAGE, self.limits.max_body_bytes
            written = 0  # the rows the commands run wrote, as `max_rows` counts them
            for i, cmd in enumerate(commands):
                if written >= bound:
                    break  # the rest go to a later batch (the committer puts them back)
                if i == self._abort_after:
                    raise _InjectedAbort(i)
                if send_message is not None and type(cmd) is SendMessage:
                    heads: dict[str, int] = {}
                    try:
                        done = send_message(tables, cmd, now, max_body, tail[0] + 1, tail[1],
                                            heads)
                    except (struct.error, ValueError) as exc:  # free until raised
                        raise _send_fault(tables, cmd, exc) or exc from None
                    if done is not None:
                        written += len(heads) or 1
                        conv, value, seq = done
                        user, device, _, cid, body, _, _ = cmd
                        lsn = tail[0] + 1
                        tail = (lsn, value[:32])
                        records.append((pack_u64(lsn), value))  # (lsn_key, without its call)
                        fresh[lsn] = (user, device, body, cid, now)  # as _record of its event
                        fx = Effects(heads, NO_CHANGES, NO_CHANGES, conv, seq, lsn,
                                     (lsn, conv, seq, user, device, body, cid, now))
                        outcomes.append(Outcome({"conv": conv, "seq": seq, "lsn": lsn,
                                                 "cid": cid, "dup": False}, None, fx, lsn))
                        continue
                written += 1  # (a command refused, or one that appends nothing: one row)
                try:
                    events, reply = decide(tables, cmd, now, self.limits)
                except DomainError as exc:
                    # Without its traceback: that holds this frame, whose `outcomes` hold the
                    # error, a cycle only the cyclic GC frees (13,345 objects for a batch of
                    # 1,024 refusals), keeping the batch's frame alive until then. Nor the
                    # exception the rule turned into it (`raise Invalid(...) from None` keeps
                    # it as the context, which nothing shows), whose traceback holds the
                    # rule's frame and through it this one (13,344 objects for 1,024 bodies
                    # with a lone surrogate).
                    exc.__context__ = None
                    outcomes.append(Outcome(None, exc.with_traceback(None)))
                    continue
                except (StorageError, lmdb.Error):
                    raise  # the data or the disk, not this rule: the whole batch fails
                except Exception as exc:  # a bug of the rule: decide wrote nothing
                    failed = CommandInternalError(f"{type(exc).__name__}: {exc}")
                    failed.__cause__ = exc
                    bugs.append((cmd, failed))
                    outcomes.append(Outcome(None, failed))
                    continue
                if not events:
                    outcomes.append(Outcome(reply, None))
                    continue
                sealed, digest = seal(events, tail[0] + 1, tail[1])
                tail = (sealed[-1][0], digest)
                fx = Effects()
                for lsn, value, ev in sealed:
                    records.append((lsn_key(lsn), value))
                    apply(tables, ev, fx)
                    if type(ev.data.get("body")) in _PLAIN_BODY:
                        fresh[lsn] = _record(ev)
                if len(fx.inbox_heads) > 1:
                    written += len(fx.inbox_heads) - 1
                if type(cmd) is SendMessage and not reply["dup"]:  # a new message
                    reply["seq"] = fx.seq
                    reply["lsn"] = fx.lsn
                outcomes.append(Outcome(reply, None, fx, fx.lsn))
            mark_applied(tables, tail[0] if records else 0)
            tables.flush()
            if records:
                rows.append_rows(txn, self._dbs["log"], records)
            self._env.after_commit(lambda: committed.append(True))
            self._env.after_commit(tables.committed)
            self._env.after_commit(lambda: self._log.set_tail(tail))
            self._env.after_commit(lambda: self._remember(fresh))
            if records:
                self._env.after_commit(lambda: clock.logged(now, wall))
            return outcomes

        committed: list[bool] = []  # [True] first thing after the commit, by its hooks
        bugs: list[tuple[Command, CommandInternalError]] = []  # commands a rule bug failed
        try:
            outcomes = self._env.write(work)
        except BaseException as exc:
            # Whatever failed (a rule bug, StorageFull, the commit itself), nothing was stored:
            # the cached rows this batch changed must go too. Under the write lock: `write`
            # let go of it, and another thread's batch, under way in the same buffer, would
            # lose its rows and its transaction.
            with self._env.exclusive():
                tables.rollback()
            if isinstance(exc, CorruptProjection) and len(commands) == 1:
                self._met_damage(commands[0], exc)
            if isinstance(exc, StorageError | _InjectedAbort) or not isinstance(exc, Exception):
                raise  # CorruptProjection among them: where a row is decoded, it is named
            if isinstance(exc, lmdb.Error):
                raise StorageError(f"write failed: {exc}") from exc
            if committed:  # a hook after the commit: the batch is durable, the
                raise  # store's state uncertain: not served on (it stops the committer)
            # Anything else is a bug, not the data (until 2026-12-05 the errors a decode
            # raises, wherever they came from, were said to be a corrupt row): a typed failure
            # of this batch, which the broker logs with the traceback, answers `internal`,
            # and serves on after.
            raise InternalError(f"a write batch failed on a bug: {type(exc).__name__}: {exc}"
                                ) from exc
        for cmd, failed in bugs:  # once the batch committed: a failed batch's are tried again
            _log_rule_bug(cmd, failed)
        if self._damaged and len(outcomes) == 1 and outcomes[0].error is None:
            self._damaged.pop(_subject(commands[0]), None)  # it commits: no longer met
        return outcomes

    def _met_damage(self, cmd: Command, exc: CorruptProjection) -> None:
        """Remember that `cmd`, alone in its batch, failed on the damaged row `exc` names."""
        subject = _subject(cmd)
        if subject is None:
            return
        damaged = self._damaged
        damaged.pop(subject, None)
        damaged[subject] = (exc.table, exc.key)
        if len(damaged) > DAMAGED_KEPT:
            damaged.popitem(last=False)

    def set_aside(self, commands: Sequence[Command]) -> list[int]:
        """The indices of `commands` of a kind that failed on a damaged projection row in a
        batch of its own since the store was opened or rebuilt (the same kind of command on the
        same conversation: a send into one of whose members' inbox head is damaged, say; or
        of the same user, for acks and creates), which the committer runs alone, and the
        others around them, instead of trying the whole batch and splitting it (since
        2026-12-05). Kept in memory, at most DAMAGED_KEPT, the oldest forgotten first; one
        that commits alone is forgotten. May be called from any thread."""
        damaged = self._damaged
        if not damaged:
            return []
        return [i for i, cmd in enumerate(commands) if _subject(cmd) in damaged]

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Drop every projection and replay the whole log, atomically in one write txn.

        Returns the number of events replayed. `progress(replayed, total)` is called every
        `fold.CHUNK` events of the replay, and once more when it is done, before the rows are
        written (which takes about as long again).
        """
        started = time.perf_counter()

        def work(txn: lmdb.Transaction) -> int:
            mem = MemoryTables(listed=APPEND_ONLY if COMPILED else frozenset())
            total = self._log.check_keys(txn)
            on_chunk = None if progress is None else (lambda done: progress(done, total))
            _lsn, _ts, count = fold(mem, txn.cursor(db=self._dbs["log"]), on_chunk=on_chunk)
            if progress is not None:
                progress(count, total)
            self._rows.check(txn, self._db_list)
            for table in TABLES:
                db = self._dbs[table]
                txn.drop(db, delete=False)
                rows = sorted_rows(mem.data[table])
                try:
                    self._rows.append_rows(txn, db, rows)
                except lmdb.KeyExistsError:
                    # A key written twice (sorted_rows keeps both, the later last): the later
                    # write wins, as in a dict. Never seen from `apply`; kept exact regardless.
                    txn.drop(db, delete=False)
                    txn.cursor(db=db).putmulti(sorted(dict(rows).items()), append=True)
            txn.put(LAYOUT_KEY, LAYOUT, db=self._dbs["layout"])
            return count

        # The fold allocates millions of short-lived acyclic objects; the cyclic collector
        # would only rescan them (about 15% of the time), so it is paused for the rebuild.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            count = self._env.write(work)
        finally:
            with self._env.exclusive():  # as in execute: no batch is under way in the buffer
                self._tables.reset()
            if gc_was_enabled:
                gc.enable()
        self._damaged.clear()  # every row written again from the log
        log.info("projections_rebuilt", events=count,
                 seconds=round(time.perf_counter() - started, 3))
        return count

