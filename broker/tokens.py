"""Access tokens: HMAC-SHA256-signed claims (user, role, expiry) with a per-data-dir secret.

Format: ``v1.<base64url(msgpack claims)>.<base64url(hmac)>``, claims ``{"u", "r", "e", "i",
"k"}`` (user, role, expiry and issue time in Unix seconds, and the id of the key that signed
it, `key_id`; tokens from before 2026-12-05 have no ``k``). The secret is 32 random bytes in
``<data_dir>/secret.key``, created with mode 0600 on first use by whichever comes first,
`homing serve` or `homing token`; both only read it afterwards, so tokens can be minted while
the broker runs. After `homing secret rotate` the key before it is in ``secret.prev.key``
(broker/keyring.py), and its tokens are still accepted until `homing secret retire`.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack

from storage.files import sync_dir

# "monitor" (homing health) asks the broker's figures and nothing else: broker/handlers.py
ROLES = ("user", "service", "admin", "monitor")
SECRET_FILE = "secret.key"
PREVIOUS_FILE = "secret.prev.key"  # the key before the last rotate, until it is retired
SECRET_BYTES = 32
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
MAX_TOKEN_CHARS = 4096
KEY_ID = re.compile(r"[0-9a-f]{12}")


class TokenError(Exception):
    """A token is malformed, forged (bad signature), or expired. The text says which."""


class UnknownKey(TokenError):
    """A token names a signing key (its `k` claim) that is not among the keys held."""


class TokenExpired(TokenError):
    """A genuine token (its signature verified) whose expiry has passed; `user` is the user it
    was minted for, trusted as the signature is, for the broker's log to name."""

    def __init__(self, message: str, user: str) -> None:
        super().__init__(message)
        self.user = user


@dataclass(frozen=True, slots=True)
class Claims:
    """Who a verified token speaks for."""

    user: str
    role: str
    expires: int
    issued: int = 0  # Unix seconds; a token without it counts as the oldest (for revocation)
    key: str = ""  # the id of the key that verified it (`key_id`)


def key_id(secret: bytes) -> str:
    """The id a token names its signing key by: 12 hex digits of a digest of the key (48 bits of
    a hash say nothing of the 256 of the key)."""
    return hashlib.sha256(b"homing key id\0" + secret).hexdigest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SecretError(Exception):
    """The data directory's secret.key is not a usable signing secret."""


def load_secret(data_dir: Path, *, create: bool = True, name: str = SECRET_FILE) -> bytes:
    """The data directory's signing secret, created (mode 0600) if missing and `create`.

    Raises SecretError when the file is not SECRET_BYTES long: a key cut short (an empty file
    left by a full disk) would let anyone sign tokens, so it is refused, never used; and when
    it is not a regular file (`_read_key`).
    """
    path = Path(data_dir) / name
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            raise
        return _create_secret(path)


def _read_key(path: Path) -> bytes:
    """The key in the file `path` (a link to one is followed), read without blocking and no
    more than one byte past SECRET_BYTES; SecretError for a file of another length, and for a
    FIFO, a device or a directory, never waited on or read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path} is not a regular file: it cannot sign tokens. Remove it "
                              f"(a key file holds {SECRET_BYTES} bytes, mode 0600)")
        secret = os.read(fd, SECRET_BYTES + 1) if st.st_size == SECRET_BYTES else b""
    finally:
        os.close(fd)
    if len(secret) != SECRET_BYTES:
        size = len(secret) or st.st_size
        raise SecretError(
            f"{path} holds {size} bytes, not {SECRET_BYTES}: it cannot sign tokens. If it "
            "was cut short while being made, delete it and start again (tokens issued with the "
            "old one stop working)")
    return secret


def load_previous(data_dir: Path) -> bytes | None:
    """The key before the last rotate (`PREVIOUS_FILE`), None if none is held; SecretError as
    `load_secret`."""
    try:
        return load_secret(data_dir, create=False, name=PREVIOUS_FILE)
    except FileNotFoundError:
        return None


@contextmanager
def keys_locked(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `data_dir` (flock on the directory: not the broker's
    `homing.lock`, so a running broker does not stand in its way) for the keys' files: every
    write of one (`store_secret`) is made under it, and the reads that must not see half a
    rotate (`homing backup`'s) are too."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _create_secret(path: Path) -> bytes:
    """Make a new secret at `path` (see `store_secret`), under the keys' lock; return the one
    linked there (another process's, if it made one first)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with keys_locked(path.parent):
        return store_secret(path.parent, secrets.token_bytes(SECRET_BYTES))


def store_secret(data_dir: Path, secret: bytes, name: str = SECRET_FILE, *,
                 replace: bool = False, owner: tuple[int, int] | None = None) -> bytes:
    """Write `secret` to a temporary file in `data_dir`, sync it, and link it into place as its
    `name` (mode 0600): the name only ever holds a whole secret, and if the directory has one
    already (a second process racing us) that one is kept, unless `replace` (a rotate: renamed
    over it). `owner` (uid, gid), when run as root, is given the file (a rotate: the broker's
    user keeps its keys). Return the one in place.

    The caller holds `keys_locked(data_dir)`: the temporary file has one name for each key
    file (`.NAME.tmp`), so that one left by a process killed while writing it (SIGKILL, a
    power cut) is the next write's to replace, not a copy of a key left for good."""
    path = Path(data_dir) / name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f".{name}.tmp")
    tmp.unlink(missing_ok=True)  # one left by a write killed, or planted there:
    # made anew or refused (FileExistsError), never opened through a link to another file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: theirs it is
                pass
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(path.parent)
    return _read_key(path)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary files of `path` that a homing from before 2026-12-06 left when
    killed while writing it, each named for its process (`.NAME.PID.tmp`): never written to
    again, they held a key until removed by hand. Under the keys' lock, no writer has one
    open (a homing of this version names its temporary file `.NAME.tmp`)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if leftover.name[len(path.name) + 2:-4].isdigit():
            leftover.unlink(missing_ok=True)


def check_user(user: str) -> None:
    """ValueError unless `user` is a user id a token can be issued for."""
    if not USER_ID.fullmatch(user):
        raise ValueError(f"invalid user id {user!r}: letters, digits and _.@+- up to 64 chars")


def issue(secret: bytes, user: str, role: str = "user", ttl_s: int = 30 * 86400) -> str:
    """A signed token for `user` with `role`, valid for `ttl_s` seconds."""
    check_user(user)
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    now = int(time.time())
    body = _b64(msgpack.packb({"u": user, "r": role, "e": now + ttl_s, "i": now,
                               "k": key_id(secret)}))
    mac = hmac.new(secret, b"v1." + body.encode("ascii"), hashlib.sha256).digest()
    return f"v1.{body}.{_b64(mac)}"


def verify(keys: Mapping[str, bytes], token: str, now: float | None = None) -> Claims:
    """The claims of a genuine, unexpired token signed with one of `keys` (key id -> secret);
    TokenError otherwise, UnknownKey when it names a key not among them. The key is the one
    its `k` claim names; a token without one (minted before key ids) is tried against each
    (two at most: the current key and the previous one)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed token")
    if not token:
        raise TokenError("malformed token: it is empty (an unset HOMING_TOKEN?); mint one with "
                         "`homing token USER --data DIR`, DIR the broker's data directory")
    if token != token.strip() or " " in token:
        raise TokenError("malformed token: it has whitespace around or in it (a line end kept "
                         "from the file it was read from, a `Bearer ` before it): strip it and "
                         "send the token alone, as `homing token` prints it")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "v1":
        raise TokenError("malformed token: a token is v1.<claims>.<signature>, as `homing "
                         "token` prints it")
    try:
        mac = _unb64(parts[2])
    except ValueError:
        raise TokenError("malformed token") from None
    try:  # read before the signature is checked only to pick the key; trusted after it
        claims = msgpack.unpackb(_unb64(parts[1]))
    except Exception:
        claims = None
    named = claims.get("k") if isinstance(claims, dict) else None
    if named is None:
        candidates = list(keys.items())
    elif isinstance(named, str) and named in keys:
        candidates = [(named, keys[named])]
    else:
        shown = named if isinstance(named, str) and KEY_ID.fullmatch(named) else "?"
        raise UnknownKey(f"unknown signing key: not signed with this broker's secret (key id "
                         f"{shown} is not one it holds: retired with `homing secret retire`, or "
                         "another data directory's); mint tokens with `homing token --data "
                         "DIR`, DIR the broker's data directory")
    signed = b"v1." + parts[1].encode("ascii", "replace")
    used = next((kid for kid, secret in candidates if hmac.compare_digest(
        mac, hmac.new(secret, signed, hashlib.sha256).digest())), None)
    if used is None:
        raise TokenError("bad token signature: not signed with this broker's secret (mint "
                         "tokens with `homing token --data DIR`, DIR the broker's data directory)")
    try:
        user, role, expires = claims["u"], claims["r"], claims["e"]
    except Exception:
        raise TokenError("malformed token claims") from None
    if not (isinstance(user, str) and USER_ID.fullmatch(user) and role in ROLES):
        raise TokenError("malformed token claims")
    if not isinstance(expires, int):
        raise TokenError("malformed token claims")
    if expires <= (time.time() if now is None else now):
        raise TokenExpired(expired_message(expires), user)
    issued = claims.get("i", 0)
    return Claims(user, role, expires, issued if type(issued) is int else 0, used)


def retired_message(key: str) -> str:
    """What a token of the retired key `key` is told, at hello and in a session it opened."""
    return (f"token's signing key {key} retired (no longer held): mint a new token with "
            "`homing token`")


def expired_message(expires: float) -> str:
    """What a refused token that expired at `expires` (Unix seconds) is told: when, and what to
    do (it said "token expired" alone)."""
    try:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    except (OverflowError, OSError, ValueError):  # a time no calendar date holds
        at = f"{expires} (Unix seconds)"
    return (f"token expired at {at}: mint a new one with `homing token USER --data DIR` "
            "(one that lasts as long as it is to run: --ttl, up to 3650d)")


def parse_ttl(text: str) -> int:
    """Seconds in a duration like ``30d``, ``12h``, ``15m``, ``90s`` or ``3600``."""
    m = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not m:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30d, 12h, 15m, 90s")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return int(m.group(1)) * unit
