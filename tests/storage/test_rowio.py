"""A batch's rows through storage/_rowio.c against py-lmdb's own API (storage/rowio.py).

The compiled functions read py-lmdb's objects by a known layout: these tests check that they
write and read exactly what py-lmdb does, raise py-lmdb's exceptions, refuse objects they do
not know, and that the store uses them where they were built.
"""

from __future__ import annotations

import array
import os
import random
import struct
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import storage
from storage import native, rowio
from storage.commands import SendMessage
from storage.rowio import Rows
from storage.store import Store

compiled_only = pytest.mark.skipif(rowio.ext is None, reason="storage._rowio not in use here")


def open_env(path: Path, map_size: int = 1 << 24) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=map_size, max_dbs=4, sync=False)


def rows_for(env: lmdb.Environment, db, compiled: bool) -> Rows:
    rows = Rows(env)
    with env.begin(write=True) as txn:
        assert rows.check(txn, [db]) is (rowio.ext is not None)
    rows.compiled = compiled
    return rows


def dump(env: lmdb.Environment, db) -> list[tuple[bytes, bytes]]:
    with env.begin() as txn:
        return list(txn.cursor(db=db))


def test_the_built_module_is_the_one_that_runs():
    """Where the install built storage/_rowio.c for the py-lmdb it was written against, it
    loads and the store writes through it (a mismatch would fall back quietly)."""
    built = [p for p in Path(storage.__file__).parent.glob("_rowio.*")
             if p.suffix in (".so", ".pyd")]
    if not built or os.environ.get("HOMING_PURE_PYTHON") or lmdb.__version__ != rowio.LAYOUT_OF:
        pytest.skip("storage._rowio is not built here, turned off, or for another py-lmdb")
    assert rowio.ext is not None and rowio.ext.VERSION == rowio.VERSION
    assert rowio.describe() == "compiled"


@compiled_only
def test_the_store_writes_through_it(tmp_path):
    store = Store.open(str(tmp_path / "data"))
    try:
        store.execute([SendMessage("ann", "d", "user", "c1", "hi", to="bob")])
        assert store._rows.compiled
        assert store.check_projections() is None
        assert store.verify_log() == store.last_lsn()
    finally:
        store.close()


keys = st.binary(min_size=1, max_size=12)
batches = st.lists(st.dictionaries(keys, st.one_of(st.none(), st.binary(max_size=300)),
                                   max_size=40), min_size=1, max_size=6)


@compiled_only
@settings(max_examples=60, deadline=None)
@given(batches=batches, lookups=st.lists(keys, max_size=20))
def test_puts_deletes_and_gets_equal_py_lmdbs(tmp_path_factory, batches, lookups):
    """Random batches of puts and deletes (of stored and absent keys), each in one write
    transaction: both ways leave the same rows and read the same values, in and after it."""
    results = []
    for compiled in (True, False):
        env = open_env(tmp_path_factory.mktemp("env"))
        db = env.open_db(b"t")
        rows = rows_for(env, db, compiled)
        seen = []
        for changes in batches:
            with env.begin(write=True) as txn:
                rows.put_rows(txn, db, dict(changes))
                seen.append([rows.get(txn, db, k) for k in lookups])
        results.append((dump(env, db), seen))
        env.close()
    assert results[0] == results[1]


@compiled_only
@pytest.mark.parametrize("seed", range(3))
def test_puts_and_deletes_across_many_pages_equal_py_lmdbs(tmp_path, seed):
    """Batches of thousands of puts and deletes over a table of hundreds of pages, written in
    key order through one cursor: keys between stored ones, overwrites that grow and shrink
    their values (pages split), deletes of stored and absent keys (pages merge), runs of each
    on one leaf and jumps across many. Both ways leave the same rows."""
    rng = random.Random(seed)
    stored = {b"k%06d" % (i * 4): bytes(rng.randrange(1, 300)) for i in range(5000)}
    batches = [stored]
    for _ in range(4):
        changes: dict[bytes, bytes | None] = {}
        for _ in range(3000):
            key = b"k%06d" % rng.randrange(0, 20400)
            if rng.random() < 0.35:
                changes[key] = None
            else:
                changes[key] = rng.randbytes(rng.choice((0, 8, 200, 1500)))
        batches.append(changes)
    dumps = []
    for compiled in (True, False):
        env = open_env(tmp_path / str(compiled), map_size=1 << 27)
        db = env.open_db(b"t")
        rows = rows_for(env, db, compiled)
        for changes in batches:
            with env.begin(write=True) as txn:
                rows.put_rows(txn, db, changes)
        dumps.append(dump(env, db))
        env.close()
    assert dumps[0] == dumps[1]
    assert len(dumps[0]) > 4000  # still a table of many pages after the deletes


@compiled_only
def test_a_delete_in_a_dupsort_table_takes_every_value_of_its_key(tmp_path):
    """A delete is `mdb_del(key, NULL)`'s: the key with all its values, as py-lmdb's
    `delete(key)` (homing's tables are not MDB_DUPSORT; the compiled delete must not differ
    on one that is)."""
    dumps = []
    for compiled in (True, False):
        env = open_env(tmp_path / str(compiled))
        db = env.open_db(b"dups", dupsort=True)
        rows = rows_for(env, db, compiled)
        with env.begin(write=True) as txn:
            for key in (b"a", b"b", b"c"):
                for value in (b"1", b"2", b"3"):
                    txn.put(key, value, db=db)
            rows.put_rows(txn, db, {b"b": None, b"x": None})
        dumps.append(dump(env, db))
        env.close()
    assert dumps[0] == dumps[1]
    assert [k for k, _ in dumps[0]] == [b"a"] * 3 + [b"c"] * 3


@compiled_only
def test_append_rows_equals_putmulti_append(tmp_path):
    records = [(i.to_bytes(8, "big"), os.urandom(i % 50 + 1)) for i in range(1, 2000)]
    dumps = []
    for compiled in (True, False):
        env = open_env(tmp_path / str(compiled))
        db = env.open_db(b"log")
        rows = rows_for(env, db, compiled)
        for start in range(0, len(records), 300):
            with env.begin(write=True) as txn:
                rows.append_rows(txn, db, records[start:start + 300])
        dumps.append(dump(env, db))
        env.close()
    assert dumps[0] == dumps[1] == records


def sorted_rows_of(rows: list[tuple[bytes, bytes]]):
    """`rows` in a rebuild's `_fold.SortedRows` (taken in key order)."""
    buffered = native.ext.Rows()
    for key, value in rows:
        buffered.append(key, value)
    return buffered.take_sorted()


@compiled_only
@pytest.mark.skipif(native.ext is None, reason="storage._fold not in use here")
@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=40), st.binary(max_size=300),
                       max_size=300))
def test_append_packed_equals_putmulti_append(tmp_path_factory, table):
    """A rebuild's packed rows (`SortedRows.packed()`, written by `append_packed` without an
    object a row) go in as py-lmdb's appending putmulti writes the same rows."""
    dumps = []
    for compiled in (True, False):
        env = open_env(tmp_path_factory.mktemp("packed"))
        db = env.open_db(b"t")
        rows = rows_for(env, db, compiled)
        with env.begin(write=True) as txn:
            rows.append_rows(txn, db, sorted_rows_of(list(table.items())))
        dumps.append(dump(env, db))
        env.close()
    assert dumps[0] == dumps[1] == sorted(table.items())


@compiled_only
@pytest.mark.skipif(native.ext is None, reason="storage._fold not in use here")
def test_append_packed_refuses_what_is_not_a_record(tmp_path):
    """A key not above the last raises KeyExistsError after the rows before it went in; an
    offset outside `data`, a record running past its end, or `order` not of whole aligned
    int64s raise ValueError, and nothing outside `data` is read."""
    env = open_env(tmp_path)
    db = env.open_db(b"t")
    rows_for(env, db, True)
    twice = sorted_rows_of([(b"a", b"1"), (b"b", b"2"), (b"b", b"3"), (b"c", b"4")])
    with env.begin(write=True) as txn:
        with pytest.raises(lmdb.KeyExistsError):
            rowio.ext.append_packed(txn, db, *twice.packed())
        assert list(txn.cursor(db=db)) == [(b"a", b"1"), (b"b", b"2")]
        txn.abort()
    record = struct.pack("=II", 1, 2) + b"kvv"  # key b"k", value b"vv"
    order = array.array("q", [0])
    with env.begin(write=True) as txn:
        for data, offsets in [(record, array.array("q", [len(record)])),
                              (record, array.array("q", [-1])),
                              (record[:-1], order),
                              (struct.pack("=II", 1, 2**32 - 1) + b"kvv", order)]:
            with pytest.raises(ValueError, match="not inside data"):
                rowio.ext.append_packed(txn, db, data, offsets)
        for offsets in [order.tobytes()[:7], memoryview(bytearray(9))[1:]]:
            with pytest.raises(ValueError, match="aligned native int64"):
                rowio.ext.append_packed(txn, db, record, offsets)
        rowio.ext.append_packed(txn, db, record, order)
        assert list(txn.cursor(db=db)) == [(b"k", b"vv")]
    env.close()


@compiled_only
def test_errors_are_py_lmdbs(tmp_path):
    """A full map raises MapFullError (the store grows the map on it), an append below the last
    key KeyExistsError; a committed or read-only transaction, or a database of another
    environment, BadTxnError; arguments of other types TypeError."""
    env = open_env(tmp_path, map_size=64 * 1024)
    db = env.open_db(b"t")
    rows = rows_for(env, db, True)
    with pytest.raises(lmdb.MapFullError) as full:
        with env.begin(write=True) as txn:
            rows.put_rows(txn, db, {i.to_bytes(4, "big"): bytes(500) for i in range(1000)})
    assert full.value.code == -30792 and "mdb_put" in str(full.value)
    with env.begin(write=True) as txn:
        rows.append_rows(txn, db, [(b"b", b"1")])
    with pytest.raises(lmdb.KeyExistsError), env.begin(write=True) as txn:
        rows.append_rows(txn, db, [(b"a", b"1")])
    txn = env.begin(write=True)
    txn.commit()
    with pytest.raises(lmdb.BadTxnError):
        rows.get(txn, db, b"b")
    other = open_env(tmp_path / "other")
    foreign = other.open_db(b"t")
    with env.begin() as ro, pytest.raises(lmdb.BadTxnError):
        rowio.ext.get(ro, db, b"b")  # only write transactions
    with env.begin(write=True) as txn:
        with pytest.raises(lmdb.BadTxnError):
            rowio.ext.put_rows(txn, foreign, [b"k"], {b"k": b"v"})  # another environment's
        with pytest.raises(TypeError):
            rowio.ext.get(db, txn, b"b")
        with pytest.raises(TypeError):
            rowio.ext.append_rows(txn, db)
        with pytest.raises(TypeError):
            rows.put_rows(txn, db, {b"k": "text"})
        with pytest.raises(TypeError):
            rows.append_rows(txn, db, [(b"k",)])
        with pytest.raises(TypeError):
            rows.get(txn, db, "k")
    assert dump(env, db) == [(b"b", b"1")] and dump(other, foreign) == []
    env.close()
    other.close()


@compiled_only
def test_other_threads_run_while_a_tables_puts_go_in(tmp_path):
    """The puts of a table of 32 rows or more run with the GIL released (the trio thread runs
    meanwhile: +1.6 % throughput in 11 alternating pairs, docs/BENCHMARKS-JOURNAL.md); fewer
    keep it. Told by a thread that counts while the GIL is free to it: across a call that holds
    the GIL throughout, its count cannot move."""
    import sys
    import threading

    env = open_env(tmp_path, map_size=1 << 30)
    db = env.open_db(b"t")
    rows = rows_for(env, db, True)
    count, stop = [0], threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1

    many = {i.to_bytes(8, "big"): bytes(64) for i in range(300_000)}
    few = {i.to_bytes(8, "big"): bytes(64) for i in range(31)}
    # A switch interval far longer than the few microseconds of the call of few rows: the
    # interpreter does not hand the GIL over around it on its own.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    thread = threading.Thread(target=counter)
    thread.start()
    try:
        with env.begin(write=True) as txn:
            before = count[0]
            rows.put_rows(txn, db, few)
            held = count[0] - before
            before = count[0]
            rows.put_rows(txn, db, many)
            released = count[0] - before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert held == 0 and released > 0, (held, released)
    with env.begin() as txn:
        assert txn.stat(db)["entries"] == 300_000
    env.close()


@compiled_only
def test_a_cursor_sees_rows_put_after_it_was_placed(tmp_path):
    """py-lmdb's cursors re-read their position after a change in their transaction; the
    compiled puts count as changes."""
    env = open_env(tmp_path)
    db = env.open_db(b"t")
    rows = rows_for(env, db, True)
    with env.begin(write=True) as txn:
        rows.put_rows(txn, db, {b"a": b"1", b"c": b"3" * 50})
        cur = txn.cursor(db=db)
        assert cur.set_key(b"c")
        rows.put_rows(txn, db, {b"c": b"x" * 10})  # the row changes size: its value moves
        assert (cur.key(), cur.value()) == (b"c", b"x" * 10)
        # Enough rows before `c` to split its page: its row moves again.
        rows.put_rows(txn, db, {b"b%04d" % i: bytes(100) for i in range(300)})
        assert (cur.key(), cur.value()) == (b"c", b"x" * 10)
        assert list(cur.iterprev(keys=True, values=False))[:2] == [b"c", b"b0299"]
    env.close()


@compiled_only
def test_check_refuses_what_it_does_not_know(tmp_path):
    """Only a live write transaction of the environment and that environment's databases pass;
    otherwise the rows go through py-lmdb, and the store says so in its log."""
    env, other = open_env(tmp_path / "a"), open_env(tmp_path / "b")
    db, foreign = env.open_db(b"t"), other.open_db(b"t")
    version = lmdb.version()
    with env.begin(write=True) as txn:
        assert rowio.ext.check(env, txn, db, txn.id(), version)
        assert not rowio.ext.check(env, txn, foreign, txn.id(), version)
        assert not rowio.ext.check(other, txn, db, txn.id(), version)
        assert not rowio.ext.check(env, txn, db, txn.id() + 1, version)
        assert not rowio.ext.check(env, txn, db, txn.id(), (0, 0, 1))
    with env.begin() as ro:
        assert not rowio.ext.check(env, ro, db, ro.id(), version)
    rows = Rows(env)
    with env.begin(write=True) as txn, capture_logs() as logs:
        assert not rows.check(txn, [db, foreign])
        rows.put_rows(txn, db, {b"k": b"v"})  # through py-lmdb
    assert not rows.compiled and dump(env, db) == [(b"k", b"v")]
    assert [e["event"] for e in logs] == ["storage_rows_unchecked"]
    env.close()
    other.close()
