"""Group commit through the broker's committer, on a real LMDB store."""

from __future__ import annotations

import threading
import time

import trio

from broker.committer import ACKS_EVERY_OTHER_FROM, Committer
from storage.commands import Ack, SendMessage, SetMute
from storage.errors import StorageFull
from storage.store import Store

BODY = "x" * 200


async def test_concurrent_appenders_share_batches_and_resume_only_when_durable(tmp_path):
    """64 appenders get batched commits; each sees its own event committed when it resumes."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    seen_unreadable = []

    async def appender(ix: int) -> None:
        for n in range(20):
            out = await committer.submit(
                SendMessage(f"u{ix}", "d", "user", f"{ix}-{n}", BODY, to=f"v{ix}"))
            assert out.error is None
            # Resumed: the event must already be committed (visible to a fresh read txn).
            events = list(store.read_events(out.lsn, out.lsn))
            if not events or events[0].data["cid"] != f"{ix}-{n}":
                seen_unreadable.append(out.lsn)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                async with trio.open_nursery() as appenders:
                    for i in range(64):
                        appenders.start_soon(appender, i)
                await committer.close()
        assert seen_unreadable == []
        assert committer.commands == 64 * 20
        assert committer.batches < committer.commands / 4  # batching really happened
        assert store.verify_log() == store.last_lsn()
    finally:
        store.close()


async def test_max_batch_bounds_a_commit_and_keeps_the_order(tmp_path):
    """Ten commands queued at once with max_batch=3 commit as 3 + 3 + 3 + 1, in order."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store, max_batch=3)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                pendings = [committer.enqueue(SendMessage("a", "d", "user", f"c{n}", BODY,
                                                          to="b")) for n in range(10)]
                await nursery.start(committer.serve)
                await committer.close()
        assert (committer.batches, committer.commands) == (4, 10)
        assert [p.outcome.lsn for p in pendings] == sorted(p.outcome.lsn for p in pendings)
    finally:
        store.close()


async def test_the_event_loop_keeps_running_during_a_commit(tmp_path):
    """While a large batch commits in the worker thread, other trio tasks keep running."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store, max_batch=10_000)
    ticks_during = 0
    committing = False

    async def ticker() -> None:
        nonlocal ticks_during
        while True:
            await trio.sleep(0)
            if committing:
                ticks_during += 1

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                nursery.start_soon(ticker)
                pendings = [committer.enqueue(SendMessage("a", "d", "user", f"c{n}", BODY,
                                                          to="b")) for n in range(5000)]
                committing = True
                last = pendings[-1]
                last.event = trio.Event()
                await last.event.wait()
                committing = False
                assert all(p.outcome is not None and p.outcome.error is None for p in pendings)
                nursery.cancel_scope.cancel()
        assert ticks_during > 10
    finally:
        store.close()


async def test_acks_of_one_device_are_coalesced(tmp_path):
    """Queued acks of one device merge into one command carrying the highest mark, and the
    highest seq of each conversation they name (the merge took the last one's, lowering the
    receipt of a message delivered and acked)."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                for n in range(3):
                    await committer.submit(SendMessage("a", "d", "user", f"c{n}", BODY, to="b"))
                for upto in (1, 3, 2):
                    committer.ack_nowait(Ack("b", "phone", "user", upto, (("dm:a:b", upto),)))
                assert committer.acked_mark("b", "phone") == 3
                await committer.close()
        assert store.delivered("b", "phone") == 3
        acks = [e for e in store.read_events(1) if e.type == "delivery.acked"]
        assert [(e.data["upto"], e.data["convs"]) for e in acks] == [(3, {"dm:a:b": 3})]
        assert store.receipts("dm:a:b", 3)[1] == ["b"]
        assert committer.acked_mark("b", "phone") == 0
    finally:
        store.close()


class _Recording(Store):
    """A real store that records the commands of each batch it executes."""

    def execute(self, commands, now_us=None, max_rows=None):
        self.batches.append([_label(c) for c in commands])
        return super().execute(commands, now_us, max_rows)


def _label(command) -> str:
    if isinstance(command, SendMessage):
        return command.cid
    if isinstance(command, Ack):
        return f"ack:{command.device}"
    return type(command).__name__


async def _batches_of(tmp_path, queued: list[object]) -> list[list[str]]:
    """The batches `queued` (enqueued before the committer starts; acks as ack_nowait makes
    them) commit in, with max_batch=3."""
    store = _Recording.open(str(tmp_path / "d"))
    store.batches = []
    committer = Committer(store, max_batch=3)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for command in queued:
                    if isinstance(command, Ack):
                        committer.ack_nowait(command)
                    else:
                        committer.enqueue(command)
                await nursery.start(committer.serve)
                await committer.close()
        return store.batches
    finally:
        store.close()


def _sends(numbers) -> list[SendMessage]:
    return [SendMessage("a", "d", "user", f"s{n}", BODY, to="b") for n in numbers]


async def test_under_load_acks_join_every_other_batch(tmp_path):
    """A batch after one with acks takes the sends alone when ACKS_EVERY_OTHER_FROM or more
    are queued with nothing but acks beside them; the acks go in the batch after."""
    assert ACKS_EVERY_OTHER_FROM == 8  # the queues below are built around it
    phone, laptop = Ack("b", "phone", "user", 0, ()), Ack("b", "laptop", "user", 0, ())
    batches = await _batches_of(tmp_path / "load", [phone, *_sends(range(2)), laptop,
                                                    *_sends(range(2, 10))])
    assert batches == [["ack:phone", "s0", "s1"], ["s2", "s3", "s4"],
                       ["ack:laptop", "s5", "s6"], ["s7", "s8", "s9"]]
    # Seven sends: the ack keeps its place.
    batches = await _batches_of(tmp_path / "light", [phone, *_sends(range(2)), laptop,
                                                     *_sends(range(2, 9))])
    assert batches[1] == ["ack:laptop", "s2", "s3"]
    # Another command queued: nothing passes an ack.
    mute = SetMute("b", "laptop", "user", "dm:a:b", True)
    batches = await _batches_of(tmp_path / "other", [phone, *_sends(range(2)), laptop,
                                                     *_sends(range(2, 10)), mute])
    assert batches[1] == ["ack:laptop", "s2", "s3"]


async def test_a_commit_of_only_acks_waits_for_other_work_but_not_longer(tmp_path):
    """Queued acks alone linger up to ACK_LINGER_S; a send arriving meanwhile shares their
    commit at once."""
    # Two lingers, each far from what a busy machine adds: a send must not wait out one of
    # 20 s (a bound of 10 s tells the two apart), and an ack alone must wait out one of 2 s
    # (only a lower bound on the clock, and a look at 0.2 s, 1.8 s before it is out).
    store = Store.open(str(tmp_path / "d"))
    try:
        with trio.fail_after(45):
            committer = Committer(store, ack_linger_s=20.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                await committer.submit(SendMessage("a", "d", "user", "c0", BODY, to="b"))
                batches = committer.batches
                committer.ack_nowait(Ack("b", "phone", "user", 1, ()))
                await trio.sleep(0.05)
                assert committer.batches == batches  # still lingering
                start = trio.current_time()
                await committer.submit(SendMessage("a", "d", "user", "c1", BODY, to="b"))
                assert trio.current_time() - start < 10  # the send did not wait the linger out
                assert committer.batches == batches + 1  # one commit for the ack and the send
                assert store.delivered("b", "phone") == 1
                await committer.close()
        with trio.fail_after(30):
            committer = Committer(store, ack_linger_s=2.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                batches = committer.batches
                start = trio.current_time()
                committer.ack_nowait(Ack("b", "phone", "user", 2, ()))
                await trio.sleep(0.2)
                assert store.delivered("b", "phone") == 1  # lingering
                assert committer.batches == batches
                while store.delivered("b", "phone") != 2:  # then committed alone, whenever a
                    await trio.sleep(0.02)                # busy machine gets to it (fail_after)
                assert trio.current_time() - start >= 2.0  # not before the linger was out
                await committer.close()
    finally:
        store.close()


class _WatchedStore(Store):
    """A real store that records which cid each batch began with, and can hold a batch (or
    fail it as a full disk fails a commit) until the test releases it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.began: list[str] = []
        self.hold: dict[str, threading.Event] = {}
        self.fail: set[str] = set()

    def execute(self, commands, now_us=None, max_rows=None):
        first = commands[0].cid
        self.began.append(first)
        if first in self.hold:
            self.hold[first].wait(10)
        if first in self.fail:
            raise StorageFull("disk full (test)")
        return super().execute(commands, now_us, max_rows)


async def _two_batches(committer: Committer, store: _WatchedStore):
    """Queue cid "a", and once its batch is in the worker, cid "b": the next batch. Batch "a"
    is held in the worker until "b" is queued, so "b" cannot miss it however fast "a" commits."""
    store.hold["a"] = threading.Event()
    first = committer.enqueue(SendMessage("u", "d", "user", "a", BODY, to="v"))
    first.event = trio.Event()
    while store.began != ["a"]:
        await trio.sleep(0.001)
    second = committer.enqueue(SendMessage("u", "d", "user", "b", BODY, to="v"))
    second.event = trio.Event()
    store.hold["a"].set()
    return first, second


async def test_the_next_batch_commits_while_the_last_one_fans_out(tmp_path):
    """Batch 2 is in the worker thread before batch 1's replies and fan-out run; both are told
    their outcomes in commit order, each only once durable."""
    store = _WatchedStore.open(str(tmp_path / "d"))
    store.hold["b"] = threading.Event()
    fanned: list[tuple[list[str], list[str]]] = []  # (cids of the batch, batches begun then)
    problems: list[str] = []  # no assert in the callback: the committer swallows what it raises

    def on_committed(commands, outcomes):
        if commands[0].cid == "a":  # give batch 2 time to reach the worker, if it was handed on
            deadline = time.monotonic() + 5
            while "b" not in store.began and time.monotonic() < deadline:
                time.sleep(0.001)
        fanned.append(([c.cid for c in commands], list(store.began)))
        for c, o in zip(commands, outcomes, strict=True):
            if o.error is not None:
                problems.append(f"{c.cid}: {o.error!r}")
                continue
            logged = [e.data["cid"] for e in store.read_events(o.lsn, o.lsn)]
            if logged != [c.cid]:
                problems.append(f"{c.cid} told lsn {o.lsn}, which holds {logged}")

    committer = Committer(store, on_committed=on_committed)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                first, second = await _two_batches(committer, store)
                await first.event.wait()
                # Batch 1's fan-out ran while batch 2 was already in the worker (held there).
                assert fanned == [(["a"], ["a", "b"])]
                assert second.outcome is None
                store.hold["b"].set()
                await second.event.wait()
                await committer.close()
        assert [cids for cids, _ in fanned] == [["a"], ["b"]]
        assert problems == []
        assert second.outcome.lsn > first.outcome.lsn
    finally:
        store.hold["b"].set()
        store.close()


async def test_a_failed_batch_fails_only_its_own_commands_while_the_last_one_fans_out(tmp_path):
    """A batch that fails (a full disk) while the previous one fans out fails only its own
    commands; the earlier batch's appenders are told success, the later ones go on."""
    store = _WatchedStore.open(str(tmp_path / "d"))
    store.hold["b"] = threading.Event()
    store.fail.add("b")
    committer = Committer(store)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                first, second = await _two_batches(committer, store)
                await first.event.wait()
                store.hold["b"].set()
                await second.event.wait()
                third = await committer.submit(SendMessage("u", "d", "user", "c", BODY, to="v"))
                await committer.close()
        assert first.error is None and first.outcome.error is None
        assert isinstance(second.error, StorageFull)
        assert third.error is None and third.lsn > first.outcome.lsn
        assert [e.data["cid"] for e in store.read_events() if "cid" in e.data] == ["a", "c"]
    finally:
        store.hold["b"].set()
        store.close()


async def test_after_sends_on_way_waits_for_the_last_send_queued_or_committing(tmp_path):
    """`after_sends_on_way` calls back once every send queued or being committed when it was
    asked is durable (visible to a fresh read), not before; only the user's own sends count;
    with only acks queued and nothing committing there is nothing to wait for, and it says so
    without calling back. A callback that raises does not keep the others of the same command
    from running."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    seen: list[tuple[str, bool]] = []

    def asked(name: str, cid: str):
        def callback(failed: BaseException | None) -> None:
            seen.append((name, store.sent("a", cid)))
        return callback

    def broken(failed: BaseException | None) -> None:
        raise RuntimeError("a callback's bug")

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                assert not committer.after_sends_on_way("a", asked("none", "c0"))
                committer.ack_nowait(Ack("b", "d", "user", 0))
                assert not committer.after_sends_on_way("a", asked("acks only", "c0"))
                for n in range(3):
                    committer.enqueue(SendMessage("a", "d", "user", f"c{n}", BODY, to="b"))
                assert committer.after_sends_on_way("a", broken)
                # only the user's own sends: another's are no resend of theirs (2026-12-06)
                assert not committer.after_sends_on_way("b", asked("other user", "c0"))
                assert committer.after_sends_on_way("a", asked("queued", "c2"))
                await nursery.start(committer.serve)
                await trio.sleep(0)  # the batch is in the worker thread now
                assert committer.queued == 0 and committer.batches == 0
                committer.ack_nowait(Ack("b", "d", "user", 0))
                assert committer.after_sends_on_way("a", asked("committing", "c2"))
                await committer.close()
        assert seen == [("queued", True), ("committing", True)]
    finally:
        store.close()


async def test_a_submitters_failing_done_keeps_the_sends_on_way_callbacks_running(tmp_path):
    """The `done` of the send that `after_sends_on_way` waits on (its own sender's reply) runs
    first; if it raises, the callbacks of the others waiting on it (refused resends of other
    connections, each counted in its session's inflight) still run, and the failure is logged
    once: they were skipped, leaving those requests unanswered for good."""
    from structlog.testing import capture_logs

    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    seen: list[bool] = []

    def broken_done(pending) -> None:
        raise RuntimeError("a reply's bug")

    try:
        with trio.fail_after(60), capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                committer.enqueue(SendMessage("a", "d", "user", "c0", BODY, to="b"), broken_done)
                assert committer.after_sends_on_way("a",
                                                    lambda failed: seen.append(failed is None))
                await nursery.start(committer.serve)
                await committer.close()
        assert seen == [True]
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "commit_callback_failed"]
    finally:
        store.close()


async def test_sends_on_way_of_an_owner_follow_the_queue_and_the_batch_committing(tmp_path):
    """`sends_on_way_of(owner)` (a stop asks it of each session: grouped once, not scanned per
    session) gives the sends queued or being committed whose context is the owner's, the batch
    committing first; never one already told its outcome, though it was grouped before: a
    stop would answer it a second time."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    alice, bob = object(), object()

    def send(owner: object, cid: str):
        return committer.enqueue(SendMessage("a", "d", "user", cid, BODY, to="b"), None,
                                 (owner, cid))

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                first = send(alice, "c1")
                committer.ack_nowait(Ack("a", "d", "user", 0))
                assert committer.sends_on_way_of(alice) == [first]
                assert committer.sends_on_way_of(bob) == []
                second, theirs = send(alice, "c2"), send(bob, "c3")
                assert committer.sends_on_way_of(alice) == [first, second]
                assert committer.sends_on_way_of(bob) == [theirs]
                await nursery.start(committer.serve)
                await trio.sleep(0)  # the batch is in the worker thread now
                third = send(alice, "c4")
                assert committer.sends_on_way_of(alice) == [first, second, third]
                while first.outcome is None:
                    await trio.sleep(0.001)
                assert committer.sends_on_way_of(alice) in ([third], [])
                await committer.close()
                assert third.outcome is not None
                assert committer.sends_on_way_of(alice) == []
    finally:
        store.close()
