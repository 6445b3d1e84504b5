"""Replay equals incremental: random command batches on a real Store, checked against replay."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from storage import audit, buffered_tables
from storage import records as r
from storage.commands import (
    Ack,
    CreateConv,
    Invite,
    Join,
    Leave,
    MarkRead,
    Remove,
    RevokeTokens,
    SendMessage,
    SetMute,
    SetRole,
)
from storage.errors import Conflict, Invalid, LimitExceeded
from storage.memory_tables import MemoryTables
from storage.projections import Effects, apply, mark_applied
from storage.records import u64
from storage.rules import Limits
from storage.store import Store, _InjectedAbort
from tests.storage.test_member_count import assert_member_caches_fresh

USERS = ["ann", "bob", "cat", "dan", "eve"]
# Steps of `around_posts`, in one batch: posts and membership changes of one open group.
story_step = st.tuples(st.sampled_from(["post", "join", "leave", "invite", "remove"]),
                       st.integers(1, len(USERS) - 2))  # not its owner ann, nor eve (admin)
# Small enough that some creates (up to 3 members and the creator) and invites pass it.
LIMITS = Limits(max_members=3)
ROLES = ["user", "user", "user", "service", "admin"]

user_ix = st.integers(0, len(USERS) - 1)
conv_ix = st.integers(0, 7)
small = st.integers(0, 12)

command_spec = st.one_of(
    st.tuples(st.just("send"), user_ix, conv_ix, st.integers(0, 5), st.booleans()),
    st.tuples(st.just("dm"), user_ix, user_ix, st.integers(0, 5)),
    st.tuples(st.just("create"), user_ix, st.sampled_from(["group", "channel", "bogus"]),
              st.booleans(), st.lists(user_ix, max_size=3),
              st.one_of(st.none(), st.integers(0, 2))),
    st.tuples(st.just("invite"), user_ix, conv_ix, user_ix, st.sampled_from(["member", "admin"])),
    st.tuples(st.just("set_role"), user_ix, conv_ix, user_ix,
              st.sampled_from(["member", "admin"]), st.booleans()),
    st.tuples(st.just("join"), user_ix, conv_ix),
    st.tuples(st.just("leave"), user_ix, conv_ix),
    st.tuples(st.just("remove"), user_ix, conv_ix, user_ix, st.booleans()),
    st.tuples(st.just("ack"), user_ix, st.sampled_from(["d1", "d2"]), small),
    st.tuples(st.just("read"), user_ix, conv_ix, small),
    st.tuples(st.just("mute"), user_ix, conv_ix, st.booleans()),
    st.tuples(st.just("role"), user_ix, conv_ix, st.integers(0, 5)),
    st.tuples(st.just("revoke"), user_ix, user_ix),
)


def make_command(spec, convs: list[str]):
    """The command a `command_spec` draw stands for, over the conversations known so far."""
    kind, u = spec[0], USERS[spec[1]]

    def conv(ix: int) -> str:
        return convs[ix % len(convs)]

    if kind == "send":
        return SendMessage(u, "d1", "user", f"c{spec[3]}", "body", conv=conv(spec[2]))
    if kind == "dm":
        return SendMessage(u, "d1", "user", f"c{spec[3]}", b"\x00bin", to=USERS[spec[2]])
    if kind == "create":
        members = tuple(USERS[i] for i in spec[4])
        cid = None if spec[5] is None else f"k{spec[5]}"  # repeats: dups, or a kind's conflict
        return CreateConv(u, "d1", "user", spec[2], "n", spec[3], members, cid)
    if kind == "invite":
        return Invite(u, "d1", "user", conv(spec[2]), USERS[spec[3]], spec[4])
    if kind == "set_role":
        # Half of them with an admin token, which acts as owner: more of them change a role.
        role = "admin" if spec[5] else ROLES[spec[1]]
        return SetRole(u, "d1", role, conv(spec[2]), USERS[spec[3]], spec[4])
    if kind == "join":
        return Join(u, "d1", "user", conv(spec[2]))
    if kind == "leave":
        return Leave(u, "d1", "user", conv(spec[2]))
    if kind == "remove":
        # Half of them with an admin token, as for set_role: more of them remove someone.
        role = "admin" if spec[4] else ROLES[spec[1]]
        return Remove(u, "d1", role, conv(spec[2]), USERS[spec[3]])
    if kind == "ack":
        return Ack(u, spec[2], "user", spec[3])
    if kind == "read":
        return MarkRead(u, "d1", "user", conv(spec[2]), spec[3])
    if kind == "mute":
        return SetMute(u, "d1", "user", conv(spec[2]), spec[3])
    if kind == "revoke":  # only eve's admin token may: the others are refused
        return RevokeTokens(u, "d1", ROLES[spec[1]], USERS[spec[2]])
    return SendMessage(u, "d2", ROLES[spec[1]], f"r{spec[3]}", "as role", conv=conv(spec[2]))


def run_batch(store: Store, specs, convs: list[str]) -> tuple[list, list]:
    """Execute one batch of `command_spec` draws; remember the conversations it created.
    Return the commands and their outcomes."""
    commands = [make_command(s, convs) for s in specs]
    outcomes = store.execute(commands)
    for out in outcomes:
        if out.reply and out.reply.get("conv") and out.reply["conv"] not in convs:
            convs.append(out.reply["conv"])
    return commands, outcomes


class StoreMachine(RuleBasedStateMachine):
    """Drives a Store with valid and invalid commands; projections must always equal replay."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="homing-model-")
        self.store = Store.open(self.dir, map_size=256 * 1024, limits=LIMITS)
        self.convs: list[str] = ["grp:0000000000000000"]
        self.accepted: set[tuple[str, str]] = set()  # (sender, cid) of every send logged
        self.created: dict[tuple[str, str], str] = {}  # (creator, cid) -> conv it made
        self.story: str | None = None  # the open group of `around_posts`, once made
        self.story_posts = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(specs=st.lists(command_spec, min_size=1, max_size=8))
    def batch(self, specs):
        """Execute a batch; every command gets an outcome and created convs are remembered."""
        commands, outcomes = run_batch(self.store, specs, self.convs)
        assert len(outcomes) == len(specs)
        for command, out in zip(commands, outcomes, strict=True):
            assert (out.reply is None) != (out.error is None)
            if isinstance(command, SendMessage) and out.error is None:
                # Idempotency: a cid its sender had sent is a duplicate, and only such a cid.
                key = (command.user, command.cid)
                assert out.reply["dup"] == (key in self.accepted), (key, out.reply)
                self.accepted.add(key)
            if isinstance(command, CreateConv) and command.cid is not None:
                self.check_create(command, out)

    def check_create(self, command: CreateConv, out) -> None:
        """Idempotent create: a (creator, cid) that made a conversation is answered with it,
        dup and nothing logged, whatever else the repeat asks (more members than the limit
        too); for the other kind, Conflict."""
        key = (command.user, command.cid)
        first = self.created.get(key)
        if command.kind not in ("group", "channel"):
            assert isinstance(out.error, Invalid), out
        elif first is None and len(set(command.members) - {command.user}) >= LIMITS.max_members:
            assert isinstance(out.error, LimitExceeded), out
        elif first is None:
            assert out.error is None and out.reply["dup"] is False, out
            self.created[key] = out.reply["conv"]
        elif first.startswith("grp:" if command.kind == "group" else "chn:"):
            assert out.reply == {"conv": first, "dup": True}, (key, out)
            assert out.lsn == 0  # nothing logged
        else:
            assert isinstance(out.error, Conflict), (key, out)

    @precondition(lambda self: self.created)
    @rule(data=st.data())
    def repeat_create(self, data):
        """A create repeated with a cid that made a conversation, of either kind, with any
        members (past the limit too) and name: the first conversation, or Conflict, and
        nothing logged. The random batches above repeat a create's cid too seldom (a dozen
        times in a run) to be relied on."""
        user, cid = data.draw(st.sampled_from(sorted(self.created)))
        kind = data.draw(st.sampled_from(["group", "channel"]))
        members = tuple(USERS[i] for i in data.draw(st.lists(user_ix, max_size=4)))
        name = data.draw(st.sampled_from([None, "n", "another name"]))
        command = CreateConv(user, "d1", ROLES[USERS.index(user)], kind, name, False, members,
                             cid)
        before = self.store.last_lsn()
        (out,) = self.store.execute([command])
        self.check_create(command, out)
        assert self.store.last_lsn() == before

    @rule(steps=st.lists(story_step, min_size=1, max_size=8))
    def around_posts(self, steps):
        """One batch of posts and joins, leaves, invites and removals in one open group (the
        random batches above seldom reach a conversation with messages that someone joins
        later): late joiners, rejoins, and members added before and after a post of the same
        batch, so that `joined` rows are made and dropped."""
        if self.story is None:
            (made,) = self.store.execute([CreateConv("ann", "d1", "user", "group", "story", True,
                                                     ("bob",))])
            self.story = made.reply["conv"]
            self.convs.append(self.story)
        commands = []
        for kind, ix in steps:
            u = USERS[ix]
            if kind == "post":
                self.story_posts += 1
                commands.append(SendMessage(u, "d1", "user", f"s{self.story_posts}", "body",
                                            conv=self.story))
            elif kind == "join":
                commands.append(Join(u, "d1", "user", self.story))
            elif kind == "leave":
                commands.append(Leave(u, "d1", "user", self.story))
            elif kind == "invite":
                commands.append(Invite("ann", "d1", "user", self.story, u, "member"))
            else:
                commands.append(Remove("ann", "d1", "user", self.story, u))
        self.store.execute(commands)

    @rule(who=st.integers(1, len(USERS) - 2), split=st.booleans(), data=st.data())
    def there_and_back(self, who, split, data):
        """A member muted then unmuted, made an admin then a plain member again, in one batch
        or two: the random batches above never logged an unmute (`mute.set` false) nor a
        step down (`member.role_set` member) in 150 runs, as each needs the state the other
        half of the pair makes."""
        shared = [c for c in self.convs if not c.startswith("dm:")]
        if not shared:
            return
        conv, u = data.draw(st.sampled_from(shared)), USERS[who]
        there = [Invite("eve", "d1", "admin", conv, u, "member"),
                 SetRole("eve", "d1", "admin", conv, u, "admin"),
                 SetMute(u, "d1", "user", conv, True)]
        back = [SetRole("eve", "d1", "admin", conv, u, "member"),
                SetMute(u, "d1", "user", conv, False)]
        batches = [there, back] if split else [there + back]
        for batch in batches:
            self.store.execute(batch)

    @rule(specs=st.lists(command_spec, min_size=1, max_size=8), data=st.data())
    def aborted_batch(self, specs, data):
        """A batch aborted after k commands leaves nothing behind."""
        k = data.draw(st.integers(0, len(specs) - 1))
        before = self.store.last_lsn()
        self.store._abort_after = k
        try:
            self.store.execute([make_command(s, self.convs) for s in specs])
            raise AssertionError("batch was not aborted")
        except _InjectedAbort:
            pass
        finally:
            self.store._abort_after = None
        assert self.store.last_lsn() == before

    @rule()
    def reopen(self):
        """Closing and reopening keeps log and projections."""
        before = self.store.dump_projections()
        self.store.close()
        self.store = Store.open(self.dir, limits=LIMITS)
        assert self.store.dump_projections() == before

    @precondition(lambda self: self.store.last_lsn() > 0)
    @rule()
    def rebuild(self):
        """rebuild() reproduces the stored projections byte for byte."""
        before = self.store.dump_projections()
        assert self.store.rebuild() == self.store.last_lsn()
        assert self.store.dump_projections() == before

    @invariant()
    def projections_equal_replay(self):
        """Stored projections equal a fresh fold of the log, and the chain verifies."""
        assert self.store.check_projections() is None
        assert self.store.verify_log() == self.store.last_lsn()

    @invariant()
    def receipts_count_the_audience(self):
        """`receipts` of every message names its audience as the log tells it: the members,
        but its sender, when it was posted, less any removed or gone since (one who came back
        counts from their return, PROTOCOL.md §9); `delivered` and `read` are among them."""
        members: dict[str, set[str]] = {}
        posted: dict[str, list[set[str]]] = {}
        for ev in self.store.read_events():
            d = ev.data
            if ev.type == r.MEMBER_ADDED:
                members.setdefault(d["conv"], set()).add(d["user"])
            elif ev.type == r.MEMBER_REMOVED:
                members.setdefault(d["conv"], set()).discard(d["user"])
                for audience in posted.get(d["conv"], ()):
                    audience.discard(d["user"])
            elif ev.type == r.MESSAGE_ACCEPTED:
                posted.setdefault(d["conv"], []).append(
                    members.get(d["conv"], set()) - {ev.user})
        for conv, audiences in posted.items():
            for seq, audience in enumerate(audiences, 1):
                listed, delivered, read = self.store.receipts(conv, seq)
                assert listed == sorted(audience), (conv, seq)
                assert set(read) <= set(delivered) <= set(listed), (conv, seq)

    @invariant()
    def member_caches_agree(self):
        """The member counts and lists the store keeps across batches (`invite` and `join`
        check `--max-members` with them, posts fan out over them) equal a fresh read of the
        committed rows, whatever batches committed or aborted before."""
        assert_member_caches_fresh(self.store)

    @invariant()
    def acks_skip_only_entries_counted(self):
        """An ack without its conversations reads the inbox past the user's highest device
        mark only (`delivered`'s `user \0`, raised by the acks of the batch before it too): a
        replay in which every ack reads its entries from its own device's mark instead (the
        logged `convs` left out: what the fold does with an ack logged before acks carried
        them) gives the same projections, `recv` and the highest marks included, and each
        user's highest mark is the greatest of their device rows."""
        tables = MemoryTables()
        for ev in self.store.read_events():
            if ev.type == r.DELIVERY_ACKED:
                ev = replace(ev, data={"upto": ev.data["upto"]})
            apply(tables, ev, Effects())
        mark_applied(tables, self.store.last_lsn())
        stored = self.store.replay()
        assert dict(tables.recv.items()) == dict(stored.recv.items())
        assert tables.items() == stored.items()
        highest: dict[bytes, int] = {}
        marks = {}
        for key, value in stored.delivered.items():
            user, device = key.split(b"\0", 1)
            if device:
                highest[user] = max(highest.get(user, 0), u64(value))
            else:
                marks[user] = u64(value)
        assert marks == highest

    @invariant()
    def fast_paths_agree(self):
        """The replay fold (raw records, messages inlined) writes exactly what `apply` event by
        event does, and the audit's digest check agrees with the row-by-row one."""
        by_event = MemoryTables()
        fx = Effects()
        for ev in self.store.read_events():
            apply(by_event, ev, fx)
        mark_applied(by_event, self.store.last_lsn())
        assert self.store.replay().items() == by_event.items()
        assert audit.check_projections(self.store) == (None, self.store.last_lsn())


class StoreMachineNoGroupsKept(StoreMachine):
    """The same with no member lists kept across batches (as past CACHE_ROWS, when a broker's
    groups hold more members than it keeps): the counts stay, kept up to date alone."""

    def __init__(self) -> None:
        self._cache_rows = buffered_tables.CACHE_ROWS
        buffered_tables.CACHE_ROWS = 0
        super().__init__()

    def teardown(self) -> None:
        buffered_tables.CACHE_ROWS = self._cache_rows
        super().teardown()


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# 60 runs of each machine in the default suite (150 until 2026-12-07: 19 and 22 s of a worker on
# 2 cores, the two slowest tests of the suite), 450 under -m long.
for _machine in (StoreMachine, StoreMachineNoGroupsKept):
    _machine.TestCase.settings = _settings(60)
TestStoreMachine = StoreMachine.TestCase
TestStoreMachineNoGroupsKept = StoreMachineNoGroupsKept.TestCase


@pytest.mark.long
class TestStoreMachineLong(StoreMachine.TestCase):
    settings = _settings(450)


@pytest.mark.long
class TestStoreMachineNoGroupsKeptLong(StoreMachineNoGroupsKept.TestCase):
    settings = _settings(450)
