"""The temporary files of key writes killed half-way (`homing secret rotate`, or the first
`homing token` or `homing serve` making `secret.key`, killed with SIGKILL or by a power cut
between making the file and renaming it into place): a review of leftovers (2026-12-06).

Each write used a temporary file named for its process (`.secret.key.PID.tmp`), removed only by
a later process of the same pid: the next rotate and start went on, but the leftover, a copy of
a key, stayed for good. Now the name is fixed (`.secret.key.tmp`, `.secret.prev.key.tmp`), the
writes are made under the keys' lock, and the next write replaces it and removes the old kind.
One test kills a real rotate as soon as its temporary file appears (polled for, no timed
sleep); the others make the files as a process killed so leaves them (the key written and
synced, not yet renamed), of both kinds of name and of a first key, where no kill could land
as surely.
"""

from __future__ import annotations

import secrets
import subprocess

import trio

from broker import keyring, tokens
from broker.client import open_client
from tests.procs import BrokerProcess, homing, homing_cmd, lines

# What a rotate killed in each of its two steps leaves, and the same of a homing from before
# 2026-12-06 (killed as process 31337).
LEFTOVERS = (".secret.prev.key.tmp", ".secret.key.tmp",
             ".secret.prev.key.31337.tmp", ".secret.key.31337.tmp")


def _leftovers(data) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.name.endswith(".tmp"))


async def test_a_rotate_killed_mid_write_leaves_nothing_to_the_next_rotate_and_start(tmp_path):
    """With the temporary files of rotates killed half-way in the data directory, the broker
    starts and takes its tokens; the next `homing secret rotate` goes through, replaces them
    and leaves none; the broker takes the new key up."""
    data = tmp_path / "data"
    first = tokens.load_secret(data)
    for name in LEFTOVERS:
        (data / name).write_bytes(first if "prev" in name else secrets.token_bytes(32))
        (data / name).chmod(0o600)
    with BrokerProcess(data) as bp:
        async with open_client(bp.server, bp.token("shop"), "d1") as client:
            await client.ping()
        [rotated] = lines(homing("secret", "rotate", "--data", str(data)))
        assert rotated["previous_key_id"] == tokens.key_id(first), rotated
        assert _leftovers(data) == [], _leftovers(data)
        new = tokens.load_secret(data, create=False)
        assert tokens.key_id(new) == rotated["key_id"]
        with trio.fail_after(30):
            async with open_client(bp.server, tokens.issue(new, "shop"), "d2") as client:
                await client.ping()


def test_a_first_key_killed_mid_write_leaves_nothing_to_the_next_token(tmp_path):
    """A data directory whose `secret.key` was being made when its process was killed (its
    temporary file, no key): the next `homing token` makes the key, and leaves no temporary
    file."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    for name in (".secret.key.tmp", ".secret.key.31337.tmp"):
        (data / name).write_bytes(secrets.token_bytes(32))
    token = homing("token", "shop", "--data", str(data)).stdout.strip()
    assert tokens.verify({tokens.key_id(k): k for k in [tokens.load_secret(data)]},
                         token).user == "shop"
    assert _leftovers(data) == [], _leftovers(data)


def test_first_keys_made_at_once_by_many_processes_are_one_key(tmp_path):
    """Six `homing token` on a new data directory at once, each making `secret.key` through
    the one temporary file name: under the keys' lock one of them makes it, and every token
    is signed with that key (without the lock one could link another's file half-written)."""
    data = tmp_path / "data"
    procs = [subprocess.Popen([*homing_cmd(), "token", f"u{i}", "--data", str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    key = tokens.load_secret(data, create=False)
    users = [tokens.verify({tokens.key_id(key): key}, out.strip()).user for out, _ in outs]
    assert users == [f"u{i}" for i in range(6)]
    assert _leftovers(data) == [], _leftovers(data)


def test_a_rotate_killed_while_its_temporary_file_is_there_leaves_it_to_the_next(tmp_path):
    """`homing secret rotate` killed with SIGKILL as soon as its temporary file appears (the
    key written, not yet renamed): the file stays, and the next rotate replaces it, goes
    through and leaves none. (Until 2026-12-06 the next rotate left it there, for good.)"""
    data = tmp_path / "data"
    tokens.load_secret(data)
    for _ in range(100):  # until a kill lands while the file is there (the first, as measured)
        rotate = subprocess.Popen([*homing_cmd(), "secret", "rotate", "--data", str(data)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while rotate.poll() is None and not _leftovers(data):
            pass  # no sleep: the file is there for the time of a write and an fsync
        rotate.kill()
        rotate.wait()
        if _leftovers(data):
            break
        # It finished (its previous key held: a rotate now would be refused), or was killed
        # before its file (perhaps a rotate cut short, the previous key equal to the current):
        # back to one key for the next try.
        try:
            keyring.retire(data)
        except keyring.RotateUnfinished:
            keyring.rotate(data)
            keyring.retire(data)
    else:
        raise AssertionError("no kill of 100 landed while the temporary file was there")
    homing("secret", "rotate", "--data", str(data))  # a rotate cut short: it goes on
    assert _leftovers(data) == [], _leftovers(data)
    assert sorted(p.name for p in data.iterdir()) == ["secret.key", "secret.prev.key"]
