"""A write transaction's rows put without giving the GIL up at each row, where that is known to
be safe: storage/_rowio.c, optional.

py-lmdb releases the GIL around every row `Cursor.putmulti` writes; in `homing serve` the trio
thread then takes it (or is woken for it) thousands of times a batch. `storage._rowio` makes the
same LMDB calls on the transaction's own handle, the GIL released once around a table's puts
when there are 32 or more of them (the trio thread runs meanwhile) and kept for fewer; a get
releases it around the lookup alone, as py-lmdb does, since a read may have to fault a page in
from disk. It reads py-lmdb's objects by the layout of one py-lmdb release (`LAYOUT_OF`), which is
not a public interface, so it is used only:

* with that py-lmdb release, its CPython binding (not the cffi one), and a build of the current
  storage/_rowio.c (`VERSION`), not under `HOMING_PURE_PYTHON=1`;
* for an environment whose first write transaction and databases passed `_rowio.check` (the
  objects' own fields, the engine's version, the transaction's id, each database's flags).

Anywhere else `Rows` goes through py-lmdb's public API, as before; both write the same rows
(tests/storage/test_rowio.py).
"""

from __future__ import annotations

import errno
import os
from types import ModuleType
from typing import Any

import lmdb
import structlog

from storage import native
from storage.memory_tables import RowsInOrder, for_put

VERSION = 5  # the storage/_rowio.c this code was written for (its ROWIO_VERSION)
LAYOUT_OF = "3.0.0"  # the py-lmdb release whose object layout storage/_rowio.c reads

# py-lmdb 3.0.0's error table (lmdb/cpython.c, `error_map`): LMDB's codes and the errno values
# it names, each with the class py-lmdb raises for it; any other code raises `lmdb.Error`.
_ERRORS: dict[int, type[lmdb.Error]] = {
    -30799: lmdb.KeyExistsError, -30798: lmdb.NotFoundError, -30797: lmdb.PageNotFoundError,
    -30796: lmdb.CorruptedError, -30795: lmdb.PanicError, -30794: lmdb.VersionMismatchError,
    -30793: lmdb.InvalidError, -30792: lmdb.MapFullError, -30791: lmdb.DbsFullError,
    -30790: lmdb.ReadersFullError, -30789: lmdb.TlsFullError, -30788: lmdb.TxnFullError,
    -30787: lmdb.CursorFullError, -30786: lmdb.PageFullError, -30785: lmdb.MapResizedError,
    -30784: lmdb.IncompatibleError, -30783: lmdb.BadRslotError, -30782: lmdb.BadTxnError,
    -30781: lmdb.BadValsizeError, -30780: lmdb.BadDbiError,
    errno.EACCES: lmdb.ReadonlyError, errno.EINVAL: lmdb.InvalidParameterError,
    errno.EAGAIN: lmdb.LockError, errno.ENOMEM: lmdb.MemoryError, errno.ENOSPC: lmdb.DiskError,
}


def _raise(what: str, rc: int) -> None:
    """Raise py-lmdb's exception for LMDB error `rc` of `what` (called by storage/_rowio.c)."""
    reason = os.strerror(rc) if rc > 0 else f"LMDB error {rc}"
    exc = _ERRORS.get(rc, lmdb.Error)(f"{what}: {reason}")
    exc.what, exc.code, exc.reason = what, rc, reason
    raise exc


def _load() -> ModuleType | None:
    _rowio = native.load("_rowio", VERSION)
    binding = getattr(lmdb, "cpython", None)
    if _rowio is None or lmdb.__version__ != LAYOUT_OF or \
            getattr(binding, "Transaction", None) is not lmdb.Transaction:
        return None  # not built, turned off, another py-lmdb or its cffi binding
    _rowio.configure(_raise, lmdb.Transaction, binding._Database)
    return _rowio


ext: ModuleType | None = _load()
log = structlog.get_logger()


class Rows:
    """Puts and gets on one environment's write transactions; compiled once `check` passed."""

    __slots__ = ("_checked", "_env", "compiled")

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._checked = False
        self.compiled = False

    def check(self, txn: lmdb.Transaction, dbs: list[Any]) -> bool:
        """On the environment's first write transaction `txn`: whether the compiled functions
        may be used for it and `dbs` from now on (`self.compiled`)."""
        if not self._checked:
            self._checked = True
            version, txn_id = lmdb.version(), txn.id()
            self.compiled = ext is not None and all(
                ext.check(self._env, txn, db, txn_id, version) for db in dbs)
            if ext is not None and not self.compiled:
                # Built for this py-lmdb, yet its objects do not look as expected: say so, since
                # `storage_rows=compiled` was logged at start.
                log.warning("storage_rows_unchecked", path=self._env.path(),
                            lmdb=lmdb.__version__, engine=".".join(map(str, version)))
        return self.compiled

    def put_rows(self, txn: lmdb.Transaction, db: Any, changes: dict[bytes, bytes | None]
                 ) -> None:
        """Write `changes` into `txn`, each key once in key order: None deletes the row."""
        keys = sorted(changes)
        if self.compiled:
            ext.put_rows(txn, db, keys, changes)
            return
        puts = []
        for key in keys:
            value = changes[key]
            if value is None:
                txn.delete(key, db=db)
            else:
                puts.append((key, value))
        if puts:
            txn.cursor(db=db).putmulti(puts)

    def append_rows(self, txn: lmdb.Transaction, db: Any, rows: RowsInOrder) -> None:
        """Append `rows` (keys ascending, above every stored key) to `db`: a list of
        `(key, value)`, or a rebuild's `_fold.SortedRows`, whose packed records the compiled
        path writes without making an object a row. A key not above the last one raises
        KeyExistsError, the rows before it written."""
        if self.compiled:
            if type(rows) is list:  # a batch's log records (every commit), a small table
                ext.append_rows(txn, db, rows)
            else:
                ext.append_packed(txn, db, *rows.packed())
        elif len(rows) and txn.cursor(db=db).putmulti(for_put(rows), append=True)[1] != len(rows):
            # py-lmdb skips a row whose key is not above the last one without a word (it
            # counts it out of `added`): raise as LMDB (and the compiled path) does.
            _raise("mdb_put", -30799)

    def get(self, txn: lmdb.Transaction, db: Any, key: bytes) -> bytes | None:
        """The row at `key` in `db` as `txn` sees it, or None."""
        if self.compiled:
            return ext.get(txn, db, key)
        return txn.get(key, db=db)


def describe() -> str:
    """`compiled` or `python`: how a batch's rows are written (for status output)."""
    return "compiled" if ext is not None else "python"
