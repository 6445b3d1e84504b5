"""A batch is bounded by the rows it writes as well as by its commands (`--max-batch-rows`).

A batch of 4,096 posts into a channel of 300 subscribers wrote 1.2 million inbox entries in one
commit, about 2 s of the commit thread holding Python's lock, and every other user's send
waited one and a half such commits (docs/OPERATIONS.md, "One noisy service beside quiet
ones"). Each command now has a weight (broker/weight.py: a post, an inbox entry per member of
its conversation), and a batch is cut, in the users' turns, before it weighs more than the
bound; a command heavier than the bound commits alone.
"""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from broker.committer import MAX_BATCH_ROWS, Committer, Pending, _fair
from broker.config import Config
from broker.fanout import on_committed
from broker.server import Broker
from broker.weight import UNKNOWN_POST_WEIGHT
from storage.commands import Ack, CreateConv, Join, Leave, SendMessage, SetRole
from storage.store import Store

BODY = "x" * 100
SUBSCRIBERS = 300


def _channel(store: Store, owner: str, posters: tuple[str, ...] = ()) -> str:
    """A channel of SUBSCRIBERS members besides its owner and `posters` (admins)."""
    members = tuple(f"sub-{i:03d}" for i in range(SUBSCRIBERS)) + posters
    (out,) = store.execute([CreateConv(owner, "d", "user", "channel", "big", False, members)])
    return out.reply["conv"]


def _broker(store: Store, tmp_path) -> Broker:
    """A broker on `store` (not serving): its weights, its rosters and its fan-out."""
    return Broker(Config(data_dir=tmp_path / "d", port=0), store)


async def _commit_all(broker: Broker, commands: list[object], **limits: object
                      ) -> list[list[object]]:
    """Queue `commands` at once, commit them all with the broker's weights and fan-out; the
    batches."""
    return [batch for batch, _outcomes in await commit_all(broker, commands, **limits)]


async def commit_all(broker: Broker, commands: list[object], **limits: object
                     ) -> list[tuple[list[object], list[object]]]:
    """`_commit_all`, each batch with its outcomes (tests/broker/test_batch_rows.py)."""
    store = broker.store
    batches: list[tuple[list[object], list[object]]] = []

    def committed(commands: list[object], outcomes: list[object]) -> None:
        batches.append((commands, outcomes))
        on_committed(broker, commands, outcomes)  # the broker's fan-out: it learns the weights

    committer = Committer(store, weigh=broker.weights.of, on_committed=committed, **limits)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for command in commands:
                committer.enqueue(command)
            await nursery.start(committer.serve)
            await committer.close()
    return batches


def _post(user: str, conv: str, n: int) -> SendMessage:
    return SendMessage(user, "d", "user", f"{user}-{n:05d}", BODY, conv=conv)


async def test_big_channel_posts_are_cut_by_rows_and_a_quiet_send_goes_in_the_first_commit(
        tmp_path):
    """1,000 posts into a channel of 301 members, then a quiet user's direct send: with a bound
    of 30,000 rows no batch writes more than 30,000 inbox entries (once a post taught the
    channel's size), the quiet send commits in the first batch, the posts keep their order
    and each is committed once. Before the bound, one batch held them all: 301,000 entries."""
    store = Store.open(str(tmp_path / "d"))
    try:
        conv = _channel(store, "noisy")
        broker = _broker(store, tmp_path)
        await _commit_all(broker, [_post("noisy", conv, 0)])  # (its size is learnt)
        posts = [_post("noisy", conv, n) for n in range(1, 1001)]
        quiet = SendMessage("quiet", "d", "user", "q1", BODY, to="quiet-peer")
        batches = await _commit_all(broker, [*posts, quiet], max_batch_rows=30_000)
        assert quiet in batches[0]
        for batch in batches:
            entries = sum(SUBSCRIBERS + 1 if c.conv else 2 for c in batch)
            assert entries <= 30_000, [len(b) for b in batches]
        assert len(batches) >= 1000 * (SUBSCRIBERS + 1) // 30_000
        sent = [c for batch in batches for c in batch if c.user == "noisy"]
        assert sent == posts
        logged = [e.data["cid"] for e in store.read_events() if e.type == "message.accepted"]
        assert sorted(logged) == sorted(["noisy-00000", *(p.cid for p in posts), "q1"])
    finally:
        store.close()


async def test_posters_share_a_batch_cut_by_rows_in_turns(tmp_path):
    """Three posters with 200 posts each into the channel and a user with 20 direct sends,
    queued one poster after another: the first batch, cut by rows, holds the direct sender's
    20 and about as many of each poster's, the first of each in their order."""
    store = Store.open(str(tmp_path / "d"))
    try:
        conv = _channel(store, "p0", ("p1", "p2"))
        broker = _broker(store, tmp_path)
        await _commit_all(broker, [_post("p0", conv, 999)])  # (its size is learnt)
        queued = [_post(f"p{u}", conv, n) for u in range(3) for n in range(200)]
        queued += [SendMessage("dm", "d", "user", f"dm-{n:02d}", BODY, to="peer")
                   for n in range(20)]
        batches = await _commit_all(broker, queued, max_batch_rows=20_000)
        weight = SUBSCRIBERS + 3
        cut = batches[0]
        assert [c.cid for c in cut if c.user == "dm"] == [f"dm-{n:02d}" for n in range(20)]
        counts = [sum(1 for c in cut if c.user == f"p{u}") for u in range(3)]
        assert max(counts) - min(counts) <= 1
        assert sum(counts) * weight + 20 * 2 <= 20_000 < (sum(counts) + 1) * weight + 40
        for u in range(3):
            theirs = [c for b in batches for c in b if c.user == f"p{u}"]
            assert theirs == [c for c in queued if c.user == f"p{u}"]
    finally:
        store.close()


async def test_a_command_heavier_than_the_bound_commits_alone(tmp_path):
    """With a bound of 100 rows, each post into the channel of 301 members (weight 301) is a
    batch of its own, and a direct send queued after the first post goes in the next."""
    store = Store.open(str(tmp_path / "d"))
    try:
        conv = _channel(store, "noisy")
        broker = _broker(store, tmp_path)
        await _commit_all(broker, [_post("noisy", conv, 99)])  # (its size is learnt)
        posts = [_post("noisy", conv, n) for n in range(3)]
        quiet = SendMessage("quiet", "d", "user", "q1", BODY, to="quiet-peer")
        batches = await _commit_all(broker, [posts[0], quiet, *posts[1:]], max_batch_rows=100)
        assert batches == [[posts[0]], [quiet], [posts[1]], [posts[2]]]
    finally:
        store.close()


async def test_a_weigh_that_raises_cuts_by_count_and_the_commits_go_on(tmp_path):
    """A `weigh` that raises (a bug in the broker's estimate) costs neither the commits nor
    the bound by rows: each batch is cut by its count alone (3), the store stops it at the
    bound (1 row: after each send, of 2), every command commits once in its order, and the
    failure is logged. `_take` runs in `serve`: the exception ended the committer's task, and
    the broker with it; until the store held the bound, each commit held 3 sends."""
    from structlog.testing import capture_logs

    def broken(command: object) -> int:
        raise RuntimeError("a bug in the estimate")

    store = Store.open(str(tmp_path / "d"))
    batches: list[list[object]] = []
    committer = Committer(store, max_batch=3, max_batch_rows=1, weigh=broken,
                          on_committed=lambda commands, outcomes: batches.append(commands))
    sends = [SendMessage("a", "d", "user", f"c{n}", BODY, to="b") for n in range(7)]
    try:
        with trio.fail_after(60), capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                for send in sends:
                    committer.enqueue(send)
                await nursery.start(committer.serve)
                await committer.close()
        assert batches == [[send] for send in sends]
        assert {e["event"] for e in logs if e["log_level"] == "error"} == {"batch_weigh_failed"}
    finally:
        store.close()


def test_the_weight_of_a_post_is_learnt_from_its_commits(tmp_path):
    """A post into a channel weighs UNKNOWN_POST_WEIGHT until one commits (its roster not
    cached), then the entries that post wrote; a member leaving takes one off; a direct send
    weighs 2, a create a row per member, anything else 1."""
    store = Store.open(str(tmp_path / "d"))
    try:
        conv = _channel(store, "own")
        broker = _broker(store, tmp_path)
        weigh = broker.weights.of
        post = SendMessage("own", "d", "user", "c1", BODY, conv=conv)
        assert weigh(post) == UNKNOWN_POST_WEIGHT
        commands = [post]
        on_committed(broker, commands, store.execute(commands))
        assert weigh(post) == SUBSCRIBERS + 1
        commands = [Leave("sub-000", "d", "user", conv)]
        on_committed(broker, commands, store.execute(commands))
        assert weigh(post) == SUBSCRIBERS
        assert weigh(SendMessage("a", "d", "user", "c", BODY, to="b")) == 2
        assert weigh(CreateConv("a", "d", "user", "group", "g", False, ("b", "c"))) == 3
        assert weigh(Ack("a", "d", "user", 5)) == 1
    finally:
        store.close()


async def test_members_who_joined_since_the_last_post_count_in_its_weight(tmp_path):
    """An open channel whose one post was its owner's alone, then joined by 300 (a role change
    in between): 1,000 posts queued then are cut at 30,000 rows from the first batch. A join
    was not counted, so the first batch weighed each post 1 and held all 1,000, 301,000 inbox
    entries, ten times the bound."""
    store = Store.open(str(tmp_path / "d"))
    try:
        (out,) = store.execute([CreateConv("own", "d", "user", "channel", "big", True, ())])
        conv = out.reply["conv"]
        broker = _broker(store, tmp_path)
        await _commit_all(broker, [_post("own", conv, 0)])  # (its size is learnt: 1)
        joins = [Join(f"sub-{i:03d}", "d", "user", conv) for i in range(SUBSCRIBERS)]
        await _commit_all(broker, [*joins, SetRole("own", "d", "user", conv, "sub-000", "admin")])
        assert broker.weights.of(_post("own", conv, 1)) == SUBSCRIBERS + 1
        posts = [_post("own", conv, n) for n in range(1, 1001)]
        batches = await _commit_all(broker, posts, max_batch_rows=30_000)
        assert max(len(b) for b in batches) * (SUBSCRIBERS + 1) <= 30_000
        assert [c for b in batches for c in b] == posts
    finally:
        store.close()


def test_the_flag_and_the_committer_agree_on_the_default():
    """`--max-batch-rows`' default (Config, which the client commands load without the
    committer) is the committer's."""
    assert Config().max_batch_rows == MAX_BATCH_ROWS == 32768


def test_a_cached_roster_weighs_a_post_before_any_commit(tmp_path):
    """A channel whose roster the broker read (a receipt, a presence walk) weighs its members
    from the first post."""
    store = Store.open(str(tmp_path / "d"))
    try:
        conv = _channel(store, "own")
        broker = _broker(store, tmp_path)
        broker.roster(conv)
        assert broker.weights.of(_post("own", conv, 1)) == SUBSCRIBERS + 1
    finally:
        store.close()


def _pending(user: str, n: int, weight: int) -> Pending:
    return Pending(SendMessage(user, "d", "user", f"c{n}", BODY, conv=f"grp:{weight}"), None)


def _weigh(command: SendMessage) -> int:
    return int(command.conv[4:])


@given(queue=st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 400)), max_size=150),
       limit=st.integers(1, 64), rows=st.integers(1, 3000))
def test_a_cut_by_rows_keeps_each_users_order_and_takes_the_turns_first(queue, limit, rows):
    """`_fair` with weights: batch and rest partition the queue in its order, each user's
    commands in the batch are the first of theirs, the batch holds at most `limit` commands
    and weighs at most `rows` (or is one command), and it is the longest run of the queue in
    turn order (each user's first, then each user's second, ...) within both bounds."""
    pending = [_pending(u, i, w) for i, (u, w) in enumerate(queue)]
    batch, rest = _fair(pending, limit, rows, _weigh)
    position = {id(p): i for i, p in enumerate(pending)}
    assert sorted(map(id, batch + rest)) == sorted(map(id, pending))
    assert [position[id(p)] for p in batch] == sorted(position[id(p)] for p in batch)
    assert [position[id(p)] for p in rest] == sorted(position[id(p)] for p in rest)
    for u in "abcde":
        theirs = [p for p in pending if p.command.user == u]
        mine = [p for p in batch if p.command.user == u]
        assert mine == theirs[:len(mine)]
    weight = sum(_weigh(p.command) for p in batch)
    assert len(batch) <= limit
    assert weight <= rows or len(batch) == 1
    if pending:
        assert batch
    # the turn order: each command's rank among its user's, then its place in the queue
    seen: dict[str, int] = {}
    order = []
    for i, p in enumerate(pending):
        seen[p.command.user] = seen.get(p.command.user, -1) + 1
        order.append((seen[p.command.user], i, p))
    order.sort(key=lambda t: t[:2])
    in_turns = [p for _rank, _i, p in order]
    assert {id(p) for p in batch} == {id(p) for p in in_turns[:len(batch)]}
    if rest:  # the next in turn order would pass a bound
        nxt = in_turns[len(batch)]
        assert len(batch) == limit or weight + _weigh(nxt.command) > rows
