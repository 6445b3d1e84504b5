"""Properties of the split of a batch around damaged projection rows (broker/isolate.py).

Random sequences of commands from several users (sends to users and groups, creates, invites,
joins, leaves, acks, reads) over a real store whose projection rows (inbox heads, conv rows,
delivered marks and the users' highest, member rows, counters...) were damaged behind
homing's back, as tests/audit/test_damaged.py `poke` damages them. Two identical copies of
the data directory:

1. the whole batch on one (`Store.execute`) and, when it fails with CorruptProjection, the
   split (`isolate`) gives each command exactly what running the commands one at a time, in
   order, on the other copy gives it (replies, LSNs, errors by type and message), and leaves
   byte-equal logs and projections;
2. the split runs at most 2n - 2 batches more than the one that failed (one command: once);
   with commands set aside (`Store.set_aside`: run alone from the start, the runs between them
   not tried whole first), it gives the same, in at most 2n - 1 batches in all;
3. once the damaged rows are put back, a rebuild gives the projections kept incrementally;
4. with every run stopped at a small row bound (`Store.execute`'s `max_rows`, as the committer
   runs them), 1 and 3 hold, and each commit writes less than the bound before its last command.

Batches take a fixed time (`now_us`) and the ids of created conversations are drawn from the
creating command (`_conv_ids`), so that both copies write the same bytes. The default run is a
few seconds; `-m long` runs many more examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.isolate import isolate
from storage import rules
from storage.commands import Ack, CreateConv, Invite, Join, Leave, MarkRead, SendMessage
from storage.errors import CorruptProjection, StorageError, StorageFull
from storage.projections import inbox_key, key2
from storage.records import pack_u64
from storage.store import Outcome, Store
from tests.audit.test_damaged import poke
from tests.disks import fill, tmpfs

NOW = 1_800_000_000_000_000
USERS = ["u0", "u1", "u2", "u3"]
DMS = [rules.direct_conv("u0", "u1"), rules.direct_conv("u2", "u3")]


class _ConvIds:
    """`secrets` for storage/rules.py while a test runs: a created conversation's id is drawn
    from the creating command (its user and cid), not at random, so that the same command makes
    the same conversation in both copies and in every batch the split runs it in."""

    @staticmethod
    def token_hex(n: int) -> str:
        cmd = sys._getframe(1).f_locals["cmd"]  # rules._create's command
        return hashlib.blake2b(f"{cmd.user}\0{cmd.cid}".encode(), digest_size=n).hexdigest()


@contextlib.contextmanager
def _conv_ids():
    real, rules.secrets = rules.secrets, _ConvIds
    try:
        yield
    finally:
        rules.secrets = real


def _created(user: str, cid: str) -> str:
    """The id of the group `user` creates with `cid` (`_ConvIds`)."""
    return rules.GROUP_PREFIX + hashlib.blake2b(f"{user}\0{cid}".encode(),
                                                digest_size=8).hexdigest()


GROUP = _created("u0", "base")  # made by `_base`, u0 its owner, u1 and u2 members; open


def _base(path: Path) -> None:
    """u0 and u1, u2 and u3 have written to each other; GROUP (u0 owner, u1 u2 members) has
    messages; u1 and u3 acked on device d, u1 read the group."""
    store = Store.open(str(path))
    try:
        store.execute([
            SendMessage("u0", "d", "user", "s0", "hi", to="u1"),
            SendMessage("u1", "d", "user", "s1", "hi", to="u0"),
            SendMessage("u2", "d", "user", "s2", "hi", to="u3"),
        ], NOW)
        out = store.execute([CreateConv("u0", "d", "user", "group", "g", True, ("u1", "u2"),
                                        "base")], NOW)
        assert out[0].reply["conv"] == GROUP
        store.execute([SendMessage("u0", "d", "user", "s3", "yo", conv=GROUP),
                       SendMessage("u1", "d", "user", "s4", "yo", conv=GROUP),
                       Ack("u1", "d", "user", 3, None), Ack("u3", "d", "user", 1, None),
                       MarkRead("u1", "d", "user", GROUP, 2)], NOW)
    finally:
        store.close()


def _rows() -> list[tuple[str, bytes]]:
    """The base's rows a test may damage."""
    group = GROUP
    rows = [("inbox_head", u.encode()) for u in USERS]
    rows += [("conv", c.encode()) for c in (*DMS, group)]
    rows += [("conv_seq", c.encode()) for c in (*DMS, group)]
    rows += [("delivered", key2("u1", "d")), ("delivered", key2("u3", "d"))]
    rows += [("delivered", key2("u1", "")), ("delivered", key2("u3", ""))]  # highest marks
    rows += [("member", key2(group, u)) for u in ("u0", "u1", "u2")]
    rows += [("member", key2(DMS[0], "u0")), ("read", key2(group, "u1")),
             ("inbox", inbox_key("u1", 2)), ("inbox", inbox_key("u0", 1)),
             ("created", key2("u0", "base")), ("recv", key2(group, "u0")),
             ("recv", key2(DMS[1], "u2")), ("idem", key2("s0", "u0")),
             ("user_conv", key2("u1", group)), ("msg", DMS[0].encode() + b"\0" + pack_u64(1))]
    return rows


DAMAGES = [b"\x00\x02", b"\xc1", b"\xff\xfe", b""]

# Commands over the users, the base's conversations and those the sequence creates (cids
# c0..c2 of each user: their ids are `_created(user, cid)`).
users = st.sampled_from(USERS)
cids = st.sampled_from(["c0", "c1", "c2"])


@st.composite
def convs(draw) -> str:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return GROUP
    if kind == 1:
        return draw(st.sampled_from(DMS))
    return _created(draw(users), draw(cids))


def commands():
    conv = convs()
    return st.one_of(
        st.builds(lambda u, to, n: SendMessage(u, "d", "user", f"m{n}", "x", to=to),
                  users, users, st.integers(0, 5)),
        st.builds(lambda u, c, n: SendMessage(u, "d", "user", f"m{n}", "x", conv=c),
                  users, conv, st.integers(0, 5)),
        st.builds(lambda u, cid, m, o: CreateConv(u, "d", "user", "group", None, o, m, cid),
                  users, cids, st.lists(users, max_size=2).map(tuple), st.booleans()),
        st.builds(lambda u, c, t: Invite(u, "d", "user", c, t), users, conv, users),
        st.builds(lambda u, c: Join(u, "d", "user", c), users, conv),
        st.builds(lambda u, c: Leave(u, "d", "user", c), users, conv),
        # u0 and u1 ack from two devices and leave the rules to read the convs from the
        # inbox past the user's highest device mark (`acked`, this batch's acks included:
        # until 2026-12-06 a device's first mark of the batch was left out, so such an ack
        # logged other convs in a batch than alone, and u0 and u1 acked from one device
        # here); u2 and u3 from two, naming the convs, as the broker does when it delivered
        # every entry.
        st.builds(lambda u, dev, n: Ack(u, dev, "user", n, None), st.sampled_from(USERS[:2]),
                  st.sampled_from(["d", "e"]), st.integers(0, 6)),
        st.builds(lambda u, dev, n, c: Ack(u, dev, "user", n, ((c, n),)),
                  st.sampled_from(USERS[2:]), st.sampled_from(["d", "e"]), st.integers(0, 6),
                  conv),
        st.builds(lambda u, c, n: MarkRead(u, "d", "user", c, n), users, conv,
                  st.integers(0, 6)),
    )


def _result(r) -> tuple:
    """What a command was told: its reply, LSN and domain error; or the batch's error."""
    if isinstance(r, Outcome):
        err = None if r.error is None else (type(r.error).__name__, str(r.error))
        return ("ok", r.reply, r.lsn, err)
    return ("failed", type(r).__name__, str(r))


def _state(store: Store) -> tuple[list, list]:
    return list(store.log.read_raw(1)), store.dump_projections()


class _Counting:
    def __init__(self, store: Store, max_rows: int | None = None) -> None:
        self.store, self.calls, self.max_rows, self.stops = store, 0, max_rows, 0

    def __call__(self, commands):
        self.calls += 1
        outcomes = self.store.execute(commands, NOW, self.max_rows)
        if self.max_rows is not None:  # the rows before the last command run: under the bound
            rows = [len(o.effects.inbox_heads) or 1 for o in outcomes]
            assert rows and sum(rows[:-1]) < self.max_rows, (rows, self.max_rows)
            self.stops += len(outcomes) < len(commands)
        return outcomes


def check(base: Path, work: Path, damage: list[tuple[str, bytes, bytes]], cmds: list,
          aside: list[int] | None = None, max_rows: int | None = None) -> None:
    """The three properties (module doc) for `cmds` over a copy of `base` with `damage`, the
    commands of indices `aside` set aside (none: the whole batch first). With `max_rows`, every
    run is stopped at that row bound (`Store.execute`), and the split runs from the start
    (in halves, or around `aside`), each of its commits within the bound."""
    batch, alone = work / "batch", work / "alone"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, batch)
    original = {}

    def damage_rows(txn, db) -> None:
        for table, key, value in damage:
            original.setdefault((table, key), txn.get(key, db=db(table)))
            txn.put(key, value, db=db(table))

    poke(batch, damage_rows)
    shutil.copytree(batch, alone)
    with _conv_ids():
        store = Store.open(str(batch))
        try:
            execute = _Counting(store, max_rows)
            try:
                if max_rows is not None:
                    done = isolate(execute, cmds, aside or ())
                    event(f"row bound {max_rows}: {execute.stops} runs stopped")
                    assert done.stopped is None, done.stopped
                    results = done.results
                elif aside:
                    done = isolate(execute, cmds, aside)
                    event(f"set aside: {len(aside)} of {len(cmds)}")
                    assert execute.calls <= 2 * len(cmds) - 1, (execute.calls, len(cmds))
                    assert done.stopped is None, done.stopped
                    results = done.results
                else:
                    results = execute(cmds)
            except CorruptProjection:
                done = isolate(execute, cmds)
                results = done.results
                event(f"split: {sum(isinstance(r, CorruptProjection) for r in results)} of "
                      f"{len(cmds)} failed")
                # 2. bounded: at most 2n - 2 batches after the one that failed (one command:
                # run once more)
                bound = max(1, 2 * len(cmds) - 2)
                assert execute.calls - 1 <= bound, (execute.calls, len(cmds))
                assert done.stopped is None, done.stopped
            got = [_result(r) for r in results]
            batch_state = _state(store)
        finally:
            store.close()
        store = Store.open(str(alone))
        try:
            want = []
            for c in cmds:
                try:
                    want.append(_result(store.execute([c], NOW)[0]))
                except StorageError as exc:
                    want.append(_result(exc))
            alone_state = _state(store)
        finally:
            store.close()
    # 1. the same for each command, the same bytes
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, (i, cmds[i], g, w)
    assert not [f for f in got if f[0] == "failed" and f[1] != "CorruptProjection"], got
    assert batch_state[0] == alone_state[0]
    assert batch_state[1] == alone_state[1]
    # 3. the damaged rows put back (those no command wrote since), a rebuild changes nothing
    now = {(t, k): v for t, k, v in batch_state[1]}
    damaged = {(t, k): v for t, k, v in damage}

    def repair(txn, db) -> None:
        for (table, key), value in original.items():
            if now.get((table, key)) == damaged[table, key]:
                if value is None:
                    txn.delete(key, db=db(table))
                else:
                    txn.put(key, value, db=db(table))

    poke(batch, repair)
    store = Store.open(str(batch))
    try:
        kept = store.dump_projections()
        store.rebuild()
        rebuilt = store.dump_projections()
    finally:
        store.close()
    diff = sorted(set(kept) ^ set(rebuilt))
    assert kept == rebuilt, diff[:6]


@contextlib.contextmanager
def _prepared():
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        with _conv_ids():
            _base(base)
        yield base, Path(d) / "work"


def test_isolating_one_command_runs_it_once_and_no_empty_batch(tmp_path):
    """A batch of one command was split into an empty batch (a durable commit of nothing,
    counted as a commit) and itself: two executes where 2n - 2 says none."""
    with _conv_ids():
        _base(tmp_path / "base")
    poke(tmp_path / "base", lambda txn, db: txn.put(b"u1", b"\x00\x02", db=db("inbox_head")))
    store = Store.open(str(tmp_path / "base"))
    try:
        execute = _Counting(store)
        done = isolate(execute, [SendMessage("u0", "d", "user", "m0", "x", to="u1")])
        assert isinstance(done.results[0], CorruptProjection)
        assert (execute.calls, done.commits) == (1, 0)
    finally:
        store.close()


def _given(max_examples: int):
    def wrap(test):
        return settings(max_examples=max_examples, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])(test)
    return wrap


# One to three damaged rows (table, key, value), up to 12 commands, and those set aside.
case = st.tuples(
    st.lists(st.tuples(st.sampled_from(_rows()), st.sampled_from(DAMAGES)).map(
        lambda t: (*t[0], t[1])), min_size=1, max_size=3, unique_by=lambda t: t[:2]),
    st.lists(commands(), min_size=1, max_size=12),
    st.one_of(st.just([]), st.lists(st.integers(0, 11), max_size=3)))


def _check(case) -> None:
    damage, cmds, aside = case
    with _prepared() as (base, work):
        check(base, work, damage, cmds, sorted({i for i in aside if i < len(cmds)}))


@_given(100)
@given(case=case)
def test_the_split_equals_the_commands_run_one_at_a_time(case):
    """Properties 1 to 3 (module doc), a few seconds."""
    _check(case)


@_given(60)
@given(case=case, max_rows=st.integers(1, 6))
def test_the_split_under_a_row_bound_equals_the_commands_run_one_at_a_time(case, max_rows):
    """Properties 1 and 3 (module doc) with every run stopped at a row bound of 1 to 6 inbox
    entries, as the committer's `Store.execute` is: a run stopped there goes on with the
    commands it did not run (broker/isolate.py), which were lost from the results before."""
    damage, cmds, aside = case
    with _prepared() as (base, work):
        check(base, work, damage, cmds, sorted({i for i in aside if i < len(cmds)}),
              max_rows=max_rows)


@pytest.mark.long
@_given(1500)
@given(case=case)
def test_the_split_equals_the_commands_run_one_at_a_time_long(case):
    """As above, many more examples."""
    _check(case)


# ---------------------------------------------------------------- a truly full disk


def test_a_full_disk_in_the_middle_of_the_split(tmp_path):
    """On a 2 MiB tmpfs filled up: the batch fails on u1's damaged inbox head; its split
    commits the small send alone (64 KiB were left), fails the send to u1 alone, and
    the half of large sends fails with StorageFull, a real ENOSPC: the split stops, the rest is
    not run. The store serves on: once space is back the same large sends commit, and the
    projections are a replay of the log (nothing of the failed halves kept in the cache)."""
    with tmpfs(tmp_path, "2m") as disk:
        data = disk / "data"
        with _conv_ids():
            _base(data)
        head = []
        poke(data, lambda txn, db: (head.append(txn.get(b"u1", db=db("inbox_head"))),
                                    txn.put(b"u1", b"\x00\x02", db=db("inbox_head"))))
        store = Store.open(str(data), map_size=64 << 20)
        try:
            filler = disk / "filler"
            fill(filler)
            # 64 KiB left: room for a small send's pages, not for two sends of 60 KB.
            os.truncate(filler, filler.stat().st_size - (64 << 10))
            big = [SendMessage("u3", "d", "user", f"big{i}", "x" * 60_000, to="u2")
                   for i in range(2)]
            cmds = [SendMessage("u2", "d", "user", "k1", "x", to="u3"),
                    SendMessage("u0", "d", "user", "bad", "x", to="u1"), *big]
            execute = _Counting(store)
            with pytest.raises(CorruptProjection):
                execute(cmds)
            last = store.last_lsn()
            done = isolate(execute, cmds)
            k1, bad, *rest = done.results
            assert k1.error is None and k1.lsn == last + 1  # committed before the full disk
            assert isinstance(bad, CorruptProjection) and bad.table == "inbox_head"
            assert all(isinstance(r, StorageFull) for r in rest), rest
            assert execute.calls == 5 and done.commits == 1  # whole, [k1 bad], k1, bad, big
            assert done.stopped is not None and done.stopped[1] == 2
            assert store.last_lsn() == last + 1
            filler.unlink()
            out = store.execute(big, NOW)
            assert [o.reply["seq"] for o in out] == [k1.reply["seq"] + 1, k1.reply["seq"] + 2]
            assert store.verify_log() == store.last_lsn()
        finally:
            store.close()
        poke(data, lambda txn, db: txn.put(b"u1", head[0], db=db("inbox_head")))  # repaired
        store = Store.open(str(data), map_size=64 << 20)
        try:
            assert store.check_projections() is None
        finally:
            store.close()
