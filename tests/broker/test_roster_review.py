"""The broker's cached member lists (`Broker.roster`) through membership changes: updated,
not read again; each change made a new `Roster` (one held by a walk in progress stays as it
was), and after the commits' fan-outs every cached roster is the store's member list.

Each change dropped the group's roster, so the next receipt, typing notice or presence walk
read its whole member list again on the event loop (8 ms a join in a group of 10,000, with
the join's fan-out; bench/bench_members.py). Reads are counted here, never timed.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

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
            assert broker.rosters.members == sum(len(r.members) for r in held)
            assert broker.rosters.members <= broker.rosters.max_members
        while behind:
            on_committed(broker, *behind.pop(0))
        assert broker.roster(conv) == _fresh(store, conv)
    finally:
        store.close()
