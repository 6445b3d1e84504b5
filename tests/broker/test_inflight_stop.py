"""A stop while a connection waits at --max-inflight-requests (2026-12-06): the queries and
pings already read behind the request that filled the limit are answered before the closing
`shutting_down` (PROTOCOL.md §6); the requests that would await a commit past the limit are
left unanswered, nothing done, as a request a stop could not answer in time is, so that every
client, the SDK of any version, sends them again after the reconnect."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import trio

import protocol as wire
from broker import server
from broker.client import ClientError, ConnectionLost
from tests import stalls
from tests.broker.test_resend_review import held_commits
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess

LIMIT = 4


async def _answers_then_closing(raw: RawClient) -> dict:
    """Every frame `raw` receives until the broker closes, by id; the last is the closing
    `shutting_down`."""
    got = []
    while (f := await raw.next()) is not None:
        got.append(f)
    assert (got[-1].name, got[-1].close) == ("shutting_down", True), got[-1]
    return {f.id: f for f in got[:-1]}


def _send(i: int) -> wire.Send:
    return wire.Send(id=i, cid=f"order-{i}", body=f"order {i} ready", to="bob")


async def test_a_stop_at_the_inflight_limit_answers_every_frame_read_behind_it(tmp_path):
    """Commits held, a client pipelines 10 sends, each with a ping behind it, past
    --max-inflight-requests 4, and the broker stops: the 4 sends admitted are committed and
    answered `result`, the 6 behind them left unanswered (nothing done: none of them in the
    log), every ping `pong`, then the closing `shutting_down`. Until 2026-12-06 the stop
    cancelled the reader's wait and only the first 4 pings were answered; for a few hours that
    day the 6 sends were answered `shutting_down` with their ids, which every SDK raises."""
    async with running_broker(tmp_path / "data", max_inflight_requests=LIMIT) as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("shop"), "d")
            [session] = h.broker.hub.sessions("shop")
            async with held_commits(h.broker.store):
                await raw.stream.send_all(b"".join(
                    raw.conn.send(frame) for i in range(1, 11)
                    for frame in (_send(i), wire.Ping(id=100 + i))))
                while session.inflight < LIMIT:
                    await trio.sleep(0.01)
                await trio.sleep(0.2)  # every frame read, the reader waiting at the limit
                assert session.inflight == LIMIT
                h.broker.shutdown()
                await trio.sleep(0.2)
            answered = await _answers_then_closing(raw)
            assert sorted(answered) == [*range(1, LIMIT + 1), *range(101, 111)], sorted(
                answered)
            assert all(isinstance(answered[i], wire.Result) and not answered[i].dup
                       for i in range(1, LIMIT + 1)), answered
            assert all(isinstance(answered[i], wire.Pong) for i in range(101, 111))
            await h.broker.wait_stopped()
            store = h.broker.store
            assert [i for i in range(1, 11) if store.sent("shop", f"order-{i}")] == [
                *range(1, LIMIT + 1)]
            await raw.aclose()


async def read_at_once_then_stopped(bp: BrokerProcess,
                                    start: Callable[[], Awaitable[None]]) -> None:
    """With `bp`'s commits held, `await start()` (an SDK's requests made) while `bp` is
    SIGSTOPped, so that it reads all they write at once; then, a commit under way, SIGTERM:
    returns once `bp` exited 0, its commits released."""
    async with stalls.held_commits(bp.data):
        bp.proc.send_signal(signal.SIGSTOP)
        try:
            await start()
            await trio.sleep(0.3)
        finally:
            bp.proc.send_signal(signal.SIGCONT)
        while not stalls.committing(bp, 1):
            await trio.sleep(0.05)
        bp.proc.send_signal(signal.SIGTERM)
        await trio.sleep(0.3)
    assert await trio.to_thread.run_sync(bp.proc.wait, 20) == 0


async def test_the_sdk_sends_again_what_a_stop_left_behind_the_limit(tmp_path):
    """The SDK with 10 sends waiting past --max-inflight-requests 4 of a broker that stops
    (commits held meanwhile) and starts again on the same port: every send returns its
    `result`, each message stored once: the stop left the 6 behind the limit unanswered
    (`passed_over` 6 on the connection's `connection_closed`) and the SDK sent them again
    after the reconnect. Answered `shutting_down` with their ids (as for a few hours of
    2026-12-06), those 6 raised ClientError `shutting_down`."""
    bodies = [f"order {i} ready" for i in range(10)]
    with BrokerProcess(tmp_path / "data", "--max-inflight-requests", str(LIMIT),
                       "--shutdown-grace", "2", "--stats-interval", "1") as bp:
        results, failed = {}, {}
        async with bp.client("shop", "d1", reconnect_timeout=30) as client:

            async def send(body: str) -> None:
                try:
                    results[body] = await client.send(body, to="bob")
                except ClientError as exc:
                    failed[body] = exc

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:

                    async def start() -> None:
                        for body in bodies:
                            nursery.start_soon(send, body)

                    await read_at_once_then_stopped(bp, start)
                    [first] = [e for e in bp.log_events() if e.get("event") == "connection_closed"
                               and e.get("user") == "shop"]
                    assert (first["reason"], first["frames_in"], first.get("passed_over")) == (
                        "shutdown", 10, 6), first
                    await bp.astart()
        assert not failed, failed
        assert sorted(results) == sorted(bodies)
        assert sorted(await stalls.conversation_bodies(bp, "shop", "dm:bob:shop")) == sorted(
            bodies)


async def test_every_request_that_would_await_a_commit_is_left_past_the_limit_at_a_stop(
        tmp_path):
    """Behind 2 sends that fill --max-inflight-requests 2 when the broker stops: a `create`, an
    `ack` and a `read` with ids, a `read` without one, a `revoke` and an `invite` are each
    left unanswered, nothing done: the revoke ends no session of its user; a ping among them
    answered `pong`, then the closing `shutting_down`."""
    async with running_broker(tmp_path / "data", max_inflight_requests=2) as h:
        with trio.fail_after(30):
            bob = await RawClient.connect(h.server, h.token("bob"), "d")
            raw = await RawClient.connect(h.server, h.token("ops", "admin"), "d")
            [session] = h.broker.hub.sessions("ops")
            async with held_commits(h.broker.store):
                await raw.stream.send_all(b"".join(raw.conn.send(frame) for frame in (
                    _send(1), _send(2), wire.Create(id=3, kind="group", name="g"),
                    wire.Ack(id=4, upto=0), wire.Read(id=5, conv="dm:bob:ops", upto=1),
                    wire.Read(id=None, conv="dm:bob:ops", upto=1), wire.Revoke(id=7, user="bob"),
                    wire.Ping(id=8), wire.Invite(id=9, conv="dm:bob:ops", user="carol"))))
                while session.inflight < 2:
                    await trio.sleep(0.01)
                await trio.sleep(0.2)
                h.broker.shutdown()
                await trio.sleep(0.2)
            answered = await _answers_then_closing(raw)
            assert sorted(answered) == [1, 2, 8], answered
            assert all(isinstance(answered[i], wire.Result) for i in (1, 2))
            assert isinstance(answered[8], wire.Pong)
            closing = await bob.next()
            assert (closing.name, closing.close) == ("shutting_down", True), closing
            await h.broker.wait_stopped()
            assert not h.broker.revoking
            done = [e["command"] for e in h.logs if e.get("event") == "command_done"]
            assert done == ["SendMessage", "SendMessage"], done  # the two sends alone
            [closed] = [e for e in h.logs if e.get("event") == "connection_closed"
                        and e.get("user") == "ops"]
            assert closed["passed_over"] == 6, closed
            await raw.aclose()
            await bob.aclose()


async def test_a_request_read_after_one_left_at_a_stop_is_left_too(tmp_path):
    """Once a stop left a send past the limit unanswered, a send read after it is left as
    well, though the commits that held the limit finished meanwhile (600 history pages between
    the two take the reader tens of milliseconds, the commits released during them, and all
    answered): taken, it would be done before the one left, which the client sends again
    after it. Neither is in the log."""
    async with running_broker(tmp_path / "data", max_inflight_requests=LIMIT) as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("shop"), "d")
            for i in range(20):
                await raw.send(wire.Send(id=i, cid=f"old-{i}", body="old", to="bob"))
                assert isinstance(await raw.reply(i), wire.Result)
            [session] = h.broker.hub.sessions("shop")
            pages = [wire.History(id=1000 + i, conv="dm:bob:shop", after=0, limit=20,
                                  order="oldest") for i in range(600)]
            async with held_commits(h.broker.store):
                await raw.stream.send_all(b"".join(raw.conn.send(frame) for frame in (
                    *(_send(i) for i in range(1, LIMIT + 2)), *pages, _send(99))))
                while session.inflight < LIMIT:
                    await trio.sleep(0.01)
                await trio.sleep(0.2)
                h.broker.shutdown()
                await trio.sleep(0.002)  # the pages are being answered
            answered = await _answers_then_closing(raw)
            assert all(isinstance(answered[i], wire.Result) for i in range(1, LIMIT + 1))
            assert len([i for i in answered if i >= 1000]) == 600
            assert sorted(i for i in answered if i < 1000) == [*range(1, LIMIT + 1)], answered
            await h.broker.wait_stopped()
            store = h.broker.store
            assert not store.sent("shop", f"order-{LIMIT + 1}")
            assert not store.sent("shop", "order-99")
            await raw.aclose()


async def test_a_stop_held_by_its_last_commit_says_so_then_commits_it(tmp_path):
    """A send whose commit is held (a disk that stopped answering) when SIGTERM comes, with
    --shutdown-grace 0.5: the connection is told `shutting_down` within the grace, and the stop
    then waits for that commit. While it waits it logs `stop_waiting_for_commit` (warning,
    docs/OPERATIONS.md "Running the broker"), the commit's commands counted; until 2026-12-07
    the log said nothing after `broker_stopping` for as long as the disk held it. Once the
    disk answers the send is committed and the broker exits 0."""
    with BrokerProcess(tmp_path / "data", "--shutdown-grace", "0.5",
                       "--stats-interval", "1") as bp:
        async with bp.client("shop", "d1", reconnect=False) as client:
            async with stalls.held_commits(bp.data):
                async with trio.open_nursery() as nursery:
                    async def send() -> None:
                        with trio.move_on_after(30):  # cut by the stop, never answered
                            try:
                                await client.send("held order", to="bob", cid="held-1")
                            except (ClientError, ConnectionLost):  # the stop ends it
                                pass

                    nursery.start_soon(send)
                    with trio.fail_after(20):
                        while not stalls.committing(bp, 1):
                            await trio.sleep(0.05)
                    bp.proc.send_signal(signal.SIGTERM)
                    with trio.fail_after(20):
                        while not (said := [e for e in bp.log_events()
                                            if e.get("event") == "stop_waiting_for_commit"]):
                            await trio.sleep(0.05)
                    assert bp.alive()  # the stop waits for the held commit
            assert await trio.to_thread.run_sync(bp.proc.wait, 20) == 0
    first = said[0]
    assert first["level"] == "warning", first
    assert first["committing"] == 1 and first["queued"] == 0, first
    assert first["waited_s"] >= 1.0 and first["commit_running_ms"] >= 1000, first
    events = [e["event"] for e in bp.log_events()]
    assert events.index("stop_waiting_for_commit") < events.index("broker_stopped")
    store = bp.open_store(readonly=True)
    try:
        assert store.sent("shop", "held-1")  # committed once the disk answered
    finally:
        store.close()


async def test_a_stop_waits_line_is_not_said_when_nothing_waits(tmp_path):
    """`stop_waiting_for_commit` names the commands a stop waits for: with none committing
    and none queued (a last commit that ended as its 1 s ran out, the stop ending in the same
    turn of the event loop) there is nothing to say. For a few hours of 2026-12-07 the line
    was said then too, `committing` 0 and `queued` 0: a stop waiting for nothing."""
    async with running_broker(tmp_path / "data") as h:
        assert (h.broker.committer.committing, h.broker.committer.queued) == (0, 0)
        with trio.move_on_after(server.STOP_WAIT_WARN_S + 0.5):
            await h.broker._say_stop_waits()
        assert not [e for e in h.logs if e["event"] == "stop_waiting_for_commit"], h.logs
