"""Projections behind the log are caught up on a writable open (`Store._catch_up`).

A directory whose log goes past `meta.applied_lsn` (put together from two backups; a backend
whose log lives elsewhere): a writable open folds the missing events into the stored
projections, in transactions of `CATCH_UP_EVENTS`, so that they equal a full rebuild; a
read-only open serves them as they are and says how far behind they are.

The directories are built for real: a backup of a store at lsn k (its projections), then the
original's records k+1..n put into the copy's `log` table with raw LMDB.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings

from storage import store as store_mod
from storage.commands import Ack, CreateConv, Invite, MarkRead, SendMessage
from storage.errors import CorruptLog
from storage.lmdb_env import MAX_DBS
from storage.projections import APPLIED_LSN
from storage.records import lsn_key, u64
from storage.store import Store
from tests.storage.test_model import LIMITS, command_spec, run_batch

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("catch_up_child.py")


def put_log_records(path: Path, records: list[tuple[int, bytes]]) -> None:
    """Put `records` (`(lsn, digest || body)`) into the `log` table of the directory at
    `path`, with raw LMDB (nothing of homing's write path)."""
    env = lmdb.open(str(path), max_dbs=MAX_DBS, map_size=1 << 30)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(write=True) as txn:
            for lsn, value in records:
                txn.put(lsn_key(lsn), value, db=db)
    finally:
        env.close()


def applied_lsn(path: Path) -> int:
    """The stored `meta.applied_lsn` of the directory at `path` (read-only)."""
    store = Store.open(path, readonly=True)
    try:
        return u64(store._get("meta", APPLIED_LSN))
    finally:
        store.close()


def chat(store: Store, rounds: int, tag: str) -> None:
    """Batches of every kind of event: creates, invites, sends, acks, read marks."""
    for r in range(rounds):
        (made,) = store.execute([CreateConv("ann", "d", "user", "group", f"g{tag}{r}", False,
                                            ("bob",), f"k{tag}{r}")])
        conv = made.reply["conv"]
        store.execute([Invite("ann", "d", "user", conv, "cat", "member")]
                      + [SendMessage(u, "d", "user", f"{tag}{r}-{i}", f"hi {i}", conv=conv)
                         for i, u in enumerate(["ann", "bob", "cat"] * 4)]
                      + [SendMessage("bob", "d", "user", f"{tag}{r}-dm", b"\0", to="dan")])
        store.execute([Ack("bob", "d", "user", store.inbox_head("bob")),
                       MarkRead("cat", "d", "user", conv, 5)])


def split_dirs(root: Path, before, after) -> tuple[Path, Path, int, int]:
    """`orig`, where `before(store)` then `after(store)` ran, and `behind`: a backup of `orig`
    taken between the two, with the log records `after` wrote put into its log. Returns the
    two paths, k (the backup's last lsn) and n (the original's)."""
    orig, behind = root / "orig", root / "behind"
    behind.mkdir(parents=True)
    store = Store.open(orig, limits=LIMITS)
    try:
        before(store)
        k, _ = store.backup(str(behind))
        after(store)
        n = store.last_lsn()
        tail = list(store.log.read_raw(k + 1))
    finally:
        store.close()
    put_log_records(behind, tail)
    return orig, behind, k, n


def rebuilt_dump(orig: Path) -> list:
    """The projections of a full rebuild of `orig` (the incremental ones are equal to it)."""
    store = Store.open(orig, limits=LIMITS)
    try:
        incremental = store.dump_projections()
        store.rebuild()
        rebuilt = store.dump_projections()
    finally:
        store.close()
    assert rebuilt == incremental
    return rebuilt


def test_a_writable_open_catches_up_projections_behind_the_log(tmp_path, monkeypatch):
    """The tail past `applied_lsn` is folded into the stored projections, in transactions of
    `CATCH_UP_EVENTS`: the result is byte-equal to a full rebuild; batches go on after it."""
    monkeypatch.setattr(store_mod, "CATCH_UP_EVENTS", 10)
    orig, behind, k, n = split_dirs(tmp_path, lambda s: chat(s, 2, "a"),
                                    lambda s: chat(s, 3, "b"))
    assert n - k > 3 * 10
    expected = rebuilt_dump(orig)
    ro = Store.open(behind, readonly=True)
    try:  # read-only: served as they are, and said to be behind
        assert ro.projections_behind() == n - k
        assert ro.dump_projections() != expected
    finally:
        ro.close()
    calls: list[tuple[int, int]] = []
    store = Store.open(behind, limits=LIMITS, on_catch_up=lambda *a: calls.append(a))
    try:
        assert store.dump_projections() == expected
        assert store.projections_behind() == 0
        assert store.check_projections() is None
        assert calls[-1] == (n - k, n - k) and len(calls) == -(-(n - k) // 10)
        assert [done for done, _ in calls] == [*range(10, n - k, 10), n - k]
        (out,) = store.execute([SendMessage("bob", "d", "user", "after", "x", to="dan")])
        assert out.lsn == n + 1 and store.check_projections() is None
    finally:
        store.close()
    again: list[tuple[int, int]] = []
    Store.open(behind, on_catch_up=lambda *a: again.append(a)).close()
    assert again == []  # caught up: nothing to do


def test_a_projections_mark_of_an_empty_store_catches_up_the_whole_log(tmp_path):
    """A backup taken before any event (no `applied_lsn` stored: nothing was applied, as
    where the log lives in another system and the projections start empty): the whole log
    is caught up."""
    orig, behind, k, n = split_dirs(tmp_path, lambda s: None, lambda s: chat(s, 1, "a"))
    assert k == 0 and n > 0
    store = Store.open(behind, limits=LIMITS)
    try:
        assert store.dump_projections() == rebuilt_dump(orig)
    finally:
        store.close()


def test_a_catch_up_stopped_by_a_damaged_record_resumes_once_it_is_restored(tmp_path,
                                                                              monkeypatch):
    """A record the replay cannot apply stops the open with CorruptLog at its lsn; the chunks
    before it stay committed (applied_lsn at the last one's end), and the next open, once the
    record is restored, goes on from there to the same rows as a full rebuild."""
    monkeypatch.setattr(store_mod, "CATCH_UP_EVENTS", 7)
    orig, behind, k, _ = split_dirs(tmp_path, lambda s: chat(s, 1, "a"),
                                    lambda s: chat(s, 3, "b"))
    bad = k + 30
    good = Store.open(orig, readonly=True)
    try:
        ((_, value),) = list(good.log.read_raw(bad, bad))
    finally:
        good.close()
    put_log_records(behind, [(bad, value[:32] + b"\xc1garbage")])
    with pytest.raises(CorruptLog) as failed:
        Store.open(behind, limits=LIMITS)
    assert failed.value.lsn == bad
    assert applied_lsn(behind) == k + 28  # four chunks of 7 committed, the fifth not
    put_log_records(behind, [(bad, value)])
    store = Store.open(behind, limits=LIMITS)
    try:
        assert store.dump_projections() == rebuilt_dump(orig)
    finally:
        store.close()


def test_a_catch_up_killed_midway_resumes_on_the_next_open(tmp_path):
    """A child process catching up is SIGKILLed after its first committed chunk, at a random
    moment of the chunks that follow (mid-transaction too); the next open resumes from the
    applied_lsn the kill left and ends byte-equal to a full rebuild."""
    rng = random.Random(7)
    orig, behind, k, n = split_dirs(tmp_path, lambda s: chat(s, 1, "a"),
                                    lambda s: chat(s, 12, "b"))
    expected = rebuilt_dump(orig)
    lefts = []
    for attempt in range(3):
        work = tmp_path / f"work{attempt}"
        shutil.copytree(behind, work)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, str(CHILD), str(work), "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        guard = threading.Timer(60, proc.kill)
        guard.start()
        try:
            line = b"-"
            while line and not line.startswith(b"CHUNK "):  # (structlog's lines go here too)
                line = proc.stdout.readline()
            assert line, "the child ended before its first chunk"
            threading.Event().wait(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            guard.cancel()
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        left = applied_lsn(work)
        assert k < left <= n
        lefts.append(left)
        store = Store.open(work, limits=LIMITS)
        try:
            assert store.dump_projections() == expected
        finally:
            store.close()
    print("applied lsns left by the kills", lefts, "of", k, "to", n)
    assert any(left < n for left in lefts), "no kill came before the catch-up's end"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(command_spec, min_size=1, max_size=8), min_size=1,
                        max_size=8),
       cut=st.integers(0, 8), chunk=st.integers(1, 9))
def test_catching_up_any_tail_equals_a_rebuild(batches, cut, chunk):
    """Random batches, the backup taken after a random number of them, random chunk sizes:
    the caught-up projections are those of a full rebuild of the original."""
    root = Path(tempfile.mkdtemp(prefix="homing-catch-up-"))
    saved = store_mod.CATCH_UP_EVENTS
    store_mod.CATCH_UP_EVENTS = chunk
    try:
        convs = ["grp:0000000000000000"]
        orig, behind, _, n = split_dirs(
            root, lambda s: [run_batch(s, b, convs) for b in batches[:cut]],
            lambda s: [run_batch(s, b, convs) for b in batches[cut:]])
        store = Store.open(behind, limits=LIMITS)
        try:
            assert store.projections_behind() == 0 and store.last_lsn() == n
            assert store.dump_projections() == rebuilt_dump(orig)
        finally:
            store.close()
    finally:
        store_mod.CATCH_UP_EVENTS = saved
        shutil.rmtree(root, ignore_errors=True)


def damage_row(path: Path, table: str, key: bytes) -> None:
    """Overwrite the row `key` of `table` with 3 bytes (no 8-byte counter or mark), with raw
    LMDB."""
    env = lmdb.open(str(path), max_dbs=MAX_DBS, map_size=1 << 30)
    try:
        db = env.open_db(table.encode(), create=False)
        with env.begin(write=True) as txn:
            assert txn.get(key, db=db) is not None
            txn.put(key, b"\x01\x02\x03", db=db)
    finally:
        env.close()


OPEN_CHILD = """
import sys
from storage import native
from storage.errors import CorruptProjection
from storage.store import Store
assert (native.ext is None) == (sys.argv[2] == "1")
try:
    Store.open(sys.argv[1]).close()
except CorruptProjection as exc:
    print("CorruptProjection", exc.table, exc.key.hex())
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("opened")
"""


@pytest.mark.parametrize("pure", ["", "1"], ids=["compiled", "python"])
@pytest.mark.parametrize(("table", "key"), [("conv_seq", b"dm:bob:dan"),
                                            ("read", b"dm:bob:dan\0bob"),
                                            ("inbox_head", b"dan")])
def test_a_damaged_row_a_catch_up_meets_is_named_and_a_rebuild_remakes_it(tmp_path, table, key,
                                                                           pure):
    """A stored row the tail's events read, damaged (here the direct conversation's seq, its
    sender's read mark, its recipient's inbox head): the writable open stops with the
    CorruptProjection naming that row, in the compiled and the Python fold alike, nothing of
    the catch-up written; until 2026-12-05 it raised a bare struct.error (the compiled fold) or
    blamed a log record (CorruptLog, the Python one). A rebuild, which opens without catching
    up (`catch_up=False`, as `homing audit rebuild` does), remakes every row from the log."""
    orig, behind, k, _ = split_dirs(tmp_path, lambda s: chat(s, 1, "a"),
                                    lambda s: chat(s, 1, "b"))
    damage_row(behind, table, key)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOMING_PURE_PYTHON": pure}
    out = subprocess.run([sys.executable, "-c", OPEN_CHILD, str(behind), pure], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines()[-1] == f"CorruptProjection {table} {key.hex()}"
    assert applied_lsn(behind) == k
    store = Store.open(behind, limits=LIMITS, catch_up=False)
    try:
        store.rebuild()
        assert store.dump_projections() == rebuilt_dump(orig)
    finally:
        store.close()
