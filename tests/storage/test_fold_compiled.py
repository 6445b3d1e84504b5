"""The compiled hot loops (storage/_fold.c) against their Python reference.

Where the extension is not built (no C compiler; or HOMING_PURE_PYTHON=1) these tests are
skipped: everything then runs the Python versions, which the rest of the suite covers.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap

import hypothesis.strategies as st
import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings

from storage import native
from storage.commands import SendMessage
from storage.errors import CorruptLog
from storage.fold import fold
from storage.log import record_fault
from storage.memory_tables import ListedTable, MemoryTables, keyed_rows_digest, sorted_rows
from storage.projections import key2, py_add_message
from storage.records import MAX_TS_US
from storage.store import Store
from storage.tables import APPEND_ONLY

from .test_model import command_spec, run_batch

pytestmark = pytest.mark.skipif(native.ext is None, reason="storage._fold is not built")

KEY = bytes(range(16))
MASK = (1 << 64) - 1


# ---------------------------------------------------------------- the keyed digest


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4, from the paper (Aumasson and Bernstein, 2012), in plain Python."""

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & MASK

    def rounds(v: list[int], n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & MASK
            v[1] = rotl(v[1], 13) ^ v[0]
            v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & MASK
            v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & MASK
            v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & MASK
            v[1] = rotl(v[1], 17) ^ v[2]
            v[2] = rotl(v[2], 32)

    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261,
         k1 ^ 0x7465646279746573]
    tail = len(data) % 8
    for i in range(0, len(data) - tail, 8):
        (m,) = struct.unpack_from("<Q", data, i)
        v[3] ^= m
        rounds(v, 2)
        v[0] ^= m
    m = (len(data) & 0xFF) << 56
    for i, byte in enumerate(data[len(data) - tail:]):
        m |= byte << (8 * i)
    v[3] ^= m
    rounds(v, 2)
    v[0] ^= m
    v[2] ^= 0xFF
    rounds(v, 4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def test_siphash_reference_vectors():
    assert siphash24(KEY, b"") == 0x726FDB47DD0E0E31
    assert siphash24(KEY, bytes(range(15))) == 0xA129CA6149BE45E5


rows = st.lists(st.tuples(st.binary(max_size=70), st.binary(max_size=70)), max_size=20)


@given(rows)
def test_rows_digest_is_the_keyed_sum(rows):
    """`(count, sum of SipHash-2-4(len(k) || k || v) mod 2**64)`, in any order."""
    expected = sum(siphash24(KEY, struct.pack(">I", len(k)) + k + v) for k, v in rows) & MASK
    assert keyed_rows_digest(rows, KEY) == (len(rows), expected)
    assert keyed_rows_digest(reversed(rows), KEY) == (len(rows), expected)


def test_rows_digest_sees_where_key_ends():
    assert keyed_rows_digest([(b"ab", b"c")], KEY) != keyed_rows_digest([(b"a", b"bc")], KEY)


# ---------------------------------------------------------------- folds on real logs


def _log(batches) -> tuple[str, Store]:
    path = tempfile.mkdtemp(prefix="homing-fold-")
    store = Store.open(path, map_size=256 * 1024)
    convs = ["grp:0000000000000000"]
    for specs in batches:
        run_batch(store, specs, convs)
    return path, store


batches = st.lists(st.lists(command_spec, min_size=1, max_size=8), min_size=1, max_size=12)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.data())
def test_compiled_fold_writes_what_python_writes(batches, data):
    """On random logs: the compiled fold == the Python fold, to any stopping point and with
    chunks of any size; and the rows the store's live path wrote (compiled add_message) == a
    Python-only replay."""
    path, store = _log(batches)
    try:
        records = list(store.log.read_raw())
        last = store.last_lsn()
        to_lsn = data.draw(st.one_of(st.none(), st.integers(-1, last + 1), st.just(1 << 70)))
        stamps = [msgpack.unpackb(value[32:])[1] for _, value in records] or [0]
        until_us = data.draw(st.one_of(st.none(), st.just(-1), st.sampled_from(stamps)))
        chunk = data.draw(st.integers(1, 10))
        fast, slow = MemoryTables(), MemoryTables()
        fast_chunks: list[int] = []
        slow_chunks: list[int] = []
        assert (fold(fast, records, to_lsn=to_lsn, until_us=until_us, compiled=True,
                     chunk=chunk, on_chunk=fast_chunks.append) ==
                fold(slow, records, to_lsn=to_lsn, until_us=until_us, compiled=False,
                     chunk=chunk, on_chunk=slow_chunks.append))
        assert fast.items() == slow.items()
        assert fast_chunks == slow_chunks

        python_replay = MemoryTables()
        fold(python_replay, records, compiled=False)
        assert store.dump_projections() == python_replay.items()
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
def test_compiled_digest_fold_counts_every_row(batches):
    """Rows the compiled loop digests directly, plus those that went through the dict, give the
    digest of all the rows a plain replay writes."""
    path, store = _log(batches)
    try:
        records = list(store.log.read_raw())
        digested = frozenset({"msg", "inbox", "idem"})
        tables, plain = MemoryTables(digested, KEY), MemoryTables()
        fold(tables, records, chunk=4,
             on_chunk=lambda _: [tables.data[t].fold() for t in digested])
        fold(plain, records, compiled=False)
        for name in digested:
            tables.data[name].fold()
            assert (tables.data[name].rows, tables.data[name].digest) == \
                keyed_rows_digest(plain.data[name].items(), KEY)
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.integers(1, 10))
def test_listed_fold_writes_what_the_dict_fold_writes(batches, chunk):
    """A rebuild's fold, whose append-only rows go to `Rows` buffers, ends with the rows of a
    fold into dicts; and `sorted_rows` takes them out in key order."""
    path, store = _log(batches)
    try:
        records = list(store.log.read_raw())
        listed, read, plain = (MemoryTables(listed=APPEND_ONLY), MemoryTables(listed=APPEND_ONLY),
                               MemoryTables())
        assert (fold(listed, records, chunk=chunk) == fold(read, records, chunk=chunk) ==
                fold(plain, records, compiled=False))
        assert read.items() == plain.items()
        for name in APPEND_ONLY:
            assert isinstance(listed.data[name], ListedTable)
            assert list(sorted_rows(listed.data[name])) == sorted(plain.data[name].items())
            assert not len(listed.data[name])  # taken out
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


keys = st.binary(max_size=40)


@given(st.lists(st.tuples(keys, st.binary(max_size=40)), max_size=60), st.data())
def test_rows_sort_like_a_stable_sort_by_key(rows, data):
    """`Rows` keeps rows in write order and sorts them as a stable sort by key would: keys of
    any length, sharing any prefix (past the 24 bytes kept in the index too), repeated."""
    for _ in range(data.draw(st.integers(0, 5))):  # repeat some keys
        if rows:
            rows.append((data.draw(st.sampled_from(rows))[0], data.draw(st.binary(max_size=5))))
    long = data.draw(st.binary(min_size=16, max_size=28))
    rows += [(long + k, b"x") for k in data.draw(st.lists(keys, max_size=4))]
    buffered = native.ext.Rows()
    for key, value in rows:
        buffered.append(key, value)
    assert len(buffered) == len(rows)
    assert buffered.items() == rows
    taken = buffered.take_sorted()
    assert (len(buffered), buffered.items(), list(buffered.take_sorted())) == (0, [], [])
    del buffered  # the sorted rows own the buffer now
    assert len(taken) == len(rows)
    assert list(taken) == list(taken) == sorted(rows, key=lambda row: row[0])
    cleared = native.ext.Rows()
    cleared.append(b"k", b"v")
    cleared.clear()
    assert (len(cleared), cleared.items()) == (0, [])


@pytest.mark.parametrize("seed", range(4))
def test_many_rows_sort_like_a_stable_sort_by_key(seed):
    """Thousands of rows, as a rebuild's tables hold them: runs already in key order (a
    conversation's seqs) interleaved, keys sharing 16 to 30 bytes, differing only in trailing
    zero bytes or in length, and repeated; sorted as a stable sort by key would."""
    rnd = random.Random(seed)
    heads = [rnd.randbytes(rnd.choice((3, 16, 23, 24, 25, 30))) for _ in range(12)]
    seqs = [0] * len(heads)
    rows = []
    for n in range(rnd.randrange(2_000, 6_000)):
        g = rnd.randrange(len(heads))
        x = rnd.random()
        if x < 0.7:  # the next of a run in order
            seqs[g] += rnd.randrange(1, 300)
            key = heads[g] + seqs[g].to_bytes(8, "big")
        elif x < 0.8:  # a head alone, or with zero bytes after it
            key = heads[g] + bytes(rnd.randrange(3))
        elif x < 0.9 and rows:  # a key again
            key = rnd.choice(rows)[0]
        else:
            key = heads[g][:rnd.randrange(len(heads[g]) + 1)] + rnd.randbytes(rnd.randrange(4))
        rows.append((key, n.to_bytes(4, "big")))
    buffered = native.ext.Rows()
    for key, value in rows:
        buffered.append(key, value)
    assert list(buffered.take_sorted()) == sorted(rows, key=lambda row: row[0])


def test_transient_rows_reuse_one_pair_only_while_nobody_else_holds_it(tmp_path):
    """`SortedRows.transient()` hands out the same pair of buffers for each row when the last
    one was let go (as putmulti does); a pair or view kept elsewhere is never changed, and stays
    readable after the rows and the iterator are gone. An appending putmulti of it writes what
    one of bytes pairs writes."""
    rows = [(b"k%03d" % (i * 7 % 100), b"v" * (i % 5) + b"%d" % i) for i in range(100)]

    def taken():
        buffered = native.ext.Rows()
        for key, value in rows:
            buffered.append(key, value)
        return buffered.take_sorted()

    expected = sorted(rows)
    it = taken().transient()
    first = next(it)
    first_id, first_row = id(first), (bytes(first[0]), bytes(first[1]))
    del first
    second = next(it)  # the first pair, pointed at the next row
    assert id(second) == first_id and (bytes(second[0]), bytes(second[1])) == expected[1]
    key_view = second[0]  # a view held elsewhere: the pair is left alone
    del second
    third = next(it)
    assert id(third) != first_id and bytes(key_view) == expected[1][0]
    kept = [third, *it]  # every pair held: each is its own
    del it
    assert [first_row, expected[1]] + [(bytes(k), bytes(v)) for k, v in kept] == expected
    assert memoryview(kept[-1][1]).readonly and bytes(key_view) == expected[1][0]

    env = lmdb.open(str(tmp_path), max_dbs=2)
    plain, transient = env.open_db(b"plain"), env.open_db(b"transient")
    with env.begin(write=True) as txn:
        in_order = taken()
        assert txn.cursor(db=plain).putmulti(in_order, append=True) == (100, 100)
        assert txn.cursor(db=transient).putmulti(in_order.transient(), append=True) == (100, 100)
    with env.begin() as txn:
        assert list(txn.cursor(db=plain)) == list(txn.cursor(db=transient)) == expected
    env.close()


def test_a_listed_table_reads_and_writes_as_a_dict():
    """Whatever touches a ListedTable from Python sees its buffered rows, and later writes win."""
    table = ListedTable()
    table.rows.append(b"a", b"1")
    table.rows.append(b"b", b"2")
    assert table[b"a"] == b"1" and table[b"z"] is None and not len(table.rows)
    table.rows.append(b"a", b"3")  # a later write of `a`, by the compiled loop
    assert b"a" in table and table.get(b"a") == b"3" and len(table) == 2
    table.rows.append(b"c", b"4")
    table[b"c"] = b"5"
    table.rows.append(b"d", b"6")
    assert sorted(table.items()) == [(b"a", b"3"), (b"b", b"2"), (b"c", b"5"), (b"d", b"6")]
    table.rows.append(b"e", b"7")
    table.delete(b"e")
    assert table.range(b"") == [(b"a", b"3"), (b"b", b"2"), (b"c", b"5"), (b"d", b"6")]
    assert table.sorted_rows() == [(b"a", b"3"), (b"b", b"2"), (b"c", b"5"), (b"d", b"6")]
    assert len(table) == 0
    table.rows.append(b"b", b"7")  # all rows from the compiled loop: sorted in C
    table.rows.append(b"a", b"8")
    assert list(table.sorted_rows()) == [(b"a", b"8"), (b"b", b"7")]
    assert len(table) == 0


def test_rebuild_keeps_the_later_row_of_a_key_written_twice(tmp_path):
    """A log no broker writes (the same cid sent twice): the rebuild still ends like a fold into
    dicts, where the later write of the idempotency row wins."""
    store = Store.open(str(tmp_path))
    try:
        store.execute([SendMessage("ann", "d1", "user", "c1", "hi", to="bob")])
        conv = store.user_convs("ann")[0]
        store.log.append([(2000, "message.accepted", "ann", "d1",
                           {"conv": conv, "cid": "c1", "body": "again"})])
        assert store.rebuild() == store.last_lsn()
        python_replay = MemoryTables()
        fold(python_replay, list(store.log.read_raw()), compiled=False)
        assert store.dump_projections() == python_replay.items()
        idem = [row for row in python_replay.items() if row[0] == "idem"]
        assert len(idem) == 1 and idem[0][2][:8] == (2).to_bytes(8, "big")  # seq 2: the later
    finally:
        store.close()


# ---------------------------------------------------------------- records the parser hands back


def _record(*fields, raw: bytes | None = None) -> tuple[int, bytes]:
    body = raw if raw is not None else msgpack.packb(list(fields), use_bin_type=True)
    return (0, bytes(32) + body)


def _message(lsn, conv="grp:a", cid="c1", user="ann", **extra):
    return _record(lsn, 1000 + lsn, "message.accepted", user, "d1",
                   {"conv": conv, "cid": cid, "body": "hi", **extra})


def _members(tables: MemoryTables, conv: str) -> None:
    for user in ("ann", "bob"):
        tables.member[key2(conv, user)] = b"member"
        tables.user_conv[key2(user, conv)] = b""


def _both(records):
    """Fold `records` both ways; return what each ended with: `(result, rows)`, or the type of
    the error it raised (a fold that raised leaves its tables unspecified)."""
    results = []
    for compiled in (True, False):
        tables = MemoryTables()
        for conv in ("grp:a", "grp:" + "x" * 40, "grp:" + "y" * 300):
            _members(tables, conv)
        try:
            results.append((fold(tables, records, compiled=compiled), tables.items()))
        except Exception as exc:  # the same error either way is the point
            results.append(type(exc))
    return results


def _signed(n: int) -> bytes:
    return b"\xd3" + struct.pack(">q", n)


ODD_RECORDS = {
    "plain": [_message(1), _message(2, cid="c2")],
    "long conv names (str8, str16)": [_message(1, conv="grp:" + "x" * 40),
                                      _message(2, conv="grp:" + "y" * 300)],
    "extra keys of every type": [_message(1, to=None, n=-5, f=1.5, big=2**40, neg=-2**40,
                                          nested={"a": [1, {"b": b"\x00"}]}, t=True,
                                          ext=msgpack.ExtType(5, b"abcdef"))],
    "ids as bin": [_record(1, 1001, b"message.accepted", b"ann", b"d1",
                           {b"conv": b"grp:a", b"cid": b"c1"})],
    "signed ints": [_record(raw=b"\x96" + _signed(1) + _signed(1001) +
                            msgpack.packb(["message.accepted", "ann", "d1",
                                           {"conv": "grp:a", "cid": "c1", "body": "hi"}])[1:])],
    "duplicate conv key": [_record(raw=b"\x96\x01\xcd\x03\xe9" +
                                   msgpack.packb("message.accepted") + msgpack.packb("ann") +
                                   msgpack.packb("d1") + b"\x84" + msgpack.packb("conv") +
                                   msgpack.packb("grp:b") + msgpack.packb("cid") +
                                   msgpack.packb("c1") + msgpack.packb("conv") +
                                   msgpack.packb("grp:a") + msgpack.packb("body") +
                                   msgpack.packb("hi"))],
    "no cid": [_record(1, 1001, "message.accepted", "ann", "d1", {"conv": "grp:a"})],
    "conv not UTF-8": [_record(1, 1001, "message.accepted", "ann", "d1",
                               {"conv": b"grp:\xff", "cid": "c1"})],
    "trailing bytes": [_record(raw=msgpack.packb(
        [1, 1001, "message.accepted", "ann", "d1", {"conv": "grp:a", "cid": "c1", "body": "hi"}])
        + b"\x00")],
    "truncated": [_record(raw=msgpack.packb(
        [1, 1001, "message.accepted", "ann", "d1", {"conv": "grp:a", "cid": "c1", "body": "hi"}]
    )[:-3])],
    "too short": [(0, b"\x00" * 10)],
    "five fields": [_record(1, 1001, "message.accepted", "ann", "d1")],
    # msgpack.unpackb refuses both (strict_map_key; a timestamp of 3 bytes): so must C
    "a map key that is not a string": [_message(1, extra=[1, {7: 1.5}])],
    "a timestamp ext of the wrong size": [_record(raw=msgpack.packb(
        [1, 1001, "message.accepted", "ann", "d1", {"conv": "grp:a", "cid": "c1", "ts": b"",
                                                     "body": "hi"}]
    ).replace(b"\xa2ts\xc4\x00", b"\xa2ts\xd4\xff\x00"))],
    "other event between": [_message(1),
                            _record(2, 1002, "read.marked", "bob", "d1",
                                    {"conv": "grp:a", "upto": 1}),
                            _message(3, cid="c3")],
}


def test_fold_messages_refuses_records_that_are_not_an_iterator():
    """`fold_messages` takes an iterator (`fold` passes `iter(records)`); given a list it must
    raise TypeError, not call the list's missing `tp_iternext` (a crash of the process). Run in
    a child, so that the crash fails this test rather than the whole run."""
    code = textwrap.dedent("""
        from storage import native
        from storage.projections import MemoryTables  # configures storage._fold
        try:
            native.ext.fold_messages([(0, bytes(40))], MemoryTables(), None, None, None, 1)
        except TypeError:
            print("TypeError")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, cwd=root, env=env)
    assert (child.returncode, child.stdout.strip()) == (0, "TypeError"), child.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(ODD_RECORDS))
def test_records_the_compiled_loop_hands_back_end_alike(name):
    """Odd encodings, damaged records and other events: the compiled loop leaves them to Python,
    so both folds write the same rows, or raise the same error."""
    compiled, python = _both(ODD_RECORDS[name])
    assert compiled == python


def test_compiled_add_message_rejects_a_bad_counter_like_python():
    for add in (native.ext.add_message, py_add_message):
        tables = MemoryTables()
        tables.conv_seq[b"grp:a"] = b"\x01"
        with pytest.raises(struct.error):
            add(tables, b"grp:a", "grp:a", b"ann", b"c1", 1, {})


@pytest.mark.parametrize("table", ["conv_seq", "inbox_head"])
def test_compiled_add_message_refuses_a_counter_at_its_end_like_python(table):
    """A counter row of 2**64 - 1 (a damaged row) has no next value: the Python version fails
    packing 2**64 (struct.error); the compiled one must fail too, not wrap around to 0 and write
    message 0 or inbox entry 0."""
    for add in (native.ext.add_message, py_add_message):
        tables = MemoryTables()
        _members(tables, "grp:a")
        getattr(tables, table)[b"grp:a" if table == "conv_seq" else b"bob"] = b"\xff" * 8
        with pytest.raises(struct.error):
            add(tables, b"grp:a", "grp:a", b"ann", b"c1", 1, {})
        assert not any(key.endswith(bytes(8)) for key in tables.msg)
        assert not any(key.endswith(bytes(8)) for key in tables.inbox)



EDGES = [0, 1, 126, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63]


@pytest.mark.parametrize("conv", ["grp:a", "grp:" + "x" * 40, "grp:" + "y" * 300,
                                  "grp:" + "z" * 70000, "grp:é✓"])
def test_compiled_add_message_packs_every_int_and_str_size(conv):
    """Inbox entries pack seq and lsn in each msgpack int width, and conv in each str width,
    byte for byte as the Python packer does."""
    for seq in EDGES:
        for lsn in EDGES[1:]:
            rows = []
            for add in (native.ext.add_message, py_add_message):
                tables = MemoryTables()
                _members(tables, conv)
                if seq:
                    tables.conv_seq[conv.encode()] = struct.pack(">Q", seq - 1)
                heads: dict[str, int] = {}
                result = add(tables, conv.encode(), conv, b"ann", b"c1", lsn, heads)
                rows.append((result, heads, tables.items()))
            assert rows[0] == rows[1], (seq, lsn)


SAMPLE = [_message(1), _message(2, conv="grp:" + "x" * 40, cid="c2", extra=[1, {"k": 1.5}]),
          _record(3, 1003, "read.marked", "bob", "d1", {"conv": "grp:a", "upto": 1}),
          _message(4, cid="c4", body=b"\x00\x01" * 40)]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_records_fold_alike(data):
    """Fuzz: flip, cut or insert bytes anywhere in a record's body; the compiled loop must
    never read out of bounds or crash, and must end like the Python fold (same rows or the
    same error)."""
    records = list(SAMPLE)
    ix = data.draw(st.integers(0, len(records) - 1))
    _, value = records[ix]
    body = bytearray(value[32:])
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        at = data.draw(st.integers(0, max(len(body) - 1, 0)))
        if op == "flip" and body:
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del body[at:at + data.draw(st.integers(1, 8))]
        elif op == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif body:
            body[at] = data.draw(st.sampled_from([0xC0, 0xC1, 0xD9, 0xDA, 0xDB, 0xDC, 0xDE,
                                                  0xDF, 0xC7, 0xD8, 0xFF, 0x9F, 0x8F]))
    records[ix] = (0, value[:32] + bytes(body))
    compiled, python = _both(records)
    assert compiled == python


def test_the_compiled_replay_leaves_long_ids_to_python_at_the_same_bound():
    """storage/_fold.c applies a message itself only when its ids add up to at most
    KEYS_FIT_BYTES; past that Python checks its keys fit LMDB's (records.key_fault). A C bound
    above Python's would let a key too long for LMDB through the compiled replay."""
    from storage.records import KEYS_FIT_BYTES

    assert native.ext.KEYS_FIT_BYTES == KEYS_FIT_BYTES


def _stamped(lsn: int, cid: str) -> tuple[int, bytes]:
    return _record(lsn, 1000, "message.accepted", "ann", "d1",
                   {"conv": "grp:a", "cid": cid, "body": "hi"})


def test_the_compiled_loop_takes_no_lsn_after_the_last_of_64_bits():
    """After a message of lsn 2**64 - 1 the next lsn is 2**64, which no record holds: the
    compiled loop's `next_lsn` (a u64) wrapped to 0 and applied a following record whose body
    says lsn 0 (`fold` returned lsn 0, applied 3), where the Python loop refuses it."""
    top = (1 << 64) - 1
    records = [_stamped(top - 1, "c1"), _stamped(top, "c2"), _stamped(0, "c3")]
    for compiled in (True, False):
        tables = MemoryTables()
        _members(tables, "grp:a")
        with pytest.raises(CorruptLog, match="body says lsn 0"):
            fold(tables, records, compiled=compiled, after=top - 2)
    tables = MemoryTables()
    _members(tables, "grp:a")
    applied, lsn, _ts, record, _exhausted = native.ext.fold_messages(
        iter(records[1:]), tables, None, None, None, 10, top)
    assert (applied, lsn, record) == (1, top, records[2])


@pytest.mark.parametrize("chunk", [1, 2, 8192])
@pytest.mark.parametrize("top_kind", ["message", "other event"])
def test_a_fold_ending_at_the_last_lsn_of_64_bits_ends_alike(chunk, top_kind):
    """A run ending at lsn 2**64 - 1 whose C loop was called once more after it (a chunk
    ending there, or that record an event Python applied) passed `next_lsn` 2**64 to it:
    OverflowError, where the Python loop folds the run."""
    top = (1 << 64) - 1
    last = (_stamped(top, "c2") if top_kind == "message" else
            _record(top, 1000, "read.marked", "bob", "d1", {"conv": "grp:a", "upto": 1}))
    records = [_stamped(top - 1, "c1"), last]
    results = []
    for compiled in (True, False):
        tables = MemoryTables()
        _members(tables, "grp:a")
        results.append((fold(tables, records, compiled=compiled, after=top - 2, chunk=chunk),
                        tables.items()))
    assert results[0] == results[1]
    assert results[0][0] == (top, 1000, 2)


# ---------------------------------------------------------------- records verify fails


def _odd(lsn: int, ts: object = 1001, type_: object = "message.accepted", user: object = "ann",
         device: object = "d1", **data: object) -> tuple[int, bytes]:
    """A message record (or, of another `type_`, its event) with fields replaced; `None` for a
    data field leaves it out; text `BAD`, `OVL`, `SUR` or `CUT` anywhere is packed as bytes no
    UTF-8 holds (a byte no UTF-8 starts with, an overlong `/`, a surrogate, the first byte of
    two)."""
    data = {k: v for k, v in {"conv": "grp:a", "cid": "c1", "body": "hi", **data}.items()
            if v is not None}
    body = msgpack.packb([lsn, ts, type_, user, device, data], use_bin_type=True)
    for text, raw in ((b"BAD", b"\xff\xfe\x01"), (b"OVL", b"a\xc0\xaf"),
                      (b"SUR", b"\xed\xa0\x80"), (b"CUT", b"ab\xc3")):
        body = body.replace(text, raw)
    return _record(raw=body)


MARK = {"type_": "read.marked", "cid": None, "body": None, "upto": 1}
VERIFY_FAILS = {
    "time -1": _odd(1, ts=-1), "time past MAX_TS_US": _odd(1, ts=MAX_TS_US + 1),
    "time 2**64 - 1": _odd(1, ts=(1 << 64) - 1), "time 1.5": _odd(1, ts=1.5),
    "time true": _odd(1, ts=True), "time of a mark -1": _odd(1, ts=-1, **MARK),
    "time of a mark past MAX_TS_US": _odd(1, ts=MAX_TS_US + 1, **MARK),
    "no body": _odd(1, body=None), "body 5": _odd(1, body=5), "body a list": _odd(1, body=[1]),
    "body false": _odd(1, body=False), "conv as bin": _odd(1, conv=b"grp:a"),
    "cid as bin": _odd(1, cid=b"c1"), "type as bin": _odd(1, type_=b"message.accepted"),
    "user as bin": _odd(1, user=b"ann"), "device as bin": _odd(1, device=b"d1"),
    "device a list": _odd(1, device=[1]), "user not UTF-8": _odd(1, user="BAD"),
    "device not UTF-8": _odd(1, device="BAD"), "body not UTF-8": _odd(1, body="BAD"),
    "cid not UTF-8": _odd(1, cid="BAD"), "a key not UTF-8": _odd(1, BAD=1),
    "a nested text not UTF-8": _odd(1, to=[{"x": "BAD"}]),
    "body not UTF-8 past 8 ASCII bytes": _odd(1, body="0123456789abcdefgBAD"),
    "body ending inside a character": _odd(1, body="0123456789CUT"),
    "an overlong character": _odd(1, body="0123456789OVL"),
    "a surrogate": _odd(1, cid="c-SUR"),
    "conv under a bin key": _record(raw=msgpack.packb(
        [1, 1001, "message.accepted", "ann", "d1", {b"conv": "grp:a", "cid": "c1", "body": "hi"}],
        use_bin_type=True)),
    "a mute of 1": _odd(1, type_="mute.set", cid=None, body=None, muted=1),
    "a create of kind 5": _odd(1, type_="conv.created", conv="grp:n", cid=None, body=None,
                               kind=5),
}
VERIFY_PASSES = {
    "body as bin": [_odd(1, body=b"\xff\x00")], "text not ASCII": [
        _odd(1, user="ännä", device="d\u00e9", cid="c\U0001f600", body="h\u00ef", to="\u4e2d")],
    "time 0 and MAX_TS_US": [_odd(1, ts=0), _odd(2, ts=MAX_TS_US, cid="c2")],
    "text not ASCII past 8 ASCII bytes": [_odd(1, body="0123456789abcdefg\u00e9\U0001f600")],
}


def test_the_compiled_replay_takes_no_time_past_the_same_bound():
    """storage/_fold.c applies a message itself only when its time is at most MAX_TS_US (the
    last a date holds); a C bound above Python's would apply a time verify fails."""
    assert native.ext.MAX_TS_US == MAX_TS_US


@pytest.mark.parametrize("name", sorted(VERIFY_FAILS))
def test_a_record_verify_fails_is_refused_alike_in_verify_words(name):
    """A record whose time no date holds, or whose ids, body or data field are of a kind (or
    text of bytes) homing never writes: `audit verify` fails it, and both replays applied it
    as it was (the compiled loop read ids and time as bytes and numbers of any kind, the
    Python loop read text as bytes and no body). Both now refuse it, at its LSN, in verify's
    words (`record_fault`), and the compiled loop hands it back rather than apply it."""
    record = VERIFY_FAILS[name]
    verdict = record_fault(1, record[1][32:])
    assert verdict is not None
    for compiled in (True, False):
        tables = MemoryTables()
        _members(tables, "grp:a")
        with pytest.raises(CorruptLog) as caught:
            fold(tables, [record], compiled=compiled)
        assert (caught.value.lsn, caught.value.reason) == (1, verdict.reason), compiled
    applied, *_ = native.ext.fold_messages(iter([record]), MemoryTables(), None, None, None,
                                           10, 1)
    assert applied == 0


@pytest.mark.parametrize("name", sorted(VERIFY_PASSES))
def test_records_verify_passes_are_applied_alike(name):
    """Bytes for a body, text beyond ASCII, the first and last time a date holds: verify
    passes them, and both replays apply them, the compiled loop itself, to the same rows."""
    records = VERIFY_PASSES[name]
    assert all(record_fault(i, v[32:]) is None for i, (_, v) in enumerate(records, 1))
    compiled, python = _both(records)
    assert compiled == python and compiled[0][2] == len(records)
    applied, *_ = native.ext.fold_messages(iter(records), MemoryTables(), None, None, None,
                                           10, 1)
    assert applied == len(records)
