"""Conformance suite for EventLog backends: the same tests against LmdbLog and MemoryLog."""

from __future__ import annotations

import os
import subprocess
import sys
from hashlib import blake2b
from pathlib import Path

import pytest

from storage.errors import CorruptLog, DataDirLocked
from storage.lmdb_log import LmdbLog
from storage.log import EventLog, MemoryLog
from storage.records import (
    MESSAGE_ACCEPTED,
    Event,
    decode_body,
    encode_body,
    lsn_key,
)

ROOT = Path(__file__).resolve().parents[2]


class Backend:
    """Opens and reopens one backend; the memory backend 'reopens' to the same object."""

    def __init__(self, kind, path):
        self.kind, self.path = kind, path
        self.mem = MemoryLog()

    def open(self) -> EventLog:
        if self.kind == "memory":
            self.mem._closed = False
            return self.mem
        return LmdbLog.open(str(self.path))


@pytest.fixture(params=["lmdb", "memory"])
def backend(request, tmp_path):
    """A log backend factory for each implementation."""
    return Backend(request.param, tmp_path / "log")


def _ev(i: int):
    data = {"conv": "dm:a:b", "cid": f"c{i}", "body": f"m{i}"}
    return (1_000 + i, MESSAGE_ACCEPTED, "alice", "d1", data)


def test_empty_log_has_lsn_zero(backend):
    """A fresh log reports last LSN 0 and reads nothing."""
    log = backend.open()
    assert log.last_lsn() == 0
    assert list(log.read()) == []
    log.close()


def test_append_assigns_gapless_lsns(backend):
    """Batches get consecutive LSNs from 1 and append returns the last one."""
    log = backend.open()
    assert log.append([_ev(i) for i in range(3)]) == 3
    assert log.append([_ev(3)]) == 4
    assert log.append([]) == 4
    assert [e.lsn for e in log.read()] == [1, 2, 3, 4]
    assert [e.data["cid"] for e in log.read()] == ["c0", "c1", "c2", "c3"]
    log.close()


def test_append_accepts_events(backend):
    """Event objects are accepted too; their lsn is ignored and the input is not modified."""
    log = backend.open()
    src = Event(99, 5, MESSAGE_ACCEPTED, "bob", "d", {"x": 1})
    assert log.append([src]) == 1
    assert src.lsn == 99
    assert next(iter(log.read())) == Event(1, 5, MESSAGE_ACCEPTED, "bob", "d", {"x": 1})
    log.close()


def test_range_reads(backend):
    """read(from, to) returns exactly the inclusive range, across read chunks."""
    log = backend.open()
    log.append([_ev(i) for i in range(2500)])
    assert [e.lsn for e in log.read(1000, 1002)] == [1000, 1001, 1002]
    assert [e.lsn for e in log.read(2499)] == [2499, 2500]
    assert len(list(log.read(2))) == 2499
    assert list(log.read(2501)) == []
    # From 0 or below reads from 1 (docs/DESIGN.md, "The event log"); `to` below `from`, none.
    assert [e.lsn for e in log.read(0, 2)] == [1, 2]
    assert [e.lsn for e in log.read(-5, 1)] == [1]
    assert list(log.read(5, 4)) == []
    log.close()


def test_chain_verifies(backend):
    """Every record's digest chains from GENESIS, 32 zero bytes (docs/DESIGN.md, "Stored
    events"), over the encoded bodies: each stored value is that digest then the body."""
    log = backend.open()
    log.append([_ev(i) for i in range(10)])
    digest = bytes(32)
    raw = list(log.read_raw())
    for (lsn, value), e in zip(raw, log.read(), strict=True):
        body = encode_body(e)
        digest = blake2b(digest + body, digest_size=32).digest()  # the spec, not `chain`
        assert value == digest + body, lsn
    assert len(raw) == 10
    assert log.verify() == 10
    assert log.verify(4) == 7
    log.close()


def test_reopen_keeps_everything(backend):
    """Closing and reopening keeps every event and continues the LSNs and the chain."""
    log = backend.open()
    log.append([_ev(i) for i in range(5)])
    log.close()
    log = backend.open()
    assert log.last_lsn() == 5
    assert log.append([_ev(5)]) == 6
    assert log.verify() == 6
    assert [e.data["cid"] for e in log.read()] == [f"c{i}" for i in range(6)]
    log.close()


def test_body_round_trip():
    """decode_body inverts encode_body, bytes stay bytes and str stays str."""
    ev = Event(7, 123, MESSAGE_ACCEPTED, "u", "d", {"body": b"\x00\xff", "cid": "x"})
    assert decode_body(encode_body(ev)) == ev


def _lmdb_raw(tmp_path, n):
    log = LmdbLog.open(str(tmp_path / "raw"))
    log.append([_ev(i) for i in range(n)])
    return log, log._env, log._db


def test_flipped_byte_is_detected(tmp_path):
    """A flipped byte anywhere in a record's value fails verification at that LSN."""
    log, env, db = _lmdb_raw(tmp_path, 6)
    with env.env.begin(write=True) as txn:
        value = bytearray(txn.get(lsn_key(4), db=db))
    for pos in (0, 31, 32, len(value) - 1):
        bad = bytearray(value)
        bad[pos] ^= 0x01
        with env.env.begin(write=True) as txn:
            txn.put(lsn_key(4), bytes(bad), db=db)
        with pytest.raises(CorruptLog) as info:
            log.verify()
        assert info.value.lsn == 4
    log.close()


def test_removed_record_is_detected(tmp_path):
    """A missing record fails verification at the missing LSN."""
    log, env, db = _lmdb_raw(tmp_path, 6)
    with env.env.begin(write=True) as txn:
        txn.delete(lsn_key(3), db=db)
    with pytest.raises(CorruptLog) as info:
        log.verify()
    assert info.value.lsn == 3
    log.close()


def test_reordered_records_are_detected(tmp_path):
    """Two swapped records fail verification at the first of them."""
    log, env, db = _lmdb_raw(tmp_path, 6)
    with env.env.begin(write=True) as txn:
        a, b = txn.get(lsn_key(2), db=db), txn.get(lsn_key(3), db=db)
        txn.put(lsn_key(2), b, db=db)
        txn.put(lsn_key(3), a, db=db)
    with pytest.raises(CorruptLog) as info:
        log.verify()
    assert info.value.lsn == 2
    log.close()


def test_second_writer_is_refused(tmp_path):
    """A second writer on the same directory gets DataDirLocked, naming the process that holds
    it; a read-only open in another process works while the writer runs."""
    path = str(tmp_path / "x")
    log = LmdbLog.open(path)
    log.append([_ev(0), _ev(1)])
    with pytest.raises(DataDirLocked) as refused:
        LmdbLog.open(path)
    assert refused.value.holder == os.getpid()
    assert f"is locked by process {os.getpid()} " in str(refused.value)
    script = (
        "import sys; from storage.lmdb_log import LmdbLog\n"
        "r = LmdbLog.open(sys.argv[1], readonly=True)\n"
        "print(r.last_lsn(), r.verify()); r.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.splitlines()[-2].split() == ["2", "2"]
    log.close()


def test_a_new_data_directory_is_for_its_owner_only(tmp_path):
    """Messages are in the data directory: a new one is made 0700 and its files 0600, so other
    local users cannot read them (an existing directory's modes are left as they are)."""
    import stat

    from storage.store import Store

    store = Store.open(str(tmp_path / "data"))
    store.close()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").iterdir()}
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert modes and all(m & 0o077 == 0 for m in modes.values()), modes
