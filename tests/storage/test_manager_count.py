"""The commit thread's count of each group's owners and admins (`GroupedBufTable.managers`),
which the rules ask whether an owner or admin who leaves, is removed or is made a member leaves
someone who can invite, attacked where a kept count could drift from the rows: batches of
several step downs, invites, re-invites and role changes in the same small groups (two admins
stepping down in one batch, a row changed twice, a role set to the same role, a member removed
then invited back as an admin), counts first read in the middle of a batch, batches aborted
after k commands or stopped at a row bound, the counts dropped past COUNTED_GROUPS at every
commit, the member lists let go (CACHE_ROWS), reopens (counted again from LMDB) and rebuilds.
Every command is answered as the rules answer it over a fresh replay of the log (`MemoryTables`,
which counts by looking at each row), and every count kept equals a fresh read.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from storage import buffered_tables
from storage.commands import CreateConv, Invite, Join, Leave, Remove, SendMessage, SetRole
from storage.errors import Conflict, CorruptProjection, StorageError
from storage.projections import key2
from storage.rules import Limits
from storage.store import Store, _InjectedAbort
from tests.audit.test_damaged import poke
from tests.disks import fill, tmpfs
from tests.storage.test_member_count import (
    _errors,
    _model_errors,
    assert_member_caches_fresh,
    run_as_on_a_replay,
)

USERS = ["own", "a", "b", "c", "d"]
# Few members per group, most of them admins, so that step downs are often of the last one.
LIMITS = Limits(max_members=5)
_user = st.sampled_from(USERS)
_group_ix = st.integers(0, 1)
_token = st.sampled_from(["user", "user", "admin"])
_role = st.sampled_from(["admin", "admin", "member"])
# Who steps down: most often an admin of the start (a, b), so that refusals happen.
_manager = st.sampled_from(["a", "b", "a", "b", "own", "c", "d"])
_step = st.one_of(
    st.tuples(st.just("leave"), _group_ix, _manager),
    st.tuples(st.just("leave"), _group_ix, _manager),
    st.tuples(st.just("demote"), _group_ix, _manager, _token, _manager),
    st.tuples(st.just("demote"), _group_ix, _manager, _token, _manager),
    st.tuples(st.just("remove"), _group_ix, _manager, _token, _manager),
    st.tuples(st.just("invite"), _group_ix, _user, _token, _user, _role),
    st.tuples(st.just("promote"), _group_ix, _user, _token, _user),
    st.tuples(st.just("join"), _group_ix, _user),
    st.tuples(st.just("post"), _group_ix, _user),
)
# How a batch runs: committed whole, aborted after k commands, or stopped at a row bound of k.
_mode = st.one_of(st.just(("whole", 0)), st.tuples(st.just("abort"), st.integers(0, 5)),
                  st.tuples(st.just("bound"), st.integers(1, 4)))
# What happens between batches.
_between = st.sampled_from(["none", "none", "none", "reopen", "rebuild", "post"])


def _command(step, convs: list[str], n: int):
    kind, conv, user = step[0], convs[step[1]], step[2]
    if kind == "leave":
        return Leave(user, "d", "user", conv)
    if kind == "demote":
        return SetRole(user, "d", step[3], conv, step[4], "member")
    if kind == "promote":
        return SetRole(user, "d", step[3], conv, step[4], "admin")
    if kind == "remove":
        return Remove(user, "d", step[3], conv, step[4])
    if kind == "invite":
        return Invite(user, "d", step[3], conv, step[4], step[5])
    if kind == "join":
        return Join(user, "d", "user", conv)
    return SendMessage(user, "d", "user", f"p{n}", "hi", conv=conv)


def _groups(store: Store) -> list[str]:
    """Two open groups of a, b and c: in the first, a is the one admin (its owner left); in the
    second, `own` is the owner and a and b are admins."""
    convs = []
    for admins, owner_leaves in ((("a",), True), (("a", "b"), False)):
        (made,) = store.execute([CreateConv("own", "d", "user", "group", "g", True,
                                            ("a", "b", "c"))])
        conv = made.reply["conv"]
        steps = [SetRole("own", "d", "user", conv, u, "admin") for u in admins]
        outs = store.execute([*steps, *([Leave("own", "d", "user", conv)] * owner_leaves)])
        assert _errors(outs) == [None] * len(outs)
        convs.append(conv)
    return convs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(st.lists(_step, min_size=1, max_size=8), _mode, _between),
                        min_size=1, max_size=10),
       keep_groups=st.booleans(), keep_counts=st.booleans(),
       fold_after=st.sampled_from([0, 1, 32]))
def test_step_downs_are_decided_as_on_a_replay(tmp_path_factory, batches, keep_groups,
                                               keep_counts, fold_after):
    """Random batches of step downs (leaves, removals, admins made members, by members,
    strangers and admin tokens) among invites, role changes and posts in two small groups of
    mostly admins: each command answered as over a fresh replay (whose rules count by looking
    at each member's row), so that an owner or admin steps down only while another is left or
    nobody else is; the counts kept equal a fresh read after every batch,
    committed, aborted or stopped at a row bound, with the lists let go at each commit or not,
    the counts dropped at each commit (COUNTED_GROUPS 0) or not, after reopens and rebuilds."""
    saved = (buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER,
             buffered_tables.COUNTED_GROUPS)
    buffered_tables.CACHE_ROWS = saved[0] if keep_groups else 0
    buffered_tables.COUNTED_GROUPS = saved[2] if keep_counts else 0
    buffered_tables.FOLD_AFTER = fold_after
    path = tmp_path_factory.mktemp("mgr") / "data"
    store = Store.open(path, limits=LIMITS)
    refused = 0
    try:
        convs = _groups(store)
        n = 0
        for steps, (mode, k), between in batches:
            commands = []
            for step in steps:
                n += 1
                commands.append(_command(step, convs, n))
            outcomes = run_as_on_a_replay(store, commands, k if mode == "abort" else None,
                                          k if mode == "bound" else None)
            refused += sum(isinstance(o.error, Conflict) and "last owner or admin" in str(
                o.error) for o in outcomes)
            assert_member_caches_fresh(store)
            if between == "reopen":
                store.close()
                store = Store.open(path, limits=LIMITS)
            elif between == "rebuild":
                store.rebuild()
            elif between == "post":  # the member lists cached, as a fan-out does
                store.execute([SendMessage("own", "d", "admin", f"q{n}", "hi", conv=conv)
                               for conv in convs])
        event(f"last manager refused: {min(refused, 3)}")
        assert store.check_projections() is None
    finally:
        (buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER,
         buffered_tables.COUNTED_GROUPS) = saved
        store.close()


def _stored_group(path, members: tuple[str, ...], admins: tuple[str, ...]) -> str:
    """An open group of `own` (owner) and `members`, `admins` of them made admins, in a store
    at `path` closed again."""
    store = Store.open(path, map_size=64 << 20, limits=LIMITS)
    try:
        (made,) = store.execute([CreateConv("own", "d", "user", "group", "g", True, members)])
        conv = made.reply["conv"]
        store.execute([SetRole("own", "d", "user", conv, u, "admin") for u in admins])
        return conv
    finally:
        store.close()


def test_a_damaged_role_is_no_manager_until_a_rebuild(tmp_path):
    """Another member's role row that is no UTF-8 (damaged behind homing's back) counts as a
    member who cannot invite: a step down that it alone would have left someone who can invite
    is refused (the safe answer), one with another owner or admin left passes; the rules read
    every member's role until 2026-12-06 and failed on it (CorruptProjection), where they
    decoded it before a manager's row. A damaged row of the one stepping down is still named.
    A rebuild writes the row again from the log and counts afresh: the step down passes."""
    path = tmp_path / "data"
    conv = _stored_group(path, ("b", "c", "z"), ("b", "z"))
    poke(path, lambda txn, db: txn.put(key2(conv, "b"), b"\xff", db=db("member")))
    store = Store.open(path, map_size=64 << 20, limits=LIMITS)
    try:
        with pytest.raises(CorruptProjection) as named:  # b's own row: decoded, named
            store.execute([Leave("b", "d", "user", conv)])
        assert (named.value.table, named.value.key) == ("member", key2(conv, "b"))
        before = store.last_lsn()
        outs = store.execute([Leave("own", "d", "user", conv), Leave("z", "d", "user", conv),
                              SetRole("z", "d", "user", conv, "z", "member")])
        assert _errors(outs) == [None, "Conflict", "Conflict"], outs
        assert "last owner or admin" in str(outs[1].error)
        assert store.last_lsn() == before + 1
        assert store.check_projections() is not None  # the damage, which a rebuild repairs
        store.rebuild()
        assert store.check_projections() is None
        assert _errors(store.execute([Leave("z", "d", "user", conv)])) == [None]
        assert_member_caches_fresh(store)
    finally:
        store.close()


@pytest.mark.parametrize("failure", ["full disk", "aborted"])
def test_a_failed_batch_that_counted_leaves_the_committed_count(tmp_path, failure):
    """A batch whose first step down counted the owners and admins after an admin it invited
    (a count read in the middle of the batch, of rows with its changes), then made an admin a
    member, and failed (its commit on a full disk, a real tmpfs filled; or aborted after them)
    leaves the count of the committed rows: the next batch's step downs are answered as over a
    fresh replay, the last owner or admin refused."""
    with tmpfs(tmp_path, "4m") as disk:
        path = disk / "data"
        conv = _stored_group(path, ("a", "b", "c"), ("a", "b"))
        store = Store.open(path, map_size=64 << 20, limits=LIMITS)  # nothing counted
        try:
            failing = [Invite("own", "d", "user", conv, "d", "admin"),
                       Leave("a", "d", "user", conv),
                       SetRole("own", "d", "user", conv, "b", "member")]
            head = conv.encode() + b"\0"
            if failure == "full disk":
                fill(disk / "filler")
                big = [SendMessage("dave", "d", "user", f"big{i}", "x" * 60_000, to="erin")
                       for i in range(8)]  # more pages than the file has free
                with pytest.raises(StorageError):
                    store.execute([*failing, *big])
                (disk / "filler").unlink()
            else:
                store._abort_after = len(failing)
                with pytest.raises(_InjectedAbort):
                    store.execute([*failing, Leave("c", "d", "user", conv)])
                store._abort_after = None
            assert store._tables.member.manager_counts.get(head, 3) == 3
            assert_member_caches_fresh(store)
            steps = [Leave("own", "d", "user", conv), Leave("a", "d", "user", conv),
                     SetRole("b", "d", "admin", conv, "b", "member"), Leave("b", "d", "user", conv)]
            expected = _model_errors(store, steps)
            assert expected == [None, None, "Conflict", "Conflict"]
            assert _errors(store.execute(steps)) == expected
            assert_member_caches_fresh(store)
            assert store.check_projections() is None
        finally:
            store.close()
