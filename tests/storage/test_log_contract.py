"""The event log's contract (docs/DESIGN.md, "The event log"), where the first review found it
not kept: an append after someone else's, verify from past the end, records of the wrong shape,
and batch times in LSN order. Real LMDB in temporary directories."""

from __future__ import annotations

import threading
from itertools import pairwise

import lmdb
import msgpack
import pytest

from storage import rowio
from storage.commands import SendMessage
from storage.errors import CorruptLog, StorageError
from storage.lmdb_log import LmdbLog
from storage.log import MemoryLog
from storage.records import MESSAGE_ACCEPTED, chain, lsn_key
from storage.rowio import Rows
from storage.store import Store


def _ev(i: int):
    return (1_000 + i, MESSAGE_ACCEPTED, "alice", "d1",
            {"conv": "dm:alice:bob", "cid": f"c{i}", "body": f"m{i}"})


def _put_chained(env: lmdb.Environment, db, body_fields: list) -> int:
    """Append, behind the log's back, a correctly chained record with `body_fields` as its
    body; return its LSN."""
    with env.begin(write=True) as txn:
        cur = txn.cursor(db=db)
        if cur.last():
            lsn, prev = int.from_bytes(cur.key(), "big") + 1, cur.value()[:32]
        else:
            lsn, prev = 1, bytes(32)
        body = msgpack.packb([lsn, *body_fields], use_bin_type=True)
        txn.put(lsn_key(lsn), chain(prev, body) + body, db=db)
    return lsn


# ---------------------------------------------------------------- someone else appended


def test_append_after_someone_elses_record_refuses_instead_of_returning_its_lsn(tmp_path):
    """A record put at the LSN this log would assign next (another handle on the environment:
    someone else appended) must make `append` fail with nothing written. py-lmdb's
    `putmulti(append=True)` skips such a record silently, so `append` returned LSN 2 for an
    event that was never stored (LSN 2 is the other writer's)."""
    log = LmdbLog.open(str(tmp_path / "log"))
    assert log.append([_ev(0)]) == 1
    other = LmdbLog(log._env)  # a second writer's view, behind this one's back
    assert other.append([_ev(1)]) == 2
    with pytest.raises(StorageError):
        log.append([_ev(2)])
    assert [e.data["cid"] for e in log.read()] == ["c0", "c1"]
    assert log.verify() == 2
    log.close()


def test_rows_append_below_the_last_key_raises_on_py_lmdbs_path_too(tmp_path):
    """`Rows.append_rows` through py-lmdb (no compiled _rowio: another py-lmdb release, or
    HOMING_PURE_PYTHON=1) raises KeyExistsError for a row not above the last key, as the
    compiled path does, instead of leaving it out while the batch commits."""
    env = lmdb.open(str(tmp_path / "env"), map_size=1 << 24, max_dbs=4, sync=False)
    db = env.open_db(b"log")
    rows = Rows(env)  # never `check`ed: py-lmdb's public API
    assert not rows.compiled
    with env.begin(write=True) as txn:
        rows.append_rows(txn, db, [(lsn_key(1), b"a"), (lsn_key(2), b"b")])
    with pytest.raises(lmdb.KeyExistsError), env.begin(write=True) as txn:
        rows.append_rows(txn, db, [(lsn_key(2), b"mine"), (lsn_key(3), b"c")])
    with env.begin() as txn:
        assert list(txn.cursor(db=db)) == [(lsn_key(1), b"a"), (lsn_key(2), b"b")]
    env.close()


@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_after_a_foreign_record_fails_whole(tmp_path, compiled):
    """A record appended behind the broker's back: the next batch must fail as a whole (its
    send is not acknowledged), whichever way the rows are written; through py-lmdb the batch
    committed its projections and answered with the foreign record's LSN."""
    if compiled and rowio.ext is None:
        pytest.skip("storage._rowio not in use here")
    store = Store.open(str(tmp_path / "data"))
    try:
        if not compiled:  # rows through py-lmdb's API, as where _rowio is not built
            store._rows._checked = True
        [first] = store.execute([SendMessage("ann", "d", "user", "c1", "hi", to="bob")])
        assert first.error is None and store._rows.compiled is compiled
        lsn = _put_chained(store._env.env, store._dbs["log"],
                           [1, MESSAGE_ACCEPTED, "mallory", "d", {"conv": first.reply["conv"],
                                                                   "cid": "x", "body": "forged"}])
        head = store.inbox_head("bob")
        with pytest.raises(StorageError):
            store.execute([SendMessage("ann", "d", "user", "c2", "again", to="bob")])
        assert store.inbox_head("bob") == head  # nothing of the batch was committed
        [ev] = store.read_events(lsn, lsn)
        assert ev.user == "mallory"
    finally:
        store.close()


# ---------------------------------------------------------------- verify


@pytest.fixture(params=["lmdb", "memory"])
def log(request, tmp_path):
    log = LmdbLog.open(str(tmp_path / "log")) if request.param == "lmdb" else MemoryLog()
    yield log
    log.close()


def test_verify_from_past_the_end_checks_nothing(log):
    """Like `read`, `verify(from_lsn)` past the last LSN has nothing to check: 0 records. The
    LMDB log called a sound log corrupt ("record missing" at LSN from-1), the memory log raised
    IndexError."""
    log.append([_ev(i) for i in range(3)])
    assert log.verify(4) == 0
    assert log.verify(6) == 0
    assert log.verify(3) == 1


def test_read_raw_is_the_stored_records(log):
    """The audits verify and fold `read_raw`'s `(lsn, digest || body)`: every backend gives the
    same range as `read`, as the bytes it stored."""
    log.append([_ev(i) for i in range(4)])
    raw = list(log.read_raw(2, 3))
    assert [lsn for lsn, _ in raw] == [2, 3]
    assert [msgpack.unpackb(v[32:])[0] for _, v in raw] == [2, 3]
    assert [lsn for lsn, _ in log.read_raw(0, 1)] == [1] and list(log.read_raw(5)) == []
    assert log.verify() == 4


MALFORMED = {
    # name: body after the lsn, [ts_us, type, user, device, data]
    "type a list": [5, ["message.accepted"], "u", "d", {}],
    "type a map": [5, {"t": 1}, "u", "d", {}],
    "time a string": [" 5", MESSAGE_ACCEPTED, "u", "d", {"conv": "c", "cid": "i", "body": ""}],
    "actor a number": [5, MESSAGE_ACCEPTED, 7, "d", {"conv": "c", "cid": "i", "body": ""}],
    "data a list": [5, MESSAGE_ACCEPTED, "u", "d", ["conv", "c"]],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_verify_names_a_chained_record_of_the_wrong_shape(tmp_path, name):
    """A chained record no replay can read (written, with its digest, by something that is not
    this homing) fails `verify` at its LSN as a corrupt log, as one of an unknown event type
    does, instead of a TypeError (an unhashable type) or a pass (the next reader crashes)."""
    log = LmdbLog.open(str(tmp_path / "log"))
    log.append([_ev(0), _ev(1)])
    lsn = _put_chained(log._env.env, log._db, MALFORMED[name])
    with pytest.raises(CorruptLog) as info:
        log.verify()
    assert info.value.lsn == lsn == 3
    log.close()


# ---------------------------------------------------------------- timestamps


def test_batches_from_several_threads_get_times_in_lsn_order(tmp_path):
    """The replay's `until_us` (audit inbox --at) takes the log's times as non-decreasing (one
    clock, one writer). `execute` read the clock before waiting for the write lock, so with
    writers in several threads (which the store allows) a batch that waited committed after
    one that read the clock later: a later LSN with an earlier time."""
    store = Store.open(str(tmp_path / "data"))
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for b in range(30):
                store.execute([SendMessage(f"w{w}", "d", "user", f"{b}", "x", to="sink")])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        times = [e.ts_us for e in store.read_events()]
        back = [(i + 1, a, b) for i, (a, b) in enumerate(pairwise(times)) if b < a]
        assert not back, f"{len(back)} times go back, first at lsn {back[0][0] + 1}"
    finally:
        store.close()
