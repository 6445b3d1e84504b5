"""`homing backup DEST`: a consistent copy of a data directory, safe while the broker runs
(docs/OPERATIONS.md, "Backups").

The copy is of one committed transaction: the log and every projection as they stood together,
compacted, synced to disk; with `secret.key`, so that the tokens already handed out work against
a broker restored from it. DEST is a new directory (or an empty one) and becomes a data
directory: `homing serve --data DEST` runs on it, `homing audit verify --data DEST` checks it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from broker import tokens
from broker.audit_cli import open_readonly, quietly
from broker.cli import EXIT_USAGE, CliError, emit
from broker.config import DEFAULT_DATA_DIR


def cmd_backup(args: argparse.Namespace) -> int:
    from storage.errors import StorageError

    dest = Path(args.dest)
    started = time.monotonic()
    store = open_readonly(args.data)  # before DEST is made: no empty DEST left for a bad --data
    try:
        _make_empty(dest)
        try:
            last_lsn = store.backup(str(dest))
        except StorageError as exc:
            (dest / "data.mdb").unlink(missing_ok=True)  # no half copy that looks like one
            raise CliError(EXIT_USAGE, "data_dir", str(exc)) from None
    finally:
        store.close()
    secret = _copy_secret(Path(args.data), dest)
    emit({"backup": str(dest), "last_lsn": last_lsn,
          "bytes": (dest / "data.mdb").stat().st_size, "secret": secret,
          "seconds": round(time.monotonic() - started, 3)})
    return 0


def _make_empty(dest: Path) -> None:
    """Make `dest` (mode 0700: it holds every message), or take it if it is an empty directory;
    anything else is refused, so that a backup never mixes with other files."""
    try:
        dest.mkdir(mode=0o700)
    except FileExistsError:
        if not dest.is_dir() or any(dest.iterdir()):
            raise CliError(EXIT_USAGE, "data_dir",
                           f"cannot back up into {dest}: it exists and is not an empty "
                           "directory") from None
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir",
                       f"cannot back up into {dest}: {exc.strerror or exc}") from None


def _copy_secret(data_dir: Path, dest: Path) -> bool:
    """Copy the token-signing secret (refused, as `serve` refuses it, if it is not whole),
    mode 0600 and synced; False if the data directory has none (no token was ever minted)."""
    try:
        secret = tokens.load_secret(data_dir, create=False)
    except FileNotFoundError:
        return False
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot read the secret of {data_dir}: "
                       f"{exc.strerror or exc}") from None
    try:
        tokens.store_secret(dest, secret)
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot write the secret into {dest}: "
                       f"{exc.strerror or exc}") from None
    return True


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing backup` on the `homing` subparsers."""
    p = sub.add_parser("backup", help="copy the data directory consistently, even while serving")
    p.add_argument("dest", metavar="DEST", help="a new (or empty) directory for the copy")
    p.add_argument("--data", default=DEFAULT_DATA_DIR,
                   help="data directory (default ./%(default)s)")
    p.set_defaults(func=quietly(cmd_backup))
