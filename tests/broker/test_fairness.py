"""One user's thousands of queued commands do not hold up another user's one (`Committer._take`)."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from broker.committer import Committer, Pending
from storage.commands import Ack, SendMessage
from storage.store import Store

BODY = "x" * 100


async def _commit_all(store: Store, queued: list[tuple[str, str]], max_batch: int
                      ) -> list[list[object]]:
    """Queue a send per (user, cid) at once, commit them all; the batches' commands."""
    batches: list[list[object]] = []
    committer = Committer(store, max_batch=max_batch,
                          on_committed=lambda commands, outcomes: batches.append(commands))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for user, cid in queued:
                committer.enqueue(SendMessage(user, "d", "user", cid, BODY, to=f"{user}-peer"))
            await nursery.start(committer.serve)
            await committer.close()
    return batches


async def test_a_quiet_send_behind_a_noisy_queue_goes_in_the_next_commit(tmp_path):
    """A quiet user's one send queued behind 3 x max_batch sends of a noisy one is committed in
    the first batch, not the fourth; each user's sends keep their order and every one is
    committed once."""
    store = Store.open(str(tmp_path / "d"))
    try:
        noisy = [("noisy", f"n{i:05d}") for i in range(3 * 64)]
        batches = await _commit_all(store, [*noisy, ("quiet", "q1")], max_batch=64)
        where = {c.cid: i for i, batch in enumerate(batches) for c in batch}
        assert where["q1"] == 0
        assert [len(b) for b in batches] == [64, 64, 64, 1]
        sent = [c.cid for batch in batches for c in batch if c.user == "noisy"]
        assert sent == [cid for _user, cid in noisy]
        logged = [(e.user, e.data["cid"]) for e in store.read_events()
                  if e.type == "message.accepted"]
        assert sorted(logged) == sorted([*noisy, ("quiet", "q1")])
    finally:
        store.close()


async def test_noisy_users_share_a_full_batch_in_turns(tmp_path):
    """Three users with 100, 100 and 5 sends queued, max_batch 30: the first batch holds the
    small one's 5 and 12 or 13 of each big one's, the first of each in their order."""
    store = Store.open(str(tmp_path / "d"))
    try:
        queued = ([("a", f"a{i:03d}") for i in range(100)]
                  + [("b", f"b{i:03d}") for i in range(100)]
                  + [("c", f"c{i:03d}") for i in range(5)])
        batches = await _commit_all(store, queued, max_batch=30)
        first = [c.cid for c in batches[0]]
        assert [cid for cid in first if cid[0] == "c"] == [f"c{i:03d}" for i in range(5)]
        assert [cid for cid in first if cid[0] == "a"] == [f"a{i:03d}" for i in range(13)]
        assert [cid for cid in first if cid[0] == "b"] == [f"b{i:03d}" for i in range(12)]
    finally:
        store.close()


def _pending(user: str, n: int) -> Pending:
    if n % 5 == 4:
        return Pending(Ack(user, "d", "user", n), None)
    return Pending(SendMessage(user, "d", "user", f"c{n}", BODY, to="z"), None)


@given(users=st.lists(st.sampled_from("abcde"), max_size=200), limit=st.integers(1, 64))
def test_a_fair_cut_keeps_each_users_order_and_gives_every_user_a_turn(users, limit):
    """`_fair`: batch and rest partition the queue in its order, the batch holds min(limit,
    queue) commands, each user's in the batch are the first of theirs, and no user has two
    more in it than another with commands left behind."""
    from broker.committer import _fair  # (here: the tests above ran on the code before it)

    queue = [_pending(u, i) for i, u in enumerate(users)]
    batch, rest = _fair(queue, limit)
    assert len(batch) == min(limit, len(queue))
    position = {id(p): i for i, p in enumerate(queue)}
    assert [position[id(p)] for p in batch] == sorted(position[id(p)] for p in batch)
    assert sorted(map(id, batch + rest)) == sorted(map(id, queue))
    assert [position[id(p)] for p in rest] == sorted(position[id(p)] for p in rest)
    taken = {u: sum(1 for p in batch if p.command.user == u) for u in set(users)}
    for u in set(users):
        theirs = [p for p in queue if p.command.user == u]
        assert [p for p in batch if p.command.user == u] == theirs[:taken[u]]
    behind = [u for u in set(users) if taken[u] < users.count(u)]
    for u in behind:  # a user left behind had at least as many turns as anyone, but one
        assert all(taken[v] <= taken[u] + 1 for v in taken)
