"""The signing keys of a data directory: the current one (`secret.key`) and, after a rotate, the
previous one (`secret.prev.key`), kept until it is retired (docs/OPERATIONS.md, "Rotating the
signing secret"). One previous key at most: a rotate while one is held is refused.

`rotate` and `retire` change the files under an exclusive lock on the data directory itself
(`homing backup` reads the two under it too, so it never copies half a rotate); a running
broker holds a `Keyring` and `refresh`es it when the files changed, seen by their stat.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from broker import tokens
from broker.tokens import keys_locked
from storage.files import sync_dir


class PreviousKeyHeld(Exception):
    """A rotate found a previous key still held: it must be retired first."""


class RotateUnfinished(Exception):
    """A retire found the previous key equal to the current one (a rotate cut short after it
    saved the previous key): the rotate must be run again; nothing would be retired."""


def rotate(data_dir: Path) -> tuple[str, str]:
    """Make the current key the previous one and a new one current; (new id, previous id).

    FileNotFoundError when there is no `secret.key`, SecretError when a key file is not whole,
    PreviousKeyHeld when a previous key is held. The previous key is written first (temporary
    file, synced, renamed into place), then the new one renamed over `secret.key`: a rotate
    cut short in between leaves the previous key equal to the current one, which a rotate run
    again takes for its own (and `retire` refuses, RotateUnfinished)."""
    data_dir = Path(data_dir)
    with keys_locked(data_dir):
        current = tokens.load_secret(data_dir, create=False)
        previous = tokens.load_previous(data_dir)
        if previous is not None and previous != current:
            raise PreviousKeyHeld(tokens.key_id(previous))
        st = (data_dir / tokens.SECRET_FILE).stat()
        owner = st.st_uid, st.st_gid  # run as root, the files stay the broker's user's
        # saved again when it is there already (a rotate cut short): as a file of its own,
        # never a link that the new `secret.key` would show through
        tokens.store_secret(data_dir, current, tokens.PREVIOUS_FILE, replace=True, owner=owner)
        new = tokens.store_secret(data_dir, secrets.token_bytes(tokens.SECRET_BYTES),
                                  replace=True, owner=owner)
    return tokens.key_id(new), tokens.key_id(current)


def retire(data_dir: Path) -> tuple[str | None, str]:
    """Remove the previous key; (its id, or None when none was held; the current key's id).
    FileNotFoundError without a `secret.key`; a previous key that is not whole is removed all
    the same (its id then None). RotateUnfinished, nothing removed, when the previous key is
    the current one: that key is not retired by removing its copy."""
    data_dir = Path(data_dir)
    with keys_locked(data_dir):
        current = tokens.load_secret(data_dir, create=False)
        path = data_dir / tokens.PREVIOUS_FILE
        try:
            previous = tokens.load_previous(data_dir)
        except tokens.SecretError:
            previous = b""  # not whole, or not a regular file: removed all the same
        if previous is None:
            return None, tokens.key_id(current)
        if previous == current:
            raise RotateUnfinished(tokens.key_id(current))
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
        no `secret.key`; EMFILE: out of descriptors), when they cannot be read, and keeps the
        current key held; the previous key only while `secret.prev.key` is there (a retire
        is taken up even then: the stat says it). Files that could not be read are tried
        again at the next call."""
        stamps = self._files()
        if stamps == self._stamps:
            return False
        try:
            current = tokens.load_secret(self.data_dir, create=create)
            previous = tokens.load_previous(self.data_dir)
        except (tokens.SecretError, OSError):
            if stamps[1] is None:  # retired: never held on for want of a read
                self.keys = {tokens.key_id(self.current): self.current} if self.current else {}
            raise
        self._stamps = stamps  # stat before read: a change meanwhile is seen at the next look
        keys = {tokens.key_id(current): current}
        if previous is not None:
            keys.setdefault(tokens.key_id(previous), previous)
        self.keys, self.current = keys, current
        if create:
            self._stamps = self._files()  # the secret.key just made
        return True
