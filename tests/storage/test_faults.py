"""Storage faults: a full disk, and a reader in another process while the writer grows the map."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from storage.commands import SendMessage
from storage.errors import StorageFull
from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted on tmp_path/full (skipped where mounting is not allowed)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _batch(b: int, n: int = 20) -> list[SendMessage]:
    return [SendMessage("alice", "d", "user", f"{b}-{i}", "x" * 4000, to="bob") for i in range(n)]


def test_full_disk_raises_storage_full_and_writes_nothing(small_disk):
    """On ENOSPC the batch raises StorageFull, nothing of it is written, and a reopen is clean."""
    store = Store.open(small_disk / "data", map_size=64 << 20)
    last = 0
    with pytest.raises(StorageFull):
        for b in range(1000):
            store.execute(_batch(b))
            last = store.last_lsn()
    assert last > 0
    assert store.last_lsn() == last
    store.close()
    store = Store.open(small_disk / "data", readonly=True)
    try:
        assert store.last_lsn() == last
        assert store.verify_log() == last
        assert store.check_projections() is None
    finally:
        store.close()


READER = """
import sys
from storage.store import Store
s = Store.open(sys.argv[1], readonly=True, map_size=64 * 1024)
print("ready", s.last_lsn(), flush=True)
sys.stdin.readline()
n = s.last_lsn()
print("after", n, s.verify_log(), len(s.inbox_after("bob", 0, 100000)), flush=True)
s.close()
"""


def test_reader_process_follows_map_growth(tmp_path):
    """A read-only Store in another process keeps working after the writer grew the map."""
    path = tmp_path / "data"
    store = Store.open(path, map_size=64 * 1024)
    store.execute(_batch(0, 1))
    proc = subprocess.Popen([sys.executable, "-c", READER, str(path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        while not line.startswith("ready"):
            line = proc.stdout.readline()
        for b in range(1, 30):
            store.execute(_batch(b))
        assert store._env.map_size() > 64 * 1024
        out, _ = proc.communicate(input="go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()
    last = [ln for ln in out.splitlines() if ln.startswith("after")][-1].split()
    n = 3 + 29 * 20 + 1
    assert last[1:] == [str(n), str(n), str(29 * 20 + 1)]
