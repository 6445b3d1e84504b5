"""A group commit holds its row bound exactly, whatever the weights estimate (`--max-batch-rows`).

The committer cuts a batch by its commands' estimated rows (broker/weight.py); a post into a
channel the broker has not seen a post into since it started weighs UNKNOWN_POST_WEIGHT (64).
So right after a restart, posts flooding a channel of thousands made commits of tens of
thousands of rows past the bound (a channel of 10,000 at the default bound: 512 posts, 5.1
million inbox entries, one commit). The store now stops a batch once the commands it ran wrote
`max_batch_rows` rows and commits those (`Store.execute`'s `max_rows`); the committer puts the
commands not run back at the head of its queue, in their order (`Committer._put_back`).
"""

from __future__ import annotations

import tempfile
import threading

import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import protocol as wire
from broker.committer import Committer, Pending
from broker.config import Config
from broker.server import Broker
from broker.stats import report_stats, stats_reply
from broker.weight import UNKNOWN_POST_WEIGHT
from storage.commands import Ack, CreateConv, RevokeTokens, SendMessage
from storage.errors import StorageFull
from storage.rules import Limits
from storage.store import Store
from tests.broker.test_batch_weight import commit_all
from tests.broker.test_committer_model import run_appenders

BODY = "x" * 100
MEMBERS = 2_000  # the channel's, its owner among them
BOUND = 4_000  # --max-batch-rows of the tests: two posts into the channel


def _rows(outcomes: list) -> list[int]:
    """The rows each command of a commit wrote, as the bound counts them (its inbox entries,
    one at least)."""
    return [len(o.effects.inbox_heads) or 1 for o in outcomes]


def _post(user: str, conv: str, n: int) -> SendMessage:
    return SendMessage(user, "d", "user", f"{user}-{n:05d}", BODY, conv=conv)


async def _commit_all(broker: Broker, commands: list[object], **limits: object
                      ) -> list[tuple[list[object], list[int]]]:
    """Queue `commands` at once and commit them all with the broker's weights and fan-out;
    each commit's commands and the rows each wrote."""
    return [(batch, _rows(outcomes))
            for batch, outcomes in await commit_all(broker, commands, **limits)]


async def test_a_batch_reaches_the_log_in_the_queues_order_across_users(tmp_path):
    """Bob's three sends, then an admin's revocation of bob, queued at once: one batch, logged
    in the queue's order, so every message bob sent before the revocation precedes it in the
    log, as tests/broker/test_revoke.py promises of a real broker (docs/PROTOCOL.md, `revoke`).
    A batch handed to the store in turn order (every user's first command, then every user's
    second, tried on 2026-12-06 so that a stop at the row bound put back the later turns)
    logged bob's second and third sends after the revocation."""
    store = Store.open(str(tmp_path / "d"))
    try:
        broker = Broker(Config(data_dir=tmp_path / "d", port=0), store)
        sends = [SendMessage("bob", "d", "user", f"b{i}", BODY, to="alice") for i in range(3)]
        revoke = RevokeTokens("ops", "d", "admin", "bob")
        [(batch, outcomes)] = await commit_all(broker, [*sends, revoke])
        assert batch == [*sends, revoke]
        lsns = [o.lsn for o in outcomes]
        assert lsns == sorted(lsns) and all(o.error is None for o in outcomes)
    finally:
        store.close()


async def test_after_a_restart_no_commit_passes_the_row_bound_by_more_than_one_post(tmp_path):
    """A channel of 2,000 members posted into, the broker restarted on the same data, then 100
    posts and a quiet user's direct send queued at once, at a bound of 4,000 rows: every
    commit writes less than the bound before its last command (at most 5,999 rows), the posts
    commit once each in their order, and the quiet send commits. Before, the first two
    batches weighed each post 64 and held 62 of them: commits of 124,000 inbox entries, 31
    times the bound."""
    path, limits = str(tmp_path / "d"), Limits(max_members=10_000)  # (--max-members' default)
    store = Store.open(path, limits=limits)
    try:
        members = tuple(f"sub-{i:04d}" for i in range(MEMBERS - 1))
        (out,) = store.execute([CreateConv("own", "d", "user", "channel", "big", False,
                                           members)])
        conv = out.reply["conv"]
        await _commit_all(Broker(Config(data_dir=tmp_path / "d", port=0), store),
                          [_post("own", conv, 0)])
    finally:
        store.close()
    store = Store.open(path, limits=limits)  # the restart: no post into the channel seen
    try:
        broker = Broker(Config(data_dir=tmp_path / "d", port=0), store)
        posts = [_post("own", conv, n) for n in range(1, 101)]
        assert broker.weights.of(posts[0]) == UNKNOWN_POST_WEIGHT
        quiet = SendMessage("quiet", "d", "user", "q1", BODY, to="quiet-peer")
        commits = await _commit_all(broker, [*posts, quiet], max_batch_rows=BOUND)
        largest = max(sum(rows) for _commands, rows in commits)
        for _commands, rows in commits:
            assert sum(rows[:-1]) < BOUND, (largest, [sum(r) for _c, r in commits])
        assert largest <= BOUND + MEMBERS - 1
        assert [c for commands, _rows in commits for c in commands if c.user == "own"] == posts
        assert [quiet] == [c for commands, _rows in commits for c in commands
                           if c.user == "quiet"]
        logged = [e.data["cid"] for e in store.read_events() if e.type == "message.accepted"]
        assert sorted(logged) == sorted(["own-00000", *(p.cid for p in posts), "q1"])
    finally:
        store.close()


async def test_a_batch_the_store_stops_is_counted_in_the_stats_and_logged_once_per_10_s(
        tmp_path):
    """Three users' direct sends queued at once, each weighing nothing (a wrong estimate), at a
    bound of 2 rows: the store stops the first batch after one send (2 rows) and the second
    too. Both stops are counted: the `stats` reply's `commits_stopped` is 2 and a
    `broker_stats` line's `commits_stopped_per_s` is above 0; one `batch_stopped` line names
    the first (2 rows written, the bound 2, 1 committed, 2 put back, 1 stop), the second
    falling within its 10 s. Until 2026-12-06 nothing told such a stop."""
    store = Store.open(str(tmp_path / "d"))
    try:
        with capture_logs() as logs, trio.fail_after(30):
            broker = Broker(Config(data_dir=tmp_path / "d", port=0), store)
            committer = broker.committer = Committer(store, max_batch_rows=2,
                                                     weigh=lambda command: 0)

            def stats_lines() -> list[dict]:
                return [e for e in logs if e["event"] == "broker_stats"]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(report_stats, broker, 0.01)
                while not stats_lines():  # it counts from here
                    await trio.sleep(0.01)
                sends = [committer.enqueue(SendMessage(u, "d", "user", "c1", BODY, to="peer"))
                         for u in ("a", "b", "c")]
                await nursery.start(committer.serve)
                await committer.close()
                while not any(s["commits_stopped_per_s"] > 0 for s in stats_lines()):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert all(p.outcome.error is None for p in sends)
        assert committer.batches == 3
        assert stats_reply(broker, wire.Stats(1)).commits_stopped == 2
        stopped = [e for e in logs if e["event"] == "batch_stopped"]
        assert [{k: e[k] for k in ("rows", "bound", "committed", "put_back", "stopped")}
                for e in stopped] == [
            {"rows": 2, "bound": 2, "committed": 1, "put_back": 2, "stopped": 1}]
        assert stopped[0]["log_level"] == "info"
    finally:
        store.close()


class _Held(Store):
    """A real store whose first execute waits for `release` (after saying so on `began`)."""

    def execute(self, commands, now_us=None, max_rows=None):
        if not self.began.is_set():
            self.began.set()
            self.release.wait(10)
        return super().execute(commands, now_us, max_rows)


async def test_a_wait_for_a_users_sends_on_their_way_outlasts_the_row_bounds_put_back(tmp_path):
    """`after_sends_on_way(u)` asked while u's sends are all in the batch committing calls
    back only once every one of them is done, though the store stops that batch at the row
    bound and puts the rest back, and another user's command put back with them commits
    first. It waited for the batch's last command, whoever's: here o's, done a commit before
    u's last send, so a refused resend waiting on it was asked again too early."""
    store = _Held.open(str(tmp_path / "d"))
    store.began, store.release = threading.Event(), threading.Event()
    calls = iter(range(1_000))
    # A wrong estimate, then a right one: the first batch weighs nothing (all five commands
    # in it, stopped by the store after two sends: 4 rows), the next 2 rows a send.
    committer = Committer(store, max_batch_rows=4,
                          weigh=lambda command: 0 if next(calls) < 5 else 2)
    mine = [committer.enqueue(SendMessage("u", "d", "user", f"u{n}", BODY, to="v"))
            for n in range(4)]
    theirs = committer.enqueue(SendMessage("o", "d", "user", "o1", BODY, to="p"))
    seen: list[list[bool]] = []
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                while not store.began.is_set():
                    await trio.sleep(0.001)
                assert committer.after_sends_on_way(
                    "u", lambda failed: seen.append([p.outcome is not None for p in mine]))
                store.release.set()
                await committer.close()
        assert theirs.outcome.lsn < mine[-1].outcome.lsn  # o's went ahead of u's last send
        assert seen == [[True] * 4]
    finally:
        store.close()


# ---------------------------------------------------------------- the invariants, at random

USERS = ["u0", "u1", "u2", "u3"]
EXTRA = [f"m{i}" for i in range(12)]  # members who never act
GROUP_SIZES = (4, 8, 16)  # u0..u3 and extra members: the rows a post into each writes


class _Bounded(Store):
    """A real store recording each execute: the commands passed, how many ran and the rows
    each wrote, or "full" for the batches numbered in `fail` (a full disk fails them)."""

    fail: frozenset[int] = frozenset()

    def execute(self, commands, now_us=None, max_rows=None):
        self.runs.append((list(commands), max_rows, None))
        if len(self.runs) in self.fail:
            raise StorageFull("disk full (test)")
        outcomes = super().execute(commands, now_us, max_rows)
        self.runs[-1] = (list(commands), max_rows, _rows(outcomes))
        return outcomes


steps = st.lists(st.one_of(
    st.tuples(st.just("dm"), st.sampled_from(USERS), st.integers(0, 3)),
    st.tuples(st.just("post"), st.sampled_from(USERS), st.integers(0, len(GROUP_SIZES) - 1)),
    st.tuples(st.just("ack"), st.sampled_from(USERS), st.integers(0, 4)),
    st.tuples(st.just("yield"), st.just(""), st.just(0)),
), max_size=20)


async def _flood(store: _Bounded, groups: list[str], plans: list, limits: dict, weight: int):
    told: dict[int, int] = {}
    submitted: list[Pending] = []
    committer = Committer(store, weigh=lambda command: weight, ack_linger_s=0.001, **limits)

    def done(p: Pending) -> None:
        told[id(p)] = told.get(id(p), 0) + 1

    async def appender(ix: int, plan: list) -> None:
        for n, (kind, user, arg) in enumerate(plan):
            if kind == "yield":
                await trio.sleep(0)
            elif kind == "ack":
                committer.ack_nowait(Ack(user, f"d{ix}", "user", arg, None))
            else:
                to, conv = (USERS[arg], None) if kind == "dm" else (None, groups[arg])
                cmd = SendMessage(user, f"d{ix}", "user", f"a{ix}-{n}", BODY, conv=conv, to=to)
                submitted.append(committer.enqueue(cmd, done))

    await run_appenders(committer, appender, plans)
    return committer, submitted, told


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(steps, min_size=1, max_size=4), weight=st.integers(0, 3),
       max_batch=st.integers(1, 12), max_rows=st.integers(1, 24),
       fail=st.frozensets(st.integers(1, 12), max_size=2))
def test_no_command_is_lost_or_doubled_each_users_order_holds_and_commits_hold_the_bound(
        plans, weight, max_batch, max_rows, fail):
    """Random appenders of direct sends, posts into groups of 4, 8 and 16 and acks, a wrong
    estimate (every command weighs the same, 0 to 3, where a post writes 4 to 16), random
    bounds and some batches failing as a full disk fails them: every send is told once; one
    committed ran in exactly one commit, one failed in none; each user's sends ran in their
    submission order; every commit wrote less than the bound before its last command; the
    stored projections equal a replay of the log; and once all is done no ack is left queued,
    unsynced or pending in the committer's bookkeeping."""
    with tempfile.TemporaryDirectory() as d:
        store = _Bounded.open(d)
        store.runs, store.fail = [], frozenset()
        try:
            groups = []
            for size in GROUP_SIZES:
                members = (*USERS[1:], *EXTRA[:size - len(USERS)])
                (out,) = store.execute([CreateConv("u0", "d", "user", "group", None, False,
                                                   members)])
                groups.append(out.reply["conv"])
            store.runs, store.fail = [], fail
            committer, submitted, told = trio.run(
                _flood, store, groups, plans,
                {"max_batch": max_batch, "max_batch_rows": max_rows}, weight)
            difference = store.check_projections()  # stopped batches are smaller commits
        finally:
            store.close()
    assert difference is None, difference  # the projections equal a replay of the log
    assert all(told.get(id(p)) == 1 for p in submitted), "a send told never or twice"
    ran = [c for commands, _bound, rows in store.runs if rows is not None
           for c in commands[:len(rows)]]
    counts: dict[int, int] = {}
    for c in ran:
        counts[id(c)] = counts.get(id(c), 0) + 1
    for p in submitted:
        assert counts.get(id(p.command), 0) == (1 if p.error is None else 0), p.error
        assert p.error is None or isinstance(p.error, StorageFull)
    for user in USERS:
        theirs = [c for c in ran if type(c) is SendMessage and c.user == user]
        order = [p.command for p in submitted if p.command.user == user and p.error is None]
        assert theirs == order
    event(f"the store stopped a batch: {any(r and len(r) < len(c) for c, _b, r in store.runs)}")
    for commands, bound, rows in store.runs:
        assert bound == max_rows
        if rows is not None:
            assert rows and sum(rows[:-1]) < max_rows, (rows, max_rows)
            assert len(rows) <= len(commands) <= max_batch
    assert (committer.queued, committer._acks, committer._last_acks,
            committer._unsynced_acks) == (0, {}, {}, {})
    if not fail:
        assert committer._acks_lost == {}
