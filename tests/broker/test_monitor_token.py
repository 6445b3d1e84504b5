"""Monitor tokens (`homing token NAME --monitor`): what a monitoring system's configuration holds
may ask the broker's `stats` and `ping`, and nothing else (PROTOCOL.md §10). Until 2026-12-06
`homing health` needed an admin token, which may also post anywhere, read any history and revoke
anyone's tokens."""

from __future__ import annotations

import pytest

import protocol as wire
from broker import tokens
from broker.client import ClientError
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing, last_error, lines
from tests.waits import wait_until

# One request of every kind a client sends but `stats`, `ping` and `typing`, each well formed.
REQUESTS = [
    wire.Send(id=1, cid="c1", body="hi", to="bob"),
    wire.Ack(upto=1, id=2),
    wire.Read(conv="dm:alice:bob", upto=1, id=3),
    wire.History(id=4, conv="dm:alice:bob"),
    wire.Create(id=5, kind="group", name="g", members=("bob",)),
    wire.Invite(id=6, conv="grp:x", user="bob"),
    wire.SetRole(id=7, conv="grp:x", user="bob", role="admin"),
    wire.Remove(id=8, conv="grp:x", user="bob"),
    wire.Join(id=9, conv="grp:x"),
    wire.Subscribe(id=10, conv="chn:x"),
    wire.Leave(id=11, conv="grp:x"),
    wire.Mute(id=12, conv="grp:x"),
    wire.Receipts(id=13, conv="dm:alice:bob", seq=1),
    wire.Members(id=14, conv="dm:alice:bob"),
    wire.Presence(id=15, conv="dm:alice:bob"),
    wire.Convs(id=16),
    wire.Revoke(id=17, user="alice"),
]


def test_every_client_request_but_stats_and_ping_is_covered():
    """A request type added to the protocol must be placed: refused to monitors or allowed."""
    from broker.handlers import HANDLERS, MONITOR_HANDLERS, on_not_monitored

    asked = {type(r) for r in REQUESTS} | {wire.Stats, wire.Ping, wire.Typing}
    assert asked | {wire.Pong, wire.Bye} == set(HANDLERS)
    allowed = {t for t, h in MONITOR_HANDLERS.items() if h is not on_not_monitored}
    assert allowed == {wire.Stats, wire.Ping, wire.Pong, wire.Bye}


async def test_a_monitor_asks_stats_and_ping_and_nothing_else(tmp_path):
    """Each other request is `forbidden` with the connection kept, before any rule or read: the
    log does not move, and a `typing` is dropped (as a non-member's is)."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("alice") as alice:
            await alice.send("before", to="bob", cid="b1")
        # alice's ack of her own send is committed as her session ends: once it is durable,
        # not before (read at once, `lsn` missed it about one run in 15, and the log "moved").
        await wait_until(lambda: h.broker.store.delivered("alice", "d1") == 1)
        lsn = h.broker.store.last_lsn()
        c = await RawClient.connect(h.server)
        try:
            welcome = await c.hello(h.token("nagios", "monitor"), device="check", deliver=False)
            assert welcome.role == "monitor"
            for request in REQUESTS:
                await c.send(request)
                reply = await c.reply(request.id)
                assert isinstance(reply, wire.Error), (request, reply)
                assert reply.code == wire.ErrorCode.FORBIDDEN and not reply.close, reply
                assert "monitor token" in reply.message, reply
            await c.send(wire.Typing(conv="dm:alice:bob"))
            await c.send(wire.Stats(id=99))
            # The very next frame: a `reply` here skipped an answer to the typing (an error
            # without an id), so a typing refused aloud passed as one dropped.
            stats = await c.next()
            assert isinstance(stats, wire.BrokerStats) and stats.lsn == lsn, stats
            await c.send(wire.Ping(id=100))
            assert isinstance(await c.reply(100), wire.Pong)
        finally:
            await c.aclose()
        assert h.broker.store.last_lsn() == lsn


async def test_a_monitor_token_opens_no_delivering_session(tmp_path):
    """A hello that would take deliveries is refused `unauthorized` and closed, saying why; the
    SDK's `deliver=False` client asks `stats` with it."""
    async with running_broker(tmp_path / "data") as h:
        with pytest.raises(ClientError) as refused:
            async with h.client("nagios", role="monitor", reconnect=False):
                pass
        assert refused.value.code == wire.ErrorCode.UNAUTHORIZED
        assert "requests-only" in str(refused.value)
        closed = [e for e in h.logs if e.get("event") == "connection_closed"]
        assert closed[-1]["reason"] == "auth_failed" and closed[-1]["user"] == "nagios"

        async with h.client("nagios", role="monitor", deliver=False) as monitor:
            assert (await monitor.stats()).lsn == h.broker.store.last_lsn()
            with pytest.raises(ClientError) as forbidden:
                await monitor.send("hi", to="bob")
            assert forbidden.value.code == wire.ErrorCode.FORBIDDEN


async def test_a_users_token_is_still_refused_stats(tmp_path):
    async with running_broker(tmp_path / "data") as h:
        for role in ("user", "service"):
            async with h.client("someone", role=role, deliver=False) as c:
                with pytest.raises(ClientError) as refused:
                    await c.stats()
                assert refused.value.code == wire.ErrorCode.FORBIDDEN
                assert "admin and monitor tokens only" in str(refused.value)


def test_homing_token_monitor_and_homing_health_with_it(tmp_path):
    """`homing token NAME --monitor` mints one (not with `--admin` or `--service`: usage), and
    `homing health` is `ok` with it."""
    data = tmp_path / "data"
    with BrokerProcess(data) as bp:
        minted = homing("token", "nagios", "--monitor", "--data", str(data)).stdout.strip()
        claims = tokens.verify({tokens.key_id(bp.secret): bp.secret}, minted)
        assert (claims.user, claims.role) == ("nagios", "monitor")
        both = homing("token", "nagios", "--monitor", "--admin", "--data", str(data),
                      check=False)
        assert both.returncode == 2 and last_error(both.stderr)["error"] == "usage"
        ok = homing("health", env={"HOMING_SERVER": bp.server, "HOMING_TOKEN": minted})
        assert lines(ok)[0]["status"] == "ok"
        sent = homing("send", "--to", "bob", "hi", check=False,
                      env=as_user(bp, "nagios", "monitor"))
        assert sent.returncode == 1 and last_error(sent.stderr)["error"] == "forbidden"
        listen = homing("listen", "--count", "1", "--connect-timeout", "5", check=False,
                        env=as_user(bp, "nagios", "monitor"))
        assert listen.returncode == 1 and last_error(listen.stderr)["error"] == "unauthorized"
