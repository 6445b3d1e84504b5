"""The reader's shielded waits of 2026-12-06 (`Session.wait_inflight` at
--max-inflight-requests, `Session._wait_drained` for the writer) against what could hold them
longer than before: the broker cancelled from outside while a reader is held (as a
`trio.fail_after` around `Broker.serve` would), and a stop while a client reads slowly."""

from __future__ import annotations

import trio

import protocol as wire
from broker import tokens
from broker.config import Config
from broker.server import Broker
from storage.rules import Limits
from storage.store import Store
from tests.broker.test_inflight_stop_review import pipelined_big_pages
from tests.broker.test_resend_review import held_commits
from tests.faults.conftest import RawClient
from tests.harness import running_broker


async def test_a_broker_cancelled_from_outside_ends_with_a_reader_held_at_the_limit(tmp_path):
    """Five sends of another user committing one a batch, then three sends pipelined at
    --max-inflight-requests 2, while the commits are held: the reader holds at the limit. The
    scope around `Broker.serve` is cancelled, then the commits let go. `serve` ends at once:
    the committer, whose waits for the commit thread are not cancellation points, still
    commits what is queued, and the hold ends with the first of those requests answered.
    (Found sound, kept as a guard: a hold only a stop or the session's end cuts short.)"""
    config = Config(data_dir=tmp_path / "data", port=0, max_inflight_requests=2,
                    max_batch=1)
    store = Store.open(str(config.data_dir), record_cache=config.record_cache, limits=Limits(
        max_members=config.max_members, max_body_bytes=config.max_body_bytes))
    broker = Broker(config, store)
    serving, ended = trio.CancelScope(), trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with serving:
            await broker.serve(task_status=task_status)
        ended.set()

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve)
                raw = await RawClient.connect(
                    f"127.0.0.1:{port}", tokens.issue(broker.secret, "shop", "user", 3600), "d")
                other = await RawClient.connect(
                    f"127.0.0.1:{port}", tokens.issue(broker.secret, "ann", "user", 3600), "d")
                [session] = broker.hub.sessions("shop")
                async with held_commits(store):
                    await other.stream.send_all(b"".join(other.conn.send(wire.Send(
                        id=i, cid=f"a{i}", body="x", to="bob")) for i in range(5)))
                    while broker.committer._running is None:  # ann's send commits, held
                        await trio.sleep(0.01)
                    await raw.stream.send_all(b"".join(raw.conn.send(wire.Send(
                        id=i, cid=f"c{i}", body="x", to="bob")) for i in range(3)))
                    while session._pause_scope is None:  # the reader holds at the limit
                        await trio.sleep(0.01)
                    cancelled = trio.current_time()
                    serving.cancel()
                    await trio.sleep(0.2)
                with trio.move_on_after(10):
                    await ended.wait()
                took = trio.current_time() - cancelled
                if not ended.is_set():
                    session.abort(session.reason)  # let the test end, failed
                assert ended.is_set() and took < 5, took
                await raw.aclose()
                await other.aclose()
    finally:
        store.close()


async def test_a_stop_does_not_wait_long_for_a_client_that_reads_slowly(tmp_path):
    """As tests/broker/test_inflight_stop_review.py's client that reads nothing, but one that
    reads about 2.5 MB/s: each wait of the reader for the writer (4 MiB queued) then ends
    within FLUSH_ON_CLOSE_S, and another follows for the next pages read. The stop still
    waits FLUSH_ON_CLOSE_S at most, counted once from the stop, not once a wait: the broker
    is stopped within 8 s, not at --shutdown-grace's end (30 s: 32 s before 2026-12-06)."""
    async with running_broker(tmp_path / "data", shutdown_grace_s=30.0,
                              idle_timeout_s=60.0) as h:
        with trio.fail_after(90):
            raw, session = await pipelined_big_pages(h)
            async with trio.open_nursery() as nursery:

                async def read_slowly() -> None:
                    while await raw.stream.receive_some(65536):
                        await trio.sleep(0.025)  # about 2.6 MB/s

                nursery.start_soon(read_slowly)
                while not session._queue_full():  # the reader waits for the writer
                    await trio.sleep(0.01)
                stopping = trio.current_time()
                h.broker.shutdown()
                await h.broker.wait_stopped()
                took = trio.current_time() - stopping
                nursery.cancel_scope.cancel()
            assert took < 8, took
            await raw.aclose()
