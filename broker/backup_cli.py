"""`homing backup DEST`: a consistent copy of a data directory, safe while the broker runs
(docs/OPERATIONS.md, "Backups").

The copy is of one committed transaction: the log and every projection as they stood together,
compacted, synced to disk; with `secret.key` (and `secret.prev.key`, the key before a rotate,
while it is held), so that the tokens already handed out work against a broker restored from it.
DEST is a new directory (or an empty one) and becomes a data directory: `homing serve --data
DEST` runs on it, `homing audit verify --data DEST` checks it.
Whatever is refused is refused before anything is written; a copy that fails is taken away.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker import tokens
from broker.audit_cli import open_readonly, quietly
from broker.cli import EXIT_USAGE, CliError, emit
from broker.config import DEFAULT_DATA_DIR
from broker.tokens import keys_locked
from storage.files import sync_dir


def cmd_backup(args: argparse.Namespace) -> int:
    data, dest = Path(args.data), Path(args.dest).absolute()
    started = time.monotonic()
    with sigterm_as_exit():
        return _backup(args, data, dest, started)


def _backup(args: argparse.Namespace, data: Path, dest: Path, started: float) -> int:
    from storage.errors import StorageError

    try:
        store = open_readonly(args.data)
    except CliError as exc:
        if exc.name != "outdated_layout":
            raise
        store = _LogOnly(args.data)  # a directory of another layout is copied all the same
    try:
        secret, previous = _read_keys(data)
        _check_outside(dest, data)
        made = _make_empty(dest)
        _claim(dest, made)
        try:
            with keys_locked(dest):  # (as every write of a key file is made)
                if secret is not None:  # before the copy: a whole `data.mdb` has its secret
                    tokens.store_secret(dest, secret)  # beside it
                if previous is not None:
                    tokens.store_secret(dest, previous, tokens.PREVIOUS_FILE)
            last_lsn, digest = store.backup(str(dest), made=True)
        except (StorageError, OSError) as exc:
            _take_away(dest, made)
            reason = exc if isinstance(exc, StorageError) else (
                f"cannot write the secret into {dest}: {exc.strerror or exc}")
            raise CliError(EXIT_USAGE, "data_dir", str(reason)) from None
        except BaseException:  # Ctrl-C, SIGTERM: what was copied so far is no backup either
            _take_away(dest, made)
            raise
    finally:
        store.close()
    # head: the anchor `audit verify --anchor LSN:DIGEST` takes, as verify prints it, so that
    # the record of a nightly backup is also what a later verify of the log is held to.
    emit({"backup": str(dest), "last_lsn": last_lsn,
          "head": {"lsn": last_lsn, "digest": digest.hex()},
          "bytes": (dest / "data.mdb").stat().st_size, "secret": secret is not None,
          "previous_secret": previous is not None, "seconds": round(time.monotonic() - started, 3)})
    return 0


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (`timeout`, a scheduler stopping the job) ends the command as Ctrl-C does, by an
    exception, so that a copy it stops is taken away (exit status 128 + 15); by default it
    killed the process and left the copy half made. A SIGTERM ignored when the command started
    (`trap '' TERM` in the script running it) stays ignored, as Python leaves an ignored SIGINT."""
    if (threading.current_thread() is not threading.main_thread()  # `main` called in a thread
            or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN):
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _LogOnly:
    """The log of a data directory of another layout (tables missing), enough to copy it."""

    def __init__(self, path: str) -> None:
        from storage.lmdb_env import LmdbEnv
        from storage.lmdb_log import LmdbLog

        self._env = LmdbEnv(path, ["log"], readonly=True)
        self._log = LmdbLog(self._env)

    def backup(self, dest: str, *, made: bool = False) -> tuple[int, bytes]:
        return self._log.backup(dest, made=made)

    def close(self) -> None:
        self._env.close()


def _read_keys(data: Path) -> tuple[bytes | None, bytes | None]:
    """The data directory's token-signing secret and the previous one (refused, as `serve`
    refuses them, if not whole); None for one it has not (no token was ever minted for it; no
    rotate since the last retire). Read under the keys' lock: never half a rotate."""
    try:
        with keys_locked(data):
            try:
                secret = tokens.load_secret(data, create=False)
            except FileNotFoundError:
                secret = None
            return secret, tokens.load_previous(data)
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot read the secret of {data}: "
                       f"{exc.strerror or exc}") from None


def _check_outside(dest: Path, data: Path) -> None:
    """Refuse a DEST in the data directory: a backup must not share the fate of its original."""
    inside, root = dest.resolve(), data.resolve()
    if inside == root or root in inside.parents:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot back up into {dest}: it is inside the "
                       f"data directory {root}; put backups on another disk, or at least "
                       "elsewhere")


def _make_empty(dest: Path) -> bool:
    """Make `dest` (mode 0700: it holds every message; its missing parents as `mkdir -p`
    would) and sync its parent, or take it if it is an empty directory (its mode as it is);
    anything else is refused, so that a backup never mixes with other files. True if made."""
    try:
        dest.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not dest.is_dir() or any(dest.iterdir()):
            raise CliError(EXIT_USAGE, "data_dir",
                           f"cannot back up into {dest}: it exists and is not an empty "
                           "directory") from None
        return False
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir",
                       f"cannot back up into {dest}: {exc.strerror or exc}") from None
    sync_dir(dest.parent)  # the new name survives a power loss, as the copy inside it does
    return True


def _claim(dest: Path, made: bool) -> None:
    """Make `dest/data.mdb`, empty (mode 0600), for the secret to go beside and the copy into:
    made O_EXCL, it is this run's claim on `dest`. Found there, another process (a second
    backup into the same DEST) wrote into `dest` since `_make_empty` saw it empty: refused, and
    the other's files are left alone (and `dest`, even if this run made it)."""
    try:
        os.close(os.open(dest / "data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot back up into {dest}: another process "
                       "began writing into it meanwhile (a second `homing backup` into the "
                       "same DEST?); what it wrote is left as it is") from None
    except OSError as exc:  # a read-only file system, a directory not ours to write in
        if made:
            dest.rmdir()
        raise CliError(EXIT_USAGE, "data_dir",
                       f"cannot back up into {dest}: {exc.strerror or exc}") from None


def _take_away(dest: Path, made: bool) -> None:
    """Remove what a failed backup wrote into `dest` (the `data.mdb` it claimed, the secret),
    and `dest` if it made it: no half copy is left to be taken for a backup."""
    for name in ("data.mdb", tokens.SECRET_FILE, tokens.PREVIOUS_FILE):
        if (dest / name).exists():
            (dest / name).unlink()
    if made:
        dest.rmdir()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing backup` on the `homing` subparsers."""
    p = sub.add_parser("backup", help="copy the data directory consistently, even while serving")
    p.add_argument("dest", metavar="DEST", help="a new (or empty) directory for the copy")
    p.add_argument("--data", default=DEFAULT_DATA_DIR,
                   help="data directory (default ./%(default)s)")
    p.set_defaults(func=quietly(cmd_backup))
