"""Errors raised by storage/: one root, storage failures, and domain rule violations.

The broker maps these to wire codes in exactly one function; nothing here knows wire codes.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error raised by storage/."""


class StorageFull(StorageError):
    """Raised by a write when the disk is full (ENOSPC): the batch failed, nothing was written."""


class CorruptLog(StorageError):
    """Raised by log verification or reads when a record is missing, reordered or altered.

    `lsn` is the first LSN at which the log stops being a gapless, correctly chained sequence;
    `reason` says how, without the LSN.
    """

    def __init__(self, lsn: int, message: str) -> None:
        super().__init__(f"log corrupt at lsn {lsn}: {message}")
        self.lsn = lsn
        self.reason = message


class ExportFault(StorageError):
    """Raised by `storage.export.check_lines` at the first line of an `audit export` file that
    is not the line of the record the chain says belongs there: changed, removed, inserted,
    moved, cut short, or never an export line.

    `line` numbers the file's lines from 1; `lsn` is the LSN the line holds, or the one it
    should when it holds none that can be read (None when not even that is known).
    """

    def __init__(self, line: int, lsn: int | None, reason: str) -> None:
        where = f"line {line}" if lsn is None else f"line {line} (lsn {lsn})"
        super().__init__(f"{where}: {reason}")
        self.line = line
        self.lsn = lsn
        self.reason = reason


class ExportLineTooLong(ExportFault):
    """Raised by `storage.export.check_lines` at a line longer than its `max_line_bytes`: not
    a fault found but a line this bound does not read (a broker whose `--max-body-bytes` was
    raised writes lines that long); the check stops there, and a larger bound checks it."""


class CorruptProjection(StorageError):
    """Raised by a read of a projection row whose stored bytes are not a row homing writes (cut
    short, garbage, of the wrong kind: changed behind homing's back; the log is sound).

    `table` and `key` name the row (a write batch's too since 2026-12-05: where the row is
    decoded, `storage.projections.row_u64` and its kin; None for none of homing's raises now).
    `homing audit verify` names it too (the first difference); `homing audit rebuild`, the
    broker stopped, writes it again from the log. A write batch that raises it wrote nothing;
    the broker's committer runs its commands again in halves, so that only those that read
    the row fail (broker/isolate.py, since 2026-12-05); the store remembers the kind of
    command that failed on it alone, and the committer runs later ones apart from the start
    (`Store.set_aside`).
    """

    def __init__(self, table: str | None, key: bytes | None, message: str) -> None:
        where = "" if table is None else f" in {table} at key {key!r}"
        super().__init__(f"projection corrupt{where}: {message}")
        self.table = table
        self.key = key


def undecodable(table: str, key: bytes, exc: BaseException) -> CorruptProjection:
    """The CorruptProjection of row `key` of `table`, whose stored value decoding met `exc`."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return CorruptProjection(table, key, f"undecodable row: {name}: {exc}")


class InternalError(StorageError):
    """Raised by `Store.execute` when its batch failed on an exception that is neither a storage
    failure nor a damaged row (`CorruptProjection`): a bug in homing's rules, projections or
    store. Nothing was written (the batch rolled back); `__cause__` is the exception, with its
    traceback. The broker logs it (`batch_internal_error`), answers the batch's commands
    `internal`, and serves on."""


class CommandInternalError(InternalError):
    """The error of one command whose rule (`rules.decide`) failed on an exception that is
    neither a rule violation (`DomainError`) nor a storage failure: a bug of homing's, or a
    command of a shape the rules were not written for (only homing builds commands, from
    requests whose every field the broker checked), never the request's fault. `decide` writes
    nothing, so only that command fails: `Store.execute` returns this as its `Outcome.error`,
    logs it (`command_internal_error`), and commits the batch's other commands. `__cause__` is
    the exception, with its traceback. The broker answers it `internal` (since 2026-12-05:
    until then such a command was `Invalid`, "malformed ...")."""


class DataDirLocked(StorageError):
    """Raised when opening a data directory for writing while another process holds its lock;
    `holder` is that process's pid, as it wrote it in the lock (None if unknown)."""

    def __init__(self, message: str, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class MissingTables(StorageError):
    """Raised when a data directory opened read-only lacks tables this homing keeps: it was
    written by an older homing (a broker adds them when it starts; `homing audit rebuild`)."""


class DomainError(StorageError):
    """Root of the rule violations `rules.decide` raises; each fails only its own command."""


class Forbidden(DomainError):
    """Raised when the actor may not do this, or the conversation does not exist (never leaked)."""


class Invalid(DomainError):
    """Raised when a command is malformed: bad id, bad cid, ack past the inbox head, ..."""


class Conflict(DomainError):
    """Raised when a command contradicts the current state in a way retrying cannot fix."""


class LimitExceeded(DomainError):
    """Raised when a command would exceed a configured limit (members, body size)."""
