"""The broker's cached member lists (`Broker.roster`) through membership changes: updated,
not read again; each change made a new `Roster` (one held by a walk in progress stays as it
was), and after the commits' fan-outs every cached roster is the store's member list.

Each change dropped the group's roster, so the next receipt, typing notice or presence walk
read its whole member list again on the event loop (8 ms a join in a group of 10,000, with
the join's fan-out; bench/bench_members.py). Reads are counted here, never timed.
"""

from __future__ import annotations

import tracemalloc

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

import protocol as wire
from broker.config import Config
from broker.fanout import on_committed
from broker.roster import Roster
from broker.server import Broker
from storage.commands import CreateConv, Invite, Join, Leave, Remove, SetRole
from storage.rules import Limits
from storage.store import Store


class _CountingStore:
    """The real store, counting its `members` reads."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.member_reads = 0

    def members(self, conv: str):
        self.member_reads += 1
        return self._store.members(conv)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _fresh(store: Store, conv: str) -> Roster:
    return Roster.of(store.members(conv))


def _commit(store: Store, broker: Broker, commands) -> None:
    outcomes = store.execute(commands)
    on_committed(broker, commands, outcomes)


def test_membership_changes_update_the_cached_roster(tmp_path):
    """A join, an invite, a role given and taken, a leave and a removal are applied to the
    cached roster: no member list is read, a roster held from before is unchanged, and the
    cached one is what a fresh read gives (posters included)."""
    store = Store.open(str(tmp_path / "data"), limits=Limits(max_members=100))
    try:
        members = tuple(f"m{i:03d}" for i in range(50))
        (out,) = store.execute([CreateConv("own", "d1", "user", "group", "g", True, members)])
        conv = out.reply["conv"]
        counting = _CountingStore(store)
        broker = Broker(Config(data_dir=tmp_path / "data", port=0), counting)
        held = broker.roster(conv)
        assert counting.member_reads == 1
        steps = [
            [Join("joiner", "d1", "user", conv)],
            [Invite("own", "d1", "user", conv, "aaa", "admin"),
             Invite("own", "d1", "user", conv, "zzz", "member")],
            [SetRole("own", "d1", "user", conv, "m010", "admin")],
            [SetRole("own", "d1", "user", conv, "aaa", "member")],
            [Leave("m020", "d1", "user", conv), Remove("own", "d1", "user", conv, "m010")],
            [Remove("own", "d1", "user", conv, "nobody")],  # nothing changes
        ]
        for commands in steps:
            _commit(store, broker, commands)
            assert broker.roster(conv) == _fresh(store, conv), commands
        assert counting.member_reads == 1
        assert held == Roster.of(sorted([("own", "owner"), *((m, "member") for m in members)]))
        assert broker.roster(conv).posters == ["own"]
    finally:
        store.close()


def test_a_roster_emptied_is_not_kept(tmp_path):
    """The last member leaving drops the roster (none is cached for an empty conversation)."""
    store = Store.open(str(tmp_path / "data"))
    try:
        (out,) = store.execute([CreateConv("own", "d1", "user", "group", "g", False, ())])
        conv = out.reply["conv"]
        broker = Broker(Config(data_dir=tmp_path / "data", port=0), store)
        assert broker.roster(conv).users == ["own"]
        _commit(store, broker, [Leave("own", "d1", "user", conv)])
        assert conv not in broker.rosters.cached
        assert broker.roster(conv).users == []
    finally:
        store.close()


USERS = ["own", "a", "b", "c", "d"]
_user = st.sampled_from(USERS)
_command = st.one_of(
    st.tuples(st.just("invite"), _user, st.sampled_from(["member", "admin"])),
    st.tuples(st.just("join"), _user),
    st.tuples(st.just("leave"), _user),
    st.tuples(st.just("remove"), _user),
    st.tuples(st.just("set_role"), _user, st.sampled_from(["member", "admin"])),
)
# A step: a batch committed (its fan-out later, as the committer hands the next batch to its
# thread first), the fan-out of the oldest batch committed, or a roster read.
_step = st.one_of(st.tuples(st.just("commit"), st.lists(_command, min_size=1, max_size=4)),
                  st.just(("fanout",)), st.just(("read",)))


def _make(spec, conv: str):
    kind, user = spec[0], spec[1]
    if kind == "invite":  # an admin token acts as owner: most invites are made
        return Invite("own", "d1", "admin", conv, user, spec[2])
    if kind == "join":
        return Join(user, "d1", "user", conv)
    if kind == "leave":
        return Leave(user, "d1", "user", conv)
    if kind == "remove":
        return Remove("own", "d1", "admin", conv, user)
    return SetRole("own", "d1", "admin", conv, user, spec[2])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_step, min_size=1, max_size=25), cap=st.sampled_from([None, 3]))
def test_cached_rosters_equal_the_store_after_each_fan_out(tmp_path_factory, steps, cap):
    """Random membership changes in an open group, their fan-outs running behind the commits
    (up to several batches), rosters read at any point (one read may already see batches
    whose fan-out has not run): whenever every committed batch has been fanned out, the
    cached roster is the store's member list. With room for 3 members (`cap`), a roster that
    grows past it is dropped, and one read past it is not kept."""
    data = tmp_path_factory.mktemp("r") / "data"
    store = Store.open(str(data), limits=Limits(max_members=4))
    try:
        (out,) = store.execute([CreateConv("own", "d1", "user", "group", "g", True, ("a",))])
        conv = out.reply["conv"]
        broker = Broker(Config(data_dir=data, port=0), store)
        if cap is not None:
            broker.rosters.max_members = cap
        broker.roster(conv)
        behind: list[tuple[list, list]] = []
        for step in steps:
            if step[0] == "commit":
                commands = [_make(spec, conv) for spec in step[1]]
                behind.append((commands, store.execute(commands)))
            elif step[0] == "read":
                broker.roster(conv)
            if behind and (step[0] == "fanout" or len(behind) > 3):
                on_committed(broker, *behind.pop(0))
            if not behind and conv in broker.rosters.cached:
                assert broker.rosters.cached[conv] == _fresh(store, conv)
            # the members counted against ROSTER_CACHE_MEMBERS are those held
            held = broker.rosters.cached.values()
            assert broker.rosters.members == sum(len(r) for r in held)
            assert broker.rosters.members <= broker.rosters.max_members
        while behind:
            on_committed(broker, *behind.pop(0))
        assert broker.roster(conv) == _fresh(store, conv)
    finally:
        store.close()


def test_rosters_held_across_changes_share_their_members():
    """Each change makes a new roster that shares the old one's members: fifty rosters of a
    group of 10,000, one per invite, each held (as walks in progress would), hold together less
    than one more roster, and each is still the group as it was at its change. Each change
    copied the three lists of every member (an invite into a group of 100,000: 4.5 ms of the
    event loop), so these held fifty copies of them."""
    first = Roster.of(sorted([("own", "owner"), *((f"m{i:05d}", "member") for i in range(9_999))]))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        one = Roster.of(first.members)
        size = tracemalloc.get_traced_memory()[0] - base
        del one
        base = tracemalloc.get_traced_memory()[0]
        held = [first]
        for i in range(50):
            held.append(held[-1].changed(f"n{i:02d}", "admin" if i % 10 == 0 else "member"))
            if i % 7 == 3:
                held.append(held[-1].changed(f"m{i:05d}", None))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < size, (grown, size)
    assert held[0] == first and len(held[0].users) == 10_000 and held[0].posters == ["own"]
    for roster in held[1:]:  # each as its changes left it, the later ones not in it
        joined = {u for u in roster.users if u.startswith("n")}
        assert joined == {f"n{i:02d}" for i in range(len(joined))}
        assert len(roster.users) == len(roster) == 10_000 + len(joined) - sum(
            1 for u in first.users if u not in roster)
    last = held[-1]
    assert last.posters == ["n00", "n10", "n20", "n30", "n40", "own"]
    assert "m00003" not in last and "m00004" in last and last.role("n11") == "member"
    assert last == Roster.of(sorted(set(first.members) - {(f"m{i:05d}", "member") for i in range(
        50) if i % 7 == 3} | {(f"n{i:02d}", "admin" if i % 10 == 0 else "member")
                              for i in range(50)}))


@pytest.mark.parametrize("fold_after", [32, 0], ids=["noted", "folded"])
async def test_pushes_follow_invites_and_leaves_interleaved_with_posts(tmp_path, monkeypatch,
                                                                       fold_after):
    """Over loopback, with the group's roster cached: invites, leaves and a removal between
    posts, typing notices and read marks; each push goes to the members online at the time,
    each post is delivered to the members at the time, and a roster held from before the
    changes (as a walk in progress holds one) is the group as it was. With FOLD_AFTER 0 (the
    broker's rosters and the commit thread's lists), every change is folded into a new table
    or list at once, where the default leaves them noted beside it."""
    from broker import roster as roster_mod
    from storage import buffered_tables
    from tests.harness import running_broker

    monkeypatch.setattr(roster_mod, "FOLD_AFTER", fold_after)
    monkeypatch.setattr(buffered_tables, "FOLD_AFTER", fold_after)

    users = ["own", "a", "b", "c"]
    async with running_broker(tmp_path / "d", changes_per_s_per_user=1e9,
                              typing_per_s_per_user=1e9) as h, \
            h.client("own") as own, h.client("a") as a, h.client("b") as b, \
            h.client("c") as c:
        clients = {"own": own, "a": a, "b": b, "c": c}
        ctl = await own.create_group("control", users[1:])
        conv = await own.create_group("g", ["a", "b"])
        held = h.broker.roster(conv)  # cached from here on
        posts: dict[str, list[int]] = {u: [] for u in users}

        async def notices(user: str) -> list[tuple[str, str]]:
            """The typing notices pushed to `user` before the next one in the control group."""
            got = []
            while True:
                push = await clients[user].next_push()
                if isinstance(push, wire.TypingNotice):
                    if push.conv == ctl:
                        return got
                    got.append((push.conv, push.user))

        async def heard(typist: str) -> dict[str, list[tuple[str, str]]]:
            """Who heard `typist` typing in the group (up to its notice in the control group,
            which every other member hears)."""
            await clients[typist].typing(conv)
            await clients[typist].typing(ctl)
            out = {u: await notices(u) for u in users if u != typist}
            return {u: got for u, got in out.items() if got}

        async def post(body: str, members: set[str]) -> None:
            seq = (await own.send(body, conv=conv)).seq
            for user in members - {"own"}:
                async for d in clients[user].deliveries():
                    await clients[user].ack(d)
                    if d.conv == conv and d.kind == "msg":
                        posts[user].append(seq)
                        assert d.body == body
                        break

        with trio.fail_after(30):
            await own.invite(conv, "c")
            assert await heard("own") == {u: [(conv, "own")] for u in ("a", "b", "c")}
            await post("one", {"a", "b", "c"})
            await clients["b"].leave(conv)
            assert await heard("c") == {u: [(conv, "c")] for u in ("own", "a")}
            await post("two", {"a", "c"})
            await own.invite(conv, "b", "admin")
            await own.remove(conv, "a")
            assert await heard("b") == {u: [(conv, "b")] for u in ("own", "c")}
            await post("three", {"b", "c"})
            assert posts == {"own": [], "a": [1, 2], "b": [1, 3], "c": [1, 2, 3]}
            await c.read(conv, 3)
            for user in ("own", "b", "c"):  # a read mark goes to the members, c's own too
                push = await clients[user].next_push()
                while not (isinstance(push, wire.Receipt) and push.read == 3):
                    push = await clients[user].next_push()
                assert (push.conv, push.user) == (conv, "c")
        assert held == Roster.of([("a", "member"), ("b", "member"), ("own", "owner")])
        assert h.broker.roster(conv) == Roster.of(
            [("b", "admin"), ("c", "member"), ("own", "owner")])


_change = st.tuples(st.sampled_from(["own", "a", "b", "c", "d", "e", "m0", "m1"]),
                    st.sampled_from([None, None, "member", "admin", "owner"]))


@settings(max_examples=300, deadline=None)
@given(first=st.dictionaries(st.sampled_from(["own", "a", "m0", "m1", "m2"]),
                             st.sampled_from(["member", "admin", "owner"]), max_size=5),
       changes=st.lists(_change, max_size=40), fold_after=st.sampled_from([0, 1, 2, 32]),
       online=st.sets(st.sampled_from(["own", "a", "b", "e", "m1", "x"])))
def test_each_roster_answers_as_its_members(first, changes, fold_after, online):
    """A roster of 0 to 5 members through random changes (a member removed then added back,
    a role given and taken, a change back to what the table says), its changes folded at any
    point (FOLD_AFTER 0 to 32: past it plus the square root of the members, 0 or 1 in these):
    every roster made, held to the end, answers `role`, `in`, `len`, `online`, `members` and
    `posters` as its members at its change, whatever came after it."""
    from broker import roster as roster_mod
    saved = roster_mod.FOLD_AFTER
    roster_mod.FOLD_AFTER = fold_after
    try:
        held = [(Roster.of(sorted(first.items())), dict(first))]
        for user, role in changes:
            model = dict(held[-1][1])
            if role is None:
                model.pop(user, None)
            else:
                model[user] = role
            held.append((held[-1][0].changed(user, role), model))
    finally:
        roster_mod.FOLD_AFTER = saved
    sessions = {user: [] for user in online}
    for roster, model in held:
        assert len(roster) == roster.size == len(model)
        assert roster.members == sorted(model.items())
        assert roster.posters == sorted(u for u, r in model.items() if r in ("owner", "admin"))
        for user in ["own", "a", "b", "c", "d", "e", "m0", "m1", "m2", "x"]:
            assert roster.role(user) == model.get(user)
            assert (user in roster) == (user in model)
        assert roster.online(sessions) == set(model) & online
        assert roster == Roster.of(sorted(model.items()))
