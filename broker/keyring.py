"""The signing keys of a data directory: the current one (`secret.key`) and, after a rotate, the
previous one (`secret.prev.key`), kept until it is retired (docs/OPERATIONS.md, "Rotating the
signing secret"). One previous key at most: a rotate while one is held is refused.

`rotate` and `retire` change the files under an exclusive lock on the data directory itself
(`homing backup` reads the two under it too, so it never copies half a rotate); a running
broker holds a `Keyring` and `refresh`es it when the files changed, seen by their stat.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker import tokens
from storage.files import sync_dir


class PreviousKeyHeld(Exception):
    """A rotate found a previous key still held: it must be retired first."""


@contextmanager
def keys_locked(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `data_dir` (flock on the directory: not the broker's
    `homing.lock`, so a running broker does not stand in its way) for the keys' files."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rotate(data_dir: Path) -> tuple[str, str]:
    """Make the current key the previous one and a new one current; (new id, previous id).

    FileNotFoundError when there is no `secret.key`, SecretError when a key file is not whole,
    PreviousKeyHeld when a previous key is held. The previous key is written first (temporary
    file, synced, linked), then the new one renamed over `secret.key`: a rotate cut short in
    between leaves the previous key equal to the current one, which a rotate run again takes
    for its own."""
    data_dir = Path(data_dir)
    with keys_locked(data_dir):
        current = tokens.load_secret(data_dir, create=False)
        previous = tokens.load_previous(data_dir)
        if previous is not None and previous != current:
            raise PreviousKeyHeld(tokens.key_id(previous))
        if previous is None:
            tokens.store_secret(data_dir, current, tokens.PREVIOUS_FILE)
        new = tokens.store_secret(data_dir, secrets.token_bytes(tokens.SECRET_BYTES),
                                  replace=True)
    return tokens.key_id(new), tokens.key_id(current)


def retire(data_dir: Path) -> tuple[str | None, str]:
    """Remove the previous key; (its id, or None when none was held; the current key's id).
    FileNotFoundError without a `secret.key`; a previous key that is not whole is removed all
    the same (its id then None)."""
    data_dir = Path(data_dir)
    with keys_locked(data_dir):
        current = tokens.load_secret(data_dir, create=False)
        path = data_dir / tokens.PREVIOUS_FILE
        try:
            previous = path.read_bytes()
        except FileNotFoundError:
            return None, tokens.key_id(current)
        path.unlink()
        sync_dir(data_dir)
    whole = len(previous) == tokens.SECRET_BYTES
    return (tokens.key_id(previous) if whole else None), tokens.key_id(current)


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Keyring:
    """The keys a broker verifies tokens with: key id -> secret, the current key first."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.keys: dict[str, bytes] = {}
        self.current = b""
        self._stamps: tuple = ()
        self.refresh(create=True)

    @property
    def previous_id(self) -> str | None:
        return next((k for k in self.keys if k != tokens.key_id(self.current)), None)

    def _files(self) -> tuple:
        return tuple(_stamp(self.data_dir / name)
                     for name in (tokens.SECRET_FILE, tokens.PREVIOUS_FILE))

    def refresh(self, create: bool = False) -> bool:
        """Read the key files again if their stat changed since the last read (two stat calls
        otherwise); True if they were read. Raises SecretError, or OSError (FileNotFoundError:
        no `secret.key`), and keeps the keys held, when they cannot be read; the files are not
        read again until they change."""
        stamps = self._files()
        if stamps == self._stamps:
            return False
        self._stamps = stamps  # stat before read: a change meanwhile is seen at the next look
        current = tokens.load_secret(self.data_dir, create=create)
        previous = tokens.load_previous(self.data_dir)
        keys = {tokens.key_id(current): current}
        if previous is not None:
            keys.setdefault(tokens.key_id(previous), previous)
        self.keys, self.current = keys, current
        if create:
            self._stamps = self._files()  # the secret.key just made
        return True
