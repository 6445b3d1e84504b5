"""The commit thread's member counts and member lists: kept through membership changes, never
read again, and always what a fresh read of the committed rows gives (aborted batches and a
full disk too).

`invite` and `join` counted every member of the conversation (the `--max-members` check) and
each change dropped the cached member list, in the write transaction: 5 to 7 ms an invite in a
group of 10,000, and about 500 ms for 100 invites in one commit. Rows read are counted here
(through a real Store), never timed; bench/bench_members.py times them.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from storage import buffered_tables
from storage.commands import CreateConv, Invite, Join, Leave, Remove, SendMessage, SetRole
from storage.errors import DomainError, LimitExceeded, StorageError
from storage.projections import Effects, apply
from storage.records import Event
from storage.rules import Limits, decide
from storage.store import Store, _InjectedAbort
from storage.tables import TxnTables
from tests.disks import fill, tmpfs

LIMIT = 500


def assert_member_caches_fresh(store: Store) -> None:
    """Every count, member list and split list the store's grouped views keep (`member`,
    `user_conv`), with the changes noted beside them, equals what a fresh read of the
    committed rows gives; the lists themselves are left as they are (nothing settled)."""
    for name in ("member", "user_conv"):
        view = getattr(store._tables, name)
        with store._env.read() as txn:
            fresh = TxnTables(txn, store._dbs)
            for head, count in view.counts.items():
                assert count == sum(1 for _ in fresh.range(name, head)), (name, head, count)
            for head, managers in view.manager_counts.items():
                assert managers == sum(role in (b"owner", b"admin") for _, role in fresh.range(
                    name, head)), (name, head, managers)
            assert set(view.changes) <= set(view.groups) and not (
                set(view.stale_parts) & set(view.parts))
            for head, rows in view.groups.items():
                assert rows == sorted(rows) and len({k for k, _ in rows}) == len(rows)
                kept = dict(rows)
                kept.update(view.changes.get(head, {}))
                assert sorted((k, v) for k, v in kept.items() if v is not None) == list(
                    fresh.range(name, head)), (name, head)
            for head, parts in [*view.parts.items(), *view.stale_parts.items()]:
                cut, rows = len(head), view.groups[head]
                if head in view.stale_parts:  # as of the list, before the changes
                    assert parts == tuple((k[cut:], k[cut:] + b"\0", k[cut:].decode())
                                          for k, _ in rows), (name, head)
                else:
                    assert head not in view.changes
                    assert parts == tuple((k[cut:], k[cut:] + b"\0", k[cut:].decode())
                                          for k, _ in fresh.range(name, head)), (name, head)
            assert view.group_rows == sum(len(rows) for rows in view.groups.values()) + sum(
                (v is not None) - (k in dict(view.groups[h])) for h, c in view.changes.items()
                for k, v in c.items())


def _counting_member_reads(monkeypatch, store: Store) -> list[int]:
    """Count the member rows the store's batches read from LMDB from now on."""
    real, member_db, seen = buffered_tables.cursor_range, store._dbs["member"], [0]

    def counting(txn, db, prefix, start=None, reverse=False):
        for row in real(txn, db, prefix, start, reverse):
            if db is member_db:
                seen[0] += 1
            yield row

    monkeypatch.setattr(buffered_tables, "cursor_range", counting)
    return seen


def _group(store: Store, members: int, *, open_: bool = True) -> str:
    others = tuple(f"m{i:04d}" for i in range(members - 1))
    (out,) = store.execute([CreateConv("own", "d", "user", "group", "g", open_, others)])
    return out.reply["conv"]


def _invite(conv: str, user: str) -> Invite:
    return Invite("own", "d", "user", conv, user, "member")


def _errors(outcomes) -> list[str | None]:
    return [None if o.error is None else type(o.error).__name__ for o in outcomes]


def test_membership_changes_in_a_big_group_read_no_member_list(tmp_path, monkeypatch):
    """Once a group's members were read (a post, or the first count), invites, joins, leaves,
    removals, role changes and the posts after them read none of its member rows again, and
    the limit is still enforced exactly."""
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        conv = _group(store, LIMIT - 8)
        store.execute([SendMessage("own", "d", "user", "c0", "hi", conv=conv)])
        reads = _counting_member_reads(monkeypatch, store)
        for i in range(3):
            assert _errors(store.execute([_invite(conv, f"a{i}")])) == [None]
        assert _errors(store.execute([_invite(conv, f"b{i}") for i in range(5)])) == [None] * 5
        assert len(store.members(conv)) == LIMIT
        reads[0] = 0  # `members` above read them: a query, not the commit thread
        assert _errors(store.execute([_invite(conv, "late"), Join("walker", "d", "user", conv)])
                       ) == ["LimitExceeded", "LimitExceeded"]
        assert _errors(store.execute([Leave("m0001", "d", "user", conv),
                                      Join("walker", "d", "user", conv),
                                      Join("runner", "d", "user", conv)])
                       ) == [None, None, "LimitExceeded"]
        assert _errors(store.execute([SetRole("own", "d", "user", conv, "a0", "admin"),
                                      Remove("own", "d", "user", conv, "b3"),
                                      _invite(conv, "late")])) == [None, None, None]
        (post,) = store.execute([SendMessage("own", "d", "user", "c1", "hi", conv=conv)])
        assert len(post.effects.inbox_heads) == LIMIT
        assert reads[0] == 0
        assert_member_caches_fresh(store)
        assert store.check_projections() is None
    finally:
        store.close()


def test_invites_into_a_cached_group_copy_none_of_its_lists(tmp_path):
    """Invites and a leave in a group whose lists are cached (after a post) leave those lists
    as they are, the same objects (a caller may hold them), and note the changes beside them;
    the next post applies them all at once, its fan-out reaching the members of now, and the
    lists held from before are still the group as it was. Each invite made the group's list
    and split list anew: 4.4 to 4.9 ms an invite into a group of 100,000 (docs/OPERATIONS.md)."""
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        conv = _group(store, 300)
        store.execute([SendMessage("own", "d", "user", "c0", "hi", conv=conv)])
        view, head = store._tables.member, conv.encode() + b"\0"
        rows, parts = view.groups[head], view.parts[head]
        was = (list(rows), parts)
        for i in range(20):
            assert _errors(store.execute([_invite(conv, f"x{i:02d}")])) == [None]
        assert _errors(store.execute([Leave("m0001", "d", "user", conv)])) == [None]
        assert view.groups[head] is rows and view.stale_parts[head] is parts
        assert (rows, parts) == was and len(view.changes[head]) == 21
        assert view.counts[head] == 319
        assert_member_caches_fresh(store)
        (post,) = store.execute([SendMessage("own", "d", "user", "c1", "hi", conv=conv)])
        now = {"own", *(f"m{i:04d}" for i in range(299)), *(f"x{i:02d}" for i in range(20))}
        assert set(post.effects.inbox_heads) == now - {"m0001"}
        assert view.groups[head] is not rows and head not in view.changes
        assert (rows, parts) == was  # the lists held from before: the group as it was
        assert_member_caches_fresh(store)
        assert store.check_projections() is None
    finally:
        store.close()


def test_the_first_count_reads_the_members_once(tmp_path, monkeypatch):
    """After a reopen nothing is cached: the first invite counts the group once, the next
    invites and the post after them read nothing."""
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        conv = _group(store, 300)
    finally:
        store.close()
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        reads = _counting_member_reads(monkeypatch, store)
        store.execute([_invite(conv, "first")])
        assert reads[0] == 300
        for i in range(4):
            store.execute([_invite(conv, f"next{i}")])
        store.execute([SendMessage("own", "d", "user", "c0", "hi", conv=conv)])
        assert reads[0] == 300
        assert store._tables.member.counts[conv.encode() + b"\0"] == 305
        assert_member_caches_fresh(store)
    finally:
        store.close()


def _steps_down(conv: str, first: int) -> list:
    """Admins `m000{first}` to `m000{first + 2}`: one made a member, one removed, one leaving
    (each allowed: the owner stays), then the owner leaving, the last owner or admin now
    (refused)."""
    return [SetRole("own", "d", "user", conv, f"m000{first}", "member"),
            Remove("own", "d", "user", conv, f"m000{first + 1}"),
            Leave(f"m000{first + 2}", "d", "user", conv),
            Leave("own", "d", "user", conv)]


def _promote(conv: str, first: int) -> list:
    return [SetRole("own", "d", "user", conv, f"m000{i}", "admin")
            for i in range(first, first + 3)]


def test_managers_stepping_down_read_no_member_list(tmp_path, monkeypatch):
    """Admins made members, removed or leaving, and the last owner refused leaving, read no
    member row once the group's owners and admins were counted: with its member lists let go
    (past CACHE_ROWS), after a reopen, the first of them counts them once; with the lists
    cached, they are left as they are, the changes noted beside them unapplied. The rules read
    every member's role for each (4.4 ms of the commit thread in a group of 20,000; with the
    lists let go, every member row from LMDB)."""
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        conv = _group(store, 300)
        store.execute(_promote(conv, 0))
    finally:
        store.close()
    head = conv.encode() + b"\0"
    monkeypatch.setattr(buffered_tables, "CACHE_ROWS", 0)
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        reads = _counting_member_reads(monkeypatch, store)
        for cmd in _steps_down(conv, 0):
            expected = _model_errors(store, [cmd])
            assert _errors(store.execute([cmd])) == expected
        assert expected == ["Conflict"]
        assert reads[0] == 300  # the first step down counted them, the only read
        view = store._tables.member
        assert view.groups == {} and view.manager_counts[head] == 1
        assert_member_caches_fresh(store)
    finally:
        store.close()
    monkeypatch.undo()
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        store.execute([*_promote(conv, 3), SetRole("own", "d", "user", conv, "m0006", "admin")])
        store.execute([SetRole("own", "d", "user", conv, "m0006", "member")])  # counted
        store.execute([SendMessage("own", "d", "user", "c0", "hi", conv=conv)])  # lists cached
        store.execute([_invite(conv, "x0")])  # a change noted beside them
        view = store._tables.member
        rows = view.groups[head]
        assert _errors(store.execute(_steps_down(conv, 3))) == [None, None, None, "Conflict"]
        assert view.groups[head] is rows and head in view.changes  # not read, not settled
        assert view.manager_counts[head] == 1
        assert_member_caches_fresh(store)
        assert store.check_projections() is None
    finally:
        store.close()


def test_an_aborted_batch_leaves_the_committed_counts(tmp_path):
    """A batch that adds members and then aborts leaves the counts and member lists of the
    committed rows: the places it took are free again, exactly."""
    store = Store.open(tmp_path / "data", limits=Limits(max_members=LIMIT))
    try:
        conv = _group(store, LIMIT - 3)
        store.execute([_invite(conv, "counted")])  # counted and cached before the abort
        store._abort_after = 3
        with pytest.raises(_InjectedAbort):
            store.execute([_invite(conv, "x1"), Join("x2", "d", "user", conv),
                           Leave("m0001", "d", "user", conv), _invite(conv, "x3")])
        store._abort_after = None
        assert_member_caches_fresh(store)
        assert _errors(store.execute([_invite(conv, "y1"), _invite(conv, "y2"),
                                      Join("y3", "d", "user", conv)])
                       ) == [None, None, "LimitExceeded"]
        assert_member_caches_fresh(store)
        assert store.check_projections() is None
    finally:
        store.close()


def test_a_commit_on_a_full_disk_leaves_the_committed_counts(tmp_path):
    """A batch of invites whose commit finds the disk full (a real tmpfs, filled) leaves the
    counts of the committed rows: the same invites pass once there is room, and no more."""
    with tmpfs(tmp_path, "4m") as disk:
        store = Store.open(disk / "data", map_size=64 << 20, limits=Limits(max_members=LIMIT))
        try:
            conv = _group(store, LIMIT - 2)
            store.execute([SendMessage("own", "d", "user", "c0", "hi", conv=conv)])
            fill(disk / "filler")
            big = [SendMessage("dave", "d", "user", f"big{i}", "x" * 60_000, to="erin")
                   for i in range(8)]  # more pages than the file has free
            with pytest.raises(StorageError):
                store.execute([_invite(conv, "x1"), _invite(conv, "x2"), *big])
            (disk / "filler").unlink()
            assert_member_caches_fresh(store)
            outs = store.execute([_invite(conv, "x2"), _invite(conv, "x1"),
                                  _invite(conv, "x3")])
            assert _errors(outs) == [None, None, "LimitExceeded"]
            assert isinstance(outs[2].error, LimitExceeded)
            assert_member_caches_fresh(store)
            assert store.check_projections() is None
        finally:
            store.close()


def test_counts_are_kept_after_the_member_lists_are_let_go(tmp_path, monkeypatch):
    """Past CACHE_ROWS a commit lets the member lists go and keeps the counts: the changes of
    the next batches (a removal, which reads no list, among them) keep them right alone."""
    monkeypatch.setattr(buffered_tables, "CACHE_ROWS", 0)
    store = Store.open(tmp_path / "data", limits=Limits(max_members=6))
    try:
        conv = _group(store, 3)
        store.execute([_invite(conv, "x1")])
        assert store._tables.member.groups == {}  # let go by the commit
        assert store._tables.member.counts == {conv.encode() + b"\0": 4}
        for batch in ([Remove("own", "d", "user", conv, "x1")], [Join("x2", "d", "user", conv)],
                      [SetRole("own", "d", "user", conv, "x2", "admin")],
                      [Remove("own", "d", "user", conv, "m0000"), _invite(conv, "x3")]):
            assert _errors(store.execute(batch)) == [None] * len(batch)
            assert_member_caches_fresh(store)
        assert store._tables.member.counts == {conv.encode() + b"\0": 4}
        store._abort_after = 1
        with pytest.raises(_InjectedAbort):
            store.execute([Remove("own", "d", "user", conv, "x3"), _invite(conv, "x4")])
        store._abort_after = None
        assert_member_caches_fresh(store)
        assert _errors(store.execute([_invite(conv, f"y{i}") for i in range(3)])
                       ) == [None, None, "LimitExceeded"]
        assert_member_caches_fresh(store)
    finally:
        store.close()


USERS = ["own", "a", "b", "c", "d", "e"]
MODEL_LIMIT = 4
_user = st.sampled_from(USERS)
_role = st.sampled_from(["member", "admin"])
_token = st.sampled_from(["user", "user", "admin"])
_command = st.one_of(
    st.tuples(st.just("invite"), _user, _token, _user, _role),
    st.tuples(st.just("join"), _user),
    st.tuples(st.just("leave"), _user),
    st.tuples(st.just("remove"), _user, _token, _user),
    st.tuples(st.just("set_role"), _user, _token, _user, _role),
    st.tuples(st.just("post"), _user),
)


def _make(spec, conv: str, n: int):
    kind, user = spec[0], spec[1]
    if kind == "invite":
        return Invite(user, "d", spec[2], conv, spec[3], spec[4])
    if kind == "join":
        return Join(user, "d", "user", conv)
    if kind == "leave":
        return Leave(user, "d", "user", conv)
    if kind == "remove":
        return Remove(user, "d", spec[2], conv, spec[3])
    if kind == "set_role":
        return SetRole(user, "d", spec[2], conv, spec[3], spec[4])
    return SendMessage(user, "d", "user", f"p{n}", "hi", conv=conv)


def _model_errors(store: Store, commands) -> list[str | None]:
    """What the rules answer `commands` over a fresh replay of the log (no cache at all)."""
    return [error for error, _reached in _model_outcomes(store, commands)]


def _model_outcomes(store: Store, commands) -> list[tuple[str | None, set[str]]]:
    """What the rules answer `commands` over a fresh replay of the log (no cache at all), each
    with the users whose inbox it wrote to (a post: the members at that point of the batch)."""
    mem = store.replay()
    answers: list[tuple[str | None, set[str]]] = []
    for cmd in commands:
        try:
            events, _reply = decide(mem, cmd, 1, store.limits)
        except DomainError as exc:
            answers.append((type(exc).__name__, set()))
            continue
        fx = Effects()
        for ev in events:
            apply(mem, Event(0, *ev), fx)
        answers.append((None, set(fx.inbox_heads)))
    return answers


def run_as_on_a_replay(store: Store, commands, abort: int | None = None,
                       max_rows: int | None = None) -> list:
    """Run `commands` in one batch: aborted after `abort` of them (if fewer than all), or
    committed (stopped at `max_rows`), each command answered as over a fresh replay of the log
    (`_model_outcomes`), its post reaching the same members. Return the outcomes."""
    if abort is not None and abort < len(commands):
        store._abort_after = abort
        try:
            with pytest.raises(_InjectedAbort):
                store.execute(commands)
        finally:
            store._abort_after = None
        return []
    expected = _model_outcomes(store, commands)
    outcomes = store.execute(commands, max_rows=max_rows)
    assert [(None if o.error is None else type(o.error).__name__,
             set(o.effects.inbox_heads) if o.effects else set())
            for o in outcomes] == expected[:len(outcomes)], commands
    return outcomes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(st.lists(_command, min_size=1, max_size=5),
                                  st.one_of(st.none(), st.integers(0, 4))),
                        min_size=1, max_size=12),
       keep_groups=st.booleans(), fold_after=st.sampled_from([0, 1, 32]))
def test_cached_counts_equal_fresh_counts(tmp_path_factory, batches, keep_groups, fold_after):
    """Random membership commands (by members, strangers and admin tokens; some refused) in
    batches, some of them aborted after k commands, in an open group at a limit of 4, with the
    member lists kept or let go at each commit, and their changes applied to them at the next
    read or soon after (FOLD_AFTER): after every batch the counts and lists kept equal a fresh
    read, and every command is answered as the rules answer it over a fresh
    replay of the log (so `--max-members` is enforced exactly), each post reaching the
    members of that point of its batch, no more, no fewer."""
    cache_rows, fold = buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER
    buffered_tables.CACHE_ROWS = cache_rows if keep_groups else 0
    buffered_tables.FOLD_AFTER = fold_after
    store = Store.open(tmp_path_factory.mktemp("m") / "data",
                       limits=Limits(max_members=MODEL_LIMIT))
    try:
        conv = _group(store, 2)
        posts = 0
        for specs, abort in batches:
            commands = []
            for spec in specs:
                posts += 1
                commands.append(_make(spec, conv, posts))
            run_as_on_a_replay(store, commands, abort)
            assert_member_caches_fresh(store)
        assert store.check_projections() is None
    finally:
        buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER = cache_rows, fold
        store.close()
