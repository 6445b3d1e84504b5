"""The committer against a real store, under random interleavings, duplicates and failed batches.

Whatever the batch boundaries turn out to be (appenders yield at random points, so batches form
while earlier ones commit and fan out), and whichever batches fail as a full disk fails them:
every command is told its outcome exactly once, after its batch is durable, in submission
order; a failed batch fails exactly its own commands; and the log holds exactly the accepted
sends, in submission order, each cid once.
"""

from __future__ import annotations

import tempfile

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.committer import Committer, Pending
from storage.commands import Ack, SendMessage
from storage.errors import StorageFull
from storage.store import Store

USERS = ["u0", "u1", "u2"]

# An appender's step: send (user, cid number; repeats are retries), ack, or yield to the others.
steps = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 12)),
    st.tuples(st.just("ack"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("yield"), st.just(0), st.just(0)),
), max_size=25)


class _FailingStore(Store):
    """A real store whose batches numbered in `fail` fail as a full disk fails a commit."""

    fail: frozenset[int] = frozenset()

    def execute(self, commands, now_us=None):
        self.batches.append((commands, len(self.batches) + 1 in self.fail))
        if self.batches[-1][1]:
            raise StorageFull("disk full (test)")
        return super().execute(commands, now_us)


async def _run(store: _FailingStore, plans: list[list[tuple[str, int, int]]]):
    told: list[Pending] = []  # in the order commands were told their outcomes
    submitted: list[Pending] = []
    fanned: list[list[object]] = []
    early: list[tuple[int, int]] = []  # (lsn told, last durable lsn) of outcomes told too soon

    def done(p: Pending) -> None:
        # No assert here: the committer logs and swallows what a callback raises.
        told.append(p)
        if p.error is None:  # told only once durable: a fresh read transaction sees it
            durable = store.last_lsn()
            if p.outcome.lsn > durable:
                early.append((p.outcome.lsn, durable))

    committer = Committer(store, on_committed=lambda cmds, outs: fanned.append(cmds),
                          ack_linger_s=0.001)

    async def appender(ix: int, plan: list[tuple[str, int, int]]) -> None:
        for kind, user, number in plan:
            if kind == "yield":
                await trio.sleep(0)
            elif kind == "send":
                cmd = SendMessage(USERS[user], f"d{ix}", "user", f"c{number}", "x", to="sink")
                submitted.append(committer.enqueue(cmd, done))
            else:
                committer.ack_nowait(Ack(USERS[user], f"d{ix}", "user", 0, ()))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(committer.serve)
            async with trio.open_nursery() as appenders:
                for ix, plan in enumerate(plans):
                    appenders.start_soon(appender, ix, plan)
            await committer.close()
    assert early == [], f"outcomes told before their LSN was durable: {early[:5]}"
    return told, submitted, fanned


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(steps, min_size=1, max_size=4),
       fail=st.frozensets(st.integers(1, 12), max_size=3))
def test_every_command_is_told_once_in_order_and_failures_stay_in_their_batch(plans, fail):
    """Random appenders over a real store with some batches failing: see the module doc."""
    with tempfile.TemporaryDirectory() as d:
        store = _FailingStore.open(d)
        store.fail, store.batches = fail, []
        try:
            told, submitted, fanned = trio.run(_run, store, plans)
            assert [id(p) for p in told] == [id(p) for p in submitted]  # once each, in order
            # A send failed exactly when its batch did, and with the batch's error.
            by_command = {id(p.command): p for p in submitted}
            for commands, failed in store.batches:
                for c in commands:
                    if id(c) in by_command:
                        p = by_command.pop(id(c))
                        assert isinstance(p.error, StorageFull) if failed else p.error is None
            assert by_command == {}  # every send was in some batch
            ok = [p for p in submitted if p.error is None]
            lsns = [p.outcome.lsn for p in ok if not p.outcome.reply["dup"]]
            assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
            # Fan-outs came in commit order and hold exactly the successful batches' sends.
            fanned_sends = [c for batch in fanned for c in batch if type(c) is SendMessage]
            assert [id(c) for c in fanned_sends] == [id(p.command) for p in ok]
            # The log: each accepted send's cid once per sender, in submission order.
            first = {}
            for p in ok:
                first.setdefault((p.command.user, p.command.cid), p.outcome.lsn)
            logged = [(e.user, e.data["cid"]) for e in store.read_events()
                      if e.type == "message.accepted"]
            assert logged == sorted(first, key=first.get)
            assert store.verify_log() == store.last_lsn()
        finally:
            store.close()
