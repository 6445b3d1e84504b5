"""Opening the LMDB environment, guarding read transactions, and growing the map.

Rules kept here:

* One writer process per data directory: writers hold an exclusive `fcntl` lock on
  `<dir>/homing.lock` (`DataDirLocked` otherwise). Read-only opens take no such lock and work
  while the broker runs (LMDB's own lock file coordinates readers and the writer).
* `data.mdb` only ever names an LMDB file: a new environment is made beside it (NEW_ENV_DIR)
  and moved into place whole, so a start killed as LMDB makes it leaves no empty file.
* No `writemap`: a full disk then shows up as ENOSPC from `write()` at commit (`StorageFull`)
  instead of SIGBUS on a mapped page. `sync` and `metasync` are on: a commit is durable.
* The map grows by itself: a write that hits `MapFullError` is aborted, the map doubled, and the
  work retried, so no `MapFullError` reaches a caller (nor from creating a new directory's
  tables: a map of any size opens, 1 byte up; 0 is the size last recorded, or 1 MiB for a new
  directory). `set_mapsize` needs every transaction of this process closed, so read
  transactions are counted (a read is counted from its transaction's begin to its end, never
  across a failure) and the grower waits for zero; the abort before it waits so too (py-lmdb
  waits for a moment without any LMDB call under way).
  Readers in other processes that see `MapResizedError` adopt the new size and retry, their
  open included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

import lmdb
import structlog

from storage.errors import DataDirLocked, MissingTables, StorageError, StorageFull
from storage.files import sync_dir

T = TypeVar("T")

DEFAULT_MAP_SIZE = 1 << 30
MAX_READERS = 1024
MAX_DBS = 32
LOCK_FILE = "homing.lock"
LOCK_LINE = 16  # bytes of its one line: the holder's pid, padded, or STOPPED
STOPPED = b"stopped".ljust(LOCK_LINE - 1) + b"\n"  # after a clean close


def _lock_line(pid: int) -> bytes:
    return f"{pid:<{LOCK_LINE - 1}}\n".encode()
# Where a writable open makes a new environment before its `data.mdb` is moved into place
# (`LmdbEnv._make_new`); one left by a process killed making it is removed at the next open.
NEW_ENV_DIR = ".new-env"
READER_CHECK_S = 5.0  # how often a writer frees the slots of dead readers
OPEN_ATTEMPTS = 8  # read-only opens that the writer's growth cut short, at most (`LmdbEnv`)

log = structlog.get_logger()


# LMDB reports a short write as EIO rather than ENOSPC (mdb_page_flush); an EIO while the
# filesystem has less than this free is taken to be a full disk.
LOW_SPACE_BYTES = 64 << 20


def _is_disk_full(exc: BaseException, path: str) -> bool:
    if isinstance(exc, lmdb.DiskError):
        return True
    code = getattr(exc, "code", None) if isinstance(exc, lmdb.Error) else getattr(
        exc, "errno", None)
    if not isinstance(exc, lmdb.Error | OSError):
        return False
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    if code == errno.EIO:
        try:
            st = os.statvfs(path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES
    return False


# An LMDB file begins with two meta pages (of the OS page size where it was made); the first
# holds, after its 16-byte page header, LMDB's magic number.
META_PAGES_BYTES = 2 * os.sysconf("SC_PAGE_SIZE")
LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")


def _cut_short(path: str) -> str | None:
    """Why an open failed, when `data.mdb` is empty or cut inside its meta pages (a backup
    killed as it made the file, a copy cut short): LMDB only says `Bad file descriptor` (an
    empty file opened read-only) or `File is not an LMDB file`. None for any other file."""
    file = os.path.join(path, "data.mdb")
    try:
        with open(file, "rb") as f:
            head, size = f.read(20), os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if size == 0:
        return (f"{file} is empty (0 bytes): no data was ever written into it (a backup "
                "killed before its copy began); restore the directory from a whole backup")
    if size < META_PAGES_BYTES and (len(head) < 20 or head[16:20] == LMDB_MAGIC):
        return (f"{file} is truncated: {size} bytes, shorter than the two meta pages "
                f"({META_PAGES_BYTES} bytes) an LMDB file begins with; restore it from a backup")
    return None


def _refused_file(path: str, readonly: bool) -> str | None:
    """Which LMDB file of `path` this process may not open as it must, when an open failed:
    LMDB names only the directory (`DIR: Permission denied`). data.mdb is written unless
    `readonly`; lock.mdb always (the reader table). None if both are as they must be."""
    for name, write in (("data.mdb", not readonly), ("lock.mdb", True)):
        file = os.path.join(path, name)
        if os.path.exists(file) and not os.access(file, os.R_OK | (os.W_OK if write else 0)):
            return (f"{file}: Permission denied (uid {os.getuid()} may not "
                    f"{'write' if write else 'read'} it)")
    return None


def _is_empty_file(file: str) -> bool:
    try:
        return os.stat(file).st_size == 0
    except FileNotFoundError:
        return False


class Databases(dict):
    """The opened databases by name. A name left out because a read-only open did not find it
    (`LmdbEnv`'s `optional`) raises `MissingTables` when it is asked for."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.missing: list[str] = []

    def __missing__(self, name: str) -> object:
        if name in self.missing:
            raise _missing_table(self.path, name)
        raise KeyError(name)


def _missing_table(path: str, name: str) -> MissingTables:
    """The error of a read-only open (or a read) that wants table `name`, absent in `path`."""
    return MissingTables(f"{path} has no {name!r} table: it was written by an older homing")


class LmdbEnv:
    """One opened LMDB environment with its named databases, write growth and read guard.

    A read-only open refuses a directory without one of `db_names` (`MissingTables`), but for
    those in `optional`: they are left out of `dbs`, and asking `dbs` for one raises
    `MissingTables` then (the log of a directory of an older layout reads without them)."""

    def __init__(self, path: str, db_names: list[str], *, map_size: int = DEFAULT_MAP_SIZE,
                 readonly: bool = False, optional: Collection[str] = ()) -> None:
        if map_size < 0:
            raise ValueError(f"map size must be 0 (the size the directory last had; 1 MiB for a "
                             f"new one) or more, not {map_size}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self._lock_fd: int | None = None
        self.left_by: int | None = None  # the pid a writer that did not close it left
        self._found = STOPPED  # the lock file's line as this open found it
        self._guard = threading.Condition()
        self._readers = 0
        self._growing = False
        self._write_lock = threading.Lock()
        self._on_commit: list[Callable[[], None]] = []
        if not readonly:
            os.makedirs(self.path, mode=0o700, exist_ok=True)  # messages: for its owner only
            self._take_dir_lock()
            try:
                self._make_new(map_size)
            except lmdb.Error as exc:  # a full disk, as an open making its tables would meet
                self._release_dir_lock()
                raise StorageError(f"cannot open {self.path}: {exc}") from exc
            except BaseException:
                self._release_dir_lock()
                raise
            if _is_empty_file(os.path.join(self.path, "data.mdb")):
                # LMDB would make a new environment of it: a backup killed before its copy
                # began (its secret beside it) would be served, empty, to every old token.
                self._release_dir_lock()
                raise StorageError(_cut_short(self.path) or f"{self.path}/data.mdb is empty")
        try:
            for attempt in range(OPEN_ATTEMPTS):
                try:
                    self._open(map_size, db_names, optional)
                    break
                except lmdb.MapResizedError:
                    # Read-only (a writer maps all it writes): LMDB maps at least the data in
                    # use, and exactly that when the size asked for is smaller (a `homing
                    # audit` next to a broker whose data outgrew DEFAULT_MAP_SIZE); a commit
                    # past it before py-lmdb's own first read transactions (opening the
                    # tables) fails them, and `_begin_read` cannot step in there. Opened
                    # again at the writer's own map size (0: what its last commit recorded),
                    # which only its next growth outruns.
                    if hasattr(self, "env"):
                        self.env.close()
                    if attempt == OPEN_ATTEMPTS - 1:
                        raise
                    map_size = 0
        except lmdb.Error as exc:
            self._release_dir_lock()
            raise StorageError(_cut_short(self.path) or f"cannot open {self.path}: "
                               f"{_refused_file(self.path, readonly) or exc}") from exc
        except BaseException:
            if hasattr(self, "env"):  # a table missing (MissingTables): do not leak the env
                self.env.close()
            self._release_dir_lock()
            raise
        self._readers_checked = 0.0
        if not readonly:
            self._check_readers()
        log.info("storage_opened", path=self.path, readonly=readonly,
                 map_size=self.env.info()["map_size"])
        if self.left_by is not None:
            log.warning("unclean_stop_found", path=self.path, pid=self.left_by,
                        hint="the last writer of this directory ended without closing it "
                             "(killed, crashed, or its machine stopped): what it acknowledged "
                             "is on disk; deliveries not acked are delivered again")

    def _make_new(self, map_size: int) -> None:
        """Make the environment of a directory without `data.mdb`, whole, before it is opened.

        LMDB makes `data.mdb` empty and only then writes its meta pages: a start killed in
        between (SIGKILL, the OOM killer) left an empty file, which every later open refuses
        (an empty `data.mdb` is what a backup killed before its copy leaves; served, it would
        be a new empty store for every old token), so a directory that never held data could
        not be served again. The environment is made in NEW_ENV_DIR, synced, and its
        `data.mdb` moved into place: the name only ever holds an LMDB file. Under the
        directory lock; one left by a process killed here is removed first."""
        new = os.path.join(self.path, NEW_ENV_DIR)
        if os.path.isdir(new) and not os.path.islink(new):
            shutil.rmtree(new)
        elif os.path.lexists(new):
            os.unlink(new)
        data = os.path.join(self.path, "data.mdb")
        if os.path.lexists(data):
            return
        os.mkdir(new, 0o700)
        try:
            env = lmdb.open(new, subdir=True, map_size=map_size, max_dbs=MAX_DBS, sync=True,
                            metasync=True, mode=0o600)
            try:
                env.sync(True)
            finally:
                env.close()
            # A rename (not a link: some filesystems have none); nothing else makes `data.mdb`
            # here, under the directory lock.
            os.rename(os.path.join(new, "data.mdb"), data)
            sync_dir(self.path)
        finally:
            shutil.rmtree(new, ignore_errors=True)

    def _open(self, map_size: int, db_names: list[str], optional: Collection[str]) -> None:
        self.env = lmdb.open(
            self.path, subdir=True, map_size=map_size, max_dbs=MAX_DBS,
            max_readers=MAX_READERS, sync=True, metasync=True, writemap=False,
            readahead=False, lock=True, readonly=self.readonly, max_spare_txns=0, mode=0o600,
            create=not self.readonly,
        )
        self._check_size()
        self.dbs = Databases(self.path)
        if not self.readonly:
            self._open_dbs_writable(db_names)
            return
        for name in db_names:
            db = self._open_db(name, name in optional)
            if db is None:
                self.dbs.missing.append(name)
            else:
                self.dbs[name] = db

    def _open_dbs_writable(self, db_names: list[str]) -> None:
        """Open (and make, in a new directory) every table in one write transaction of our
        own. Without one, py-lmdb's `open_db` begins one for each table holding the GIL, so
        that while another process held the write lock every thread of this one stood still:
        the log's writer too, whose lines of the start (a key readable by others) waited
        until the store was open."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    dbs = {name: self.env.open_db(name.encode(), txn=txn) for name in db_names}
            except lmdb.MapFullError:  # a new directory's tables outgrew a tiny map
                self._grow()
                continue
            self.dbs.update(dbs)
            return

    def _check_size(self) -> None:
        """Refuse a data file shorter than its last committed transaction says it is (a copy
        cut short, a truncated file): LMDB opens it, since its meta pages are there, and the
        first read of a page past the end would kill the process with SIGBUS. The meta is read
        before the file's size, so a writer growing the file meanwhile is no false alarm."""
        need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        have = os.stat(os.path.join(self.path, "data.mdb")).st_size
        if have < need:
            self.env.close()
            raise StorageError(f"{self.path}/data.mdb is truncated: {have} bytes, where its "
                               f"last transaction needs {need}; restore it from a backup")

    def _check_readers(self) -> None:
        """Free the reader slots of processes that died in a read transaction (an audit or a
        backup killed by a signal): LMDB keeps every page freed after their snapshot until
        then, so the file would grow until the broker restarts."""
        self._readers_checked = time.monotonic()
        cleared = self.env.reader_check()
        if cleared:
            log.warning("storage_stale_readers_cleared", path=self.path, readers=cleared)

    def _open_db(self, name: str, optional: bool = False):
        """A table of a read-only open (None if `optional` and missing)."""
        try:
            return self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if optional:
                return None
            raise _missing_table(self.path, name) from None

    def _take_dir_lock(self) -> None:
        """Hold the directory's lock file for this process, and write our pid in it so that
        the next one refused can say who holds it."""
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            holder = int(text) if text.isdigit() else None
            who = "another process" if holder is None else f"process {holder}"
            raise DataDirLocked(f"{self.path} is locked by {who} (a broker serving it, or a "
                                "`homing audit rebuild`): stop that one first", holder) from None
        # A pid left in the file: its writer ended without releasing it (killed, crashed, its
        # machine stopped), since a release writes STOPPED over it. Said once open
        # (`unclean_stop_found`).
        left = os.read(fd, 32).decode(errors="replace").strip()
        self.left_by = int(left) if left.isdigit() else None
        self._found = STOPPED if self.left_by is None else _lock_line(self.left_by)
        # Written in place, a line of one length, never emptied first: the file keeps the block
        # it has, so a writer opens on a full disk (a broker serving reads there) as ever.
        os.pwrite(fd, _lock_line(os.getpid()), 0)
        os.ftruncate(fd, LOCK_LINE)
        self._lock_fd = fd

    def _release_dir_lock(self, clean: bool = False) -> None:
        """Let the lock go: `clean`, at a close, with STOPPED written over our pid; else (an
        open that failed) with the line we found put back, so that a crash before it is still
        said at the next open."""
        if self._lock_fd is not None:
            try:  # durably: the next writer reads what this one leaves
                os.pwrite(self._lock_fd, STOPPED if clean else self._found, 0)
                os.fsync(self._lock_fd)
            except OSError:  # a read-only disk: the next open says unclean, no worse
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """Yield a short read transaction; never hold it across an await or a long wait.

        An LMDB failure of the read (its reader table full of other processes' readers, a
        damaged page) is raised as `StorageError`, the error the broker answers `unavailable`
        to and goes on after."""
        try:
            txn = self._begin_read()
            try:
                yield txn
            finally:
                try:
                    txn.abort()
                finally:
                    self._exit_read()
        except lmdb.Error as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from exc

    def _begin_read(self) -> lmdb.Transaction:
        """Begin a read transaction, counted in `_readers` if and only if this returns: a
        failed adoption of the map's new size (its mmap refused under `ulimit -v`) left the
        count one short, and the next growth of this process waiting for ever."""
        while True:
            self._enter_read()
            try:
                return self.env.begin()
            except lmdb.MapResizedError:
                self._exit_read()
            except BaseException:
                self._exit_read()
                raise
            # Another process grew the map: adopt its size (needs no txn of ours open).
            self._resize(0)

    def _enter_read(self) -> None:
        with self._guard:
            while self._growing:
                self._guard.wait()
            self._readers += 1

    def _exit_read(self) -> None:
        with self._guard:
            self._readers -= 1
            if self._readers == 0:
                self._guard.notify_all()

    @contextlib.contextmanager
    def _no_reads(self) -> Iterator[None]:
        """Hold this process's reads off: wait for those under way to end, and keep new ones
        waiting (in `_enter_read`) until the block is left."""
        with self._guard:
            while self._growing:
                self._guard.wait()
            self._growing = True
            try:
                while self._readers:
                    self._guard.wait()
                yield
            finally:
                self._growing = False
                self._guard.notify_all()

    def _resize(self, new_size: int) -> None:
        with self._no_reads():
            self.env.set_mapsize(new_size)

    def _abort(self, txn: lmdb.Transaction) -> None:
        """Abort the write transaction `txn` with this process's reads held off. py-lmdb (3.0)
        aborts a write transaction only at a moment when no LMDB call of any thread is under
        way on the environment: two threads reading without a pause never leave one, and the
        abort (of every batch that grows the map) waited for ever."""
        with self._no_reads():
            txn.abort()

    def write(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """Run `work(txn)` in one write transaction and commit durably; return its result.

        `work` may run more than once (after the map grew), so it must not have effects outside
        the transaction. Raises `StorageFull` when the disk is full (nothing written); any
        exception from `work` aborts the transaction and propagates.
        """
        with self._write_lock:
            if time.monotonic() - self._readers_checked > READER_CHECK_S:
                self._check_readers()
            while True:
                txn = self.env.begin(write=True)
                self._on_commit = []
                try:
                    result = work(txn)
                    txn.commit()
                    # Taken out first: the hooks hold the batch's data (its records, for one),
                    # which must not stay alive until the next write.
                    hooks, self._on_commit = self._on_commit, []
                    for hook in hooks:
                        hook()
                    return result
                except lmdb.MapFullError:
                    self._abort(txn)
                    self._on_commit = []
                    self._grow()
                except BaseException as exc:
                    self._abort(txn)
                    self._on_commit = []
                    if _is_disk_full(exc, self.path):
                        raise StorageFull(f"disk full writing {self.path}") from exc
                    raise

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the write lock: no `write` runs meanwhile (for state that writes share, such as
        a store's write buffer, to be put right after a write failed)."""
        with self._write_lock:
            yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Called from `write` work: run `hook` after the commit succeeded, still under the lock."""
        self._on_commit.append(hook)

    def _grow(self) -> None:
        old = self.env.info()["map_size"]
        self._resize(old * 2)
        log.info("storage_map_grown", path=self.path, old_size=old,
                 new_size=self.env.info()["map_size"])

    def copy_to(self, dest: str, txn: lmdb.Transaction, *, made: bool = False) -> None:
        """Write the environment as `txn` (a read transaction of `read()`) sees it into the
        directory `dest` as a new `data.mdb` (mode 0600), compacted (LMDB's `mdb_env_copyfd3`:
        writers go on meanwhile), and sync it to disk; `made`: into the empty `data.mdb` the
        caller made there. Raises StorageError if it cannot be written."""
        flags = os.O_WRONLY if made else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(os.path.join(dest, "data.mdb"), flags, 0o600)
            try:
                _copy_stoppably(self.env, fd, txn)
                os.fsync(fd)
            finally:
                os.close(fd)
            sync_dir(dest)
        except (lmdb.Error, OSError) as exc:
            # LMDB's errors start with the function that failed: the reason is what follows
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).rpartition(": ")[2]
            raise StorageError(f"cannot copy {self.path} to {dest}: {reason}") from exc

    def map_size(self) -> int:
        """Return the current map size in bytes."""
        return self.env.info()["map_size"]

    def close(self) -> None:
        """Close the environment and release the directory lock."""
        self.env.close()
        self._release_dir_lock(clean=True)
        log.info("storage_closed", path=self.path)


def _copy_stoppably(env: lmdb.Environment, fd: int, txn: lmdb.Transaction) -> None:
    """`env.copyfd(fd, compact=True, txn=txn)` in a thread, so that the caller's signal
    handlers (Ctrl-C, SIGTERM) run during the copy: LMDB's copy is one call into C, which
    Python's handlers waited for (a backup of 165 MiB signalled as its copy began wrote all of
    it, then took it away). When the wait ends in an exception, `fd` is pointed at /dev/null
    opened read-only, so that the copy's next write fails (EBADF) and it stops; the thread is
    waited for (it uses `txn`, which the caller aborts next) before the exception goes on."""
    failed: list[BaseException] = []

    def copy() -> None:
        try:
            env.copyfd(fd, compact=True, txn=txn)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=copy, name="lmdb-copy", daemon=True)
    try:
        worker.start()
        worker.join()
    except BaseException:
        stop = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(stop, fd)
        finally:
            os.close(stop)
        while worker.is_alive():  # a matter of one write; `txn` must outlive the copy
            with contextlib.suppress(BaseException):  # a second Ctrl-C: wait all the same
                worker.join()
        raise
    if failed:
        raise failed[0]
