"""A review of --read-rate and of the user token's revoke refused before the commit (dee15ea),
as a client meets them: the pause after a refused `read` holds only that connection's reader
(its deliveries and its other frames go on), a stop or a peer gone during it cuts it short, and
a revoke keeps the answers it had when the commit refused it."""

from __future__ import annotations

import trio

import protocol as wire
from tests.faults.conftest import RawClient
from tests.harness import running_broker

CONV = "dm:alice:bob"  # mallory is in no conversation: each read of it is refused `forbidden`


async def test_pushes_go_out_while_the_reader_pauses_after_refused_reads(tmp_path):
    """--read-rate 0.001: 30 pipelined reads past the burst pause the connection's reader
    10 ms each (RATE_PAUSE_MAX_S, not the 1,000 s the rate says), a ping behind them answered
    after those 300 ms; meanwhile its deliveries are written (the writer does not pause)."""
    async with running_broker(tmp_path / "data", reads_per_s_per_user=0.001) as h, \
            h.client("alice") as alice:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("mallory"), "d")
            await raw.send(wire.Read(id=1, conv=CONV, upto=1))  # the burst of one
            assert (await raw.reply(1)).name == "forbidden"
            start = trio.current_time()
            await raw.stream.send_all(b"".join(
                [raw.conn.send(wire.Read(id=i, conv=CONV, upto=1)) for i in range(2, 32)]
                + [raw.conn.send(wire.Ping(id=99))]))
            await trio.sleep(0.05)
            await alice.send("during the pause", to="mallory")
            seen = []
            while True:
                f = await raw.next()
                assert f is not None
                seen.append(f)
                if getattr(f, "id", None) == 99:
                    break
            elapsed = trio.current_time() - start
            kinds = [type(f).__name__ for f in seen]
            assert kinds.count("Error") == 30, kinds
            assert all(f.name == "rate_limited" and 990_000 <= f.retry_ms <= 1_000_000
                       for f in seen if isinstance(f, wire.Error)), seen[0]
            assert 0.3 <= elapsed < 3, elapsed
            pushed = [i for i, f in enumerate(seen) if isinstance(f, wire.Deliver)]
            assert pushed and pushed[0] < len(seen) - 1, kinds  # before the pong
            await raw.aclose()


async def test_a_stop_during_the_pause_answers_every_frame_read_behind_it(tmp_path):
    """The broker stopping while a connection's reader pauses after a refused `read`: the
    pause ends at once, and every request already read behind it is answered (its reads
    `rate_limited`, its pings `pong`) before `shutting_down` (PROTOCOL.md §6). Until 2026-12-06
    the stop cancelled the pause and left them unanswered: 37 of these 200 answered."""
    async with running_broker(tmp_path / "data", reads_per_s_per_user=0.001) as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("mallory"), "d")
            await raw.send(wire.Read(id=1, conv=CONV, upto=1))
            assert (await raw.reply(1)).name == "forbidden"
            frames = []
            for i in range(2, 102):  # a second of pauses
                frames.append(raw.conn.send(wire.Read(id=i, conv=CONV, upto=1)))
                frames.append(raw.conn.send(wire.Ping(id=1000 + i)))
            await raw.stream.send_all(b"".join(frames))
            await trio.sleep(0.2)
            stopping = trio.current_time()
            h.broker.shutdown()
            got = []
            while (f := await raw.next()) is not None:
                got.append(f)
            assert (got[-1].name, got[-1].close) == ("shutting_down", True), got[-1]
            answered = {f.id: f for f in got[:-1]}
            assert sorted(answered) == [*range(2, 102), *range(1002, 1102)], len(answered)
            assert all(answered[i].name == "rate_limited" for i in range(2, 102))
            assert all(isinstance(answered[i], wire.Pong) for i in range(1002, 1102))
            assert trio.current_time() - stopping < 0.5  # the pauses cut short


async def test_a_peer_gone_during_the_pause_is_let_go_without_waiting_it_out(tmp_path):
    """A client that pipelines 300 reads past --read-rate (3 s of pauses) and goes away: its
    session ends once its replies cannot be written, not after the pauses."""
    async with running_broker(tmp_path / "data", reads_per_s_per_user=0.001) as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("mallory"), "d")
            await raw.send(wire.Read(id=1, conv=CONV, upto=1))
            assert (await raw.reply(1)).name == "forbidden"
            await raw.stream.send_all(b"".join(
                raw.conn.send(wire.Read(id=i, conv=CONV, upto=1)) for i in range(2, 302)))
            start = trio.current_time()
            await raw.aclose()
            while any(s.user == "mallory" for s in h.broker.hub.all_sessions()):
                await trio.sleep(0.01)
            assert trio.current_time() - start < 1.5, trio.current_time() - start


async def test_a_revoke_by_any_token_not_an_admins_is_answered_as_the_commit_answered_it(
        tmp_path):
    """User and service tokens, revoking another user, themselves, or a user that never connected:
    `forbidden`, "only an admin token may revoke tokens", the message the rules gave
    (checked against the store's own refusal), the session going on; a monitor token's refused
    as before it is read; an admin's still committed and ends the revoked user's session."""
    from broker.errors import wire_error
    from storage.commands import RevokeTokens

    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(30):
            bob = await RawClient.connect(h.server, h.token("bob"), "d")
            (outcome,) = h.broker.store.execute([RevokeTokens("carol", "d", "user", "bob")])
            expected = wire_error(outcome.error)
            assert expected == (wire.ErrorCode.FORBIDDEN, "only an admin token may revoke tokens")
            for role in ("user", "service"):
                raw = await RawClient.connect(h.server, h.token("carol", role), "d")
                for i, target in enumerate(("bob", "carol", "nobody"), 1):
                    await raw.send(wire.Revoke(id=i, user=target))
                    got = await raw.reply(i)
                    assert (got.code, got.message, got.close) == (*expected, False), got
                await raw.send(wire.Ping(id=9))
                assert isinstance(await raw.reply(9), wire.Pong)
                await raw.aclose()
            raw = await RawClient.connect(h.server)
            await raw.hello(h.token("watch", "monitor"), "d", deliver=False)
            await raw.send(wire.Revoke(id=1, user="bob"))
            got = await raw.reply(1)
            assert (got.name, got.message) == (
                "forbidden", "revoke: a monitor token asks stats and ping only"), got
            await raw.aclose()
            committed = h.broker.committer.commands
            raw = await RawClient.connect(h.server, h.token("root", "admin"), "d")
            await raw.send(wire.Revoke(id=1, user="bob"))
            assert type(await raw.reply(1)).__name__ == "Revoked"
            assert h.broker.committer.commands == committed + 1
            ended = await bob.next()
            assert (ended.name, ended.message, ended.close) == (
                "unauthorized", "token revoked", True), ended
            await raw.aclose()
            await bob.aclose()
