"""Failed hellos from one peer address, past `--auth-fail-rate`: answered `unauthorized` still,
with `retry_ms`, and logged once per address now and then, while good tokens from that address are
welcomed; garbage in place of a hello counted in the same bucket; the table of addresses bounded
(`--auth-fail-addresses`); 0 turns it off (broker/hellos.py, docs/OPERATIONS.md "Limits")."""

from __future__ import annotations

import ssl
import struct

import pytest
import trio

import protocol as wire
from broker import connection, keyring, tokens
from broker.client import ClientError, open_client
from broker.hellos import address_key
from tests.faults.conftest import RawClient, raw_bytes_exchange, tls_pair
from tests.harness import running_broker
from tests.procs import as_user, homing, lines

BAD = "v1.not-a-token.AAAA"
RATE = 0.05  # failed hellos a second: a burst of 3 (60 seconds' worth)


async def answer(server: str, token: str, source: str | None = None):
    """The broker's answer to a hello with `token`, sent from `source` (a loopback address)."""
    host, port = server.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port), local_address=source)
    c = RawClient(stream)
    await c.send(wire.Hello(versions=(1,), token=token, device="d", id=7))
    frame = await c.next()
    await c.aclose()
    return frame


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e.get("event") == name]


def throttled(frame) -> bool:
    """Whether `frame` refused a hello past its address's rate: `unauthorized`, with retry_ms."""
    return frame.name == "unauthorized" and frame.close and frame.retry_ms is not None


def told(frame) -> bool:
    """Whether `frame` refused a hello within its address's rate: `unauthorized`, no retry_ms."""
    return frame.name == "unauthorized" and frame.close and frame.retry_ms is None


async def refusal(server: str, data: bytes) -> wire.Error | None:
    """The broker's answer to `data` sent in place of a hello: the frame it wrote before its
    EOF (or its reset), None if none."""
    host, port = server.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    got = bytearray()
    try:
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            got += chunk
    except trio.BrokenResourceError:
        pass  # a reset: what came before it was read
    finally:
        await trio.aclose_forcefully(stream)
    conn = wire.Connection(wire.Role.CLIENT)
    conn.send(wire.Hello(versions=(1,), token=BAD, device="d"))  # a client awaiting its answer
    conn.receive_data(bytes(got))
    frame = conn.next_event()
    return None if frame is wire.NEED_DATA else frame


# What a peer may send in place of a hello, and the code it is refused with.
GARBAGE = {
    "msgpack that does not decode": (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame"),
    "a first frame not a hello": (wire.encode_frame({"t": "ping", "id": 3}), "bad_frame"),
    "a hello of another version": (wire.encode_frame(
        {"t": "hello", "versions": [99], "token": BAD, "device": "d", "id": 7}),
        "unsupported_version"),
    "an HTTP request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too_large"),
}


async def throttle(server: str) -> None:
    """Spend the failed-hello burst of 127.0.0.1 (RATE's: 3), and one more, throttled."""
    for _ in range(3):
        assert (await answer(server, BAD)).retry_ms is None
    assert (await answer(server, BAD)).retry_ms is not None


async def test_an_address_past_its_failed_hellos_is_throttled(tmp_path):
    """The first hellos with a bad token of an address are `unauthorized` (a burst of 60
    seconds' worth of --auth-fail-rate); the next are `unauthorized` with `retry_ms` and the
    reason, logged by one `auth_throttled` warning for the address (no `auth_failed`,
    no `connection_closed` each), and counted for `stats`. A good token from that address is
    welcomed all the same, and counts nothing. (Until 2026-12-07 a peer could fail hellos as
    fast as the broker answered, two log lines each.)"""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        with trio.fail_after(20):
            for _ in range(3):
                f = await answer(h.server, BAD)
                assert told(f), f
            waits = []
            for _ in range(4):
                f = await answer(h.server, BAD)
                assert isinstance(f, wire.Error) and throttled(f), f
                assert f.id == 7 and "too many failed hellos from 127.0.0.1" in f.message, f
                assert f.message.startswith("bad token signature"), f  # why, as unauthorized says
                waits.append(f.retry_ms)
            # The bucket refills one hello every 20 s: that long, less what has passed.
            assert all(0 < ms <= 20_000 for ms in waits), waits
            for _ in range(3):  # good tokens: welcomed, however throttled the address is
                assert isinstance(await answer(h.server, h.token("alice")), wire.Welcome)
            f = await answer(h.server, BAD)
            assert throttled(f), f  # the good ones gave it nothing back
            async with h.client("ops", role="monitor", deliver=False) as ops:
                figures = await ops.stats()
        assert figures.auth_throttled == 5, figures
        assert len(events(h.logs, "auth_failed")) == 3
        [said] = events(h.logs, "auth_throttled")
        assert said["log_level"] == "warning" and said["address"] == "127.0.0.1", said
        assert said["refused"] == 1 and said["peer"].startswith("127.0.0.1:"), said
        closed = [e["reason"] for e in events(h.logs, "connection_closed")]
        assert "auth_throttled" not in closed and closed.count("auth_failed") == 3, closed


async def test_good_tokens_behind_one_address_never_count(tmp_path):
    """A fleet behind one NAT address reconnecting at once, all with good tokens, is welcomed
    whole at the least --auth-fail-rate: good hellos take nothing from the address's
    failed-hello bucket, and a bad one after them is `unauthorized` still."""
    async with running_broker(tmp_path / "data", auth_fail_rate=0.001) as h:
        welcomed = []

        async def store(i: int) -> None:
            welcomed.append(await answer(h.server, h.token(f"store-{i}")))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(store, i)
            assert all(isinstance(f, wire.Welcome) for f in welcomed) and len(welcomed) == 200
            assert told(await answer(h.server, BAD))
            assert throttled(await answer(h.server, BAD))  # a burst of one


async def test_the_table_of_addresses_is_bounded(tmp_path):
    """At most --auth-fail-addresses addresses are counted: failed hellos from more addresses
    forget the least recently failed one, which starts again with a full burst (loopback
    addresses 127.0.0.2 to 127.0.0.4 as three peers)."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE,
                              auth_fail_addresses=2) as h:
        with trio.fail_after(20):
            for _ in range(3):
                assert told(await answer(h.server, BAD, "127.0.0.2"))
            assert throttled(await answer(h.server, BAD, "127.0.0.2"))
            assert told(await answer(h.server, BAD, "127.0.0.3"))
            assert throttled(await answer(h.server, BAD, "127.0.0.2"))  # recent
            assert told(await answer(h.server, BAD, "127.0.0.4"))
            assert len(h.broker.failed_hellos) == 2  # 127.0.0.3 forgotten, the least recent
            assert told(await answer(h.server, BAD, "127.0.0.3"))
            assert len(h.broker.failed_hellos) == 2  # and now 127.0.0.2
            assert h.broker.failed_hellos.forgotten == 2
            assert told(await answer(h.server, BAD, "127.0.0.2"))


async def test_zero_turns_it_off(tmp_path):
    """--auth-fail-rate 0: every failed hello is `unauthorized`, however many, and none is
    counted or kept."""
    async with running_broker(tmp_path / "data", auth_fail_rate=0) as h:
        with trio.fail_after(20):
            for _ in range(70):
                assert told(await answer(h.server, BAD))
        assert len(h.broker.failed_hellos) == 0 and h.broker.failed_hellos.throttled == 0
        assert not events(h.logs, "auth_throttled")


def test_addresses_are_ipv4_and_ipv6_slash_64():
    """An IPv4 address is its own; IPv6 addresses count by their /64, and an IPv4-mapped one
    as its IPv4 address."""
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("?") == "?"


def test_homing_serve_takes_the_flag_and_health_counts_the_throttled(broker_process):
    """`homing serve --auth-fail-rate` throttles a child broker's failed hellos, and `homing
    health` totals them as `auth_throttled`."""
    bp = broker_process("--auth-fail-rate", str(RATE))

    async def attempts() -> list[bool]:
        return [throttled(await answer(bp.server, BAD)) for _ in range(5)]

    assert trio.run(attempts) == [False] * 3 + [True] * 2
    out = homing("health", env=as_user(bp, "ops", "monitor"), timeout=60)
    assert lines(out)[0]["auth_throttled"] == 2
    said = [e for e in bp.log_events() if e.get("event") == "auth_throttled"]
    assert len(said) == 1 and said[0]["address"] == "127.0.0.1", said


async def test_a_genuine_token_refused_at_a_throttled_address_is_told_unauthorized(tmp_path):
    """Stores behind one NAT address whose tokens expired (or were revoked) at once throttle
    it; one more store there with an expired token, through the SDK, is told `unauthorized`
    (with retry_ms), the error it replaces its token on, as the SDK stops at it. Until
    2026-12-07's review it was told `rate_limited`: an app that mints a new token on
    `unauthorized` kept its expired one and tried again, throttled each time."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        expired = h.token("store-1", ttl=-1)
        with trio.fail_after(20):
            for _ in range(3):
                assert told(await answer(h.server, expired))
            f = await answer(h.server, expired)
            assert throttled(f) and f.message.startswith("token expired at"), f
            with pytest.raises(ClientError) as refused:
                async with open_client(h.server, expired, "till"):
                    pass
        assert refused.value.name == "unauthorized", refused.value
        assert 0 < refused.value.retry_after <= 20, refused.value.retry_after
        said = events(h.logs, "auth_throttled")
        assert said and said[0]["user"] == "store-1", said


async def test_a_token_of_a_key_made_after_its_address_was_throttled_is_welcomed(tmp_path):
    """The stores behind one address whose tokens' key was retired throttle it; the key files
    rotated meanwhile, a store's token of the new key is welcomed at its first hello, before
    the broker's once-a-second look at the files: its unknown key has them read, throttled or
    not. Until 2026-12-07's review a throttled address's unknown key ids were refused without
    that look, and the SDK, told so, stopped for good with a good token."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        with trio.fail_after(20):
            await throttle(h.server)
            keyring.rotate(h.config.data_dir)
            secret = tokens.load_secret(h.config.data_dir)
            assert tokens.key_id(secret) not in h.broker.keyring.keys  # not taken up yet
            async with open_client(h.server, tokens.issue(secret, "store-2"), "till") as c:
                await c.conversations()
        assert h.broker.failed_hellos.throttled == 1  # the forged one only


async def test_a_throttled_refusal_reaches_a_client_that_wrote_on_after_its_hello(tmp_path):
    """A throttled hello is closed with no wait for the peer's EOF: a client that wrote on
    after its hello (1 MiB, more than the broker reads) gets a reset, but the refusal, sent
    before it, is read all the same."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        with trio.fail_after(20):
            await throttle(h.server)
            host, port = h.server.rsplit(":", 1)
            c = RawClient(await trio.open_tcp_stream(host, int(port)))
            await c.send(wire.Hello(versions=(1,), token=BAD, device="d", id=7))
            with trio.move_on_after(2):
                try:
                    await c.stream.send_all(b"\0" * (1 << 20))
                except trio.BrokenResourceError:
                    pass  # the reset
            f = await c.next()
            await c.aclose()
        assert throttled(f), f


async def test_garbage_in_place_of_a_hello_is_a_failed_hello(tmp_path):
    """Bytes that are no hello the broker takes (a frame that does not decode, a first frame
    not a hello, a hello of another protocol version, an HTTP request) take from the same
    bucket as bad tokens: within the burst each is refused and logged as ever; past it, with
    the same code and message, plus `retry_ms`, and no `frame_rejected` nor
    `connection_closed` line each (the address's `auth_throttled` counts them), a bad token
    after them throttled too, and a good token from the address still welcomed. Until
    2026-12-07 garbage was never counted: two log lines and up to 1 s of linger each."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        with trio.fail_after(30):
            told_once = {}
            for name in list(GARBAGE)[:3]:  # the burst (3)
                data, code = GARBAGE[name]
                f = await refusal(h.server, data)
                assert isinstance(f, wire.Error) and f.name == code and f.close, (name, f)
                assert f.retry_ms is None, (name, f)
                told_once[name] = f
            for name, (data, code) in GARBAGE.items():
                f = await refusal(h.server, data)
                assert isinstance(f, wire.Error) and f.name == code and f.close, (name, f)
                assert f.retry_ms is not None and 0 < f.retry_ms <= 20_000, (name, f)
                if name in told_once:  # told what it did wrong, as within the rate
                    assert (f.message, f.id) == (told_once[name].message,
                                                 told_once[name].id), (name, f)
            assert throttled(await answer(h.server, BAD))  # one bucket: a bad token too
            assert isinstance(await answer(h.server, h.token("alice")), wire.Welcome)
            async with h.client("ops", role="monitor", deliver=False) as ops:
                figures = await ops.stats()
        assert figures.auth_throttled == 5 == h.broker.failed_hellos.throttled, figures
        rejected = events(h.logs, "frame_rejected")
        assert len(rejected) == 2 and not any("HTTP" in e["reason"] for e in rejected), rejected
        closed = [e["reason"] for e in events(h.logs, "connection_closed")]
        assert closed.count("protocol_error") == 3 and "auth_throttled" not in closed, closed
        [said] = events(h.logs, "auth_throttled")
        assert said["address"] == "127.0.0.1" and said["refused"] == 1, said
        assert said["code"] == "bad_frame" and said["reason"] == told_once[
            "msgpack that does not decode"].message, said
        assert not events(h.logs, "auth_failed")


async def test_garbage_past_the_rate_is_not_lingered_for(tmp_path, monkeypatch):
    """A connection refused for its garbage past its address's rate is closed at once, not
    held for the peer's EOF (LINGER_S, lengthened here to 30 s to tell the two apart): a peer
    that keeps its side open and writes on after the refusal meets the broker's reset."""
    monkeypatch.setattr(connection, "LINGER_S", 30.0)
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        data, _ = GARBAGE["a first frame not a hello"]
        with trio.fail_after(20):
            for _ in range(3):  # the burst; each lingered for until our close
                assert (await refusal(h.server, data)).retry_ms is None
            host, port = h.server.rsplit(":", 1)
            c = RawClient(await trio.open_tcp_stream(host, int(port)))
            await c.stream.send_all(data)
            c.conn.send(wire.Hello(versions=(1,), token=BAD, device="d"))  # awaiting an answer
            f = await c.next()
            assert f.name == "bad_frame" and f.retry_ms is not None, f
            started = trio.current_time()
            with pytest.raises(trio.BrokenResourceError):  # the broker's socket is gone
                while True:
                    await c.stream.send_all(b"more")
                    await trio.sleep(0.05)
            assert trio.current_time() - started < 10  # not LINGER_S (30 s)
            await c.aclose()


async def test_plaintext_on_a_tls_port_is_a_failed_hello(tmp_path):
    """A client without TLS on a TLS port, told in the clear that the port speaks TLS, is a
    failed hello: past its address's burst it is told the same with `retry_ms`, unlogged,
    while a TLS client from that address is welcomed."""
    ca, cert_path, key_path = tls_pair(tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE, tls_cert=cert_path,
                              tls_key=key_path) as h:
        hello = wire.encode_frame({"t": "hello", "versions": [1], "token": h.token("x"),
                                   "device": "d"})
        with trio.fail_after(30):
            answers = [await refusal(h.server, hello) for _ in range(5)]
            async with open_client(h.server, h.token("alice"), "d", tls=ctx) as alice:
                assert (await alice.send("over tls", to="bob")).seq == 1
        assert all(f.name == "bad_frame" and "speaks TLS" in f.message for f in answers)
        assert [f.retry_ms is not None for f in answers] == [False] * 3 + [True] * 2
        assert len(events(h.logs, "frame_rejected")) == 3
        [said] = events(h.logs, "auth_throttled")
        assert said["code"] == "bad_frame" and "speaks TLS" in said["reason"], said


async def test_a_genuine_client_of_another_version_is_not_a_failed_hello(tmp_path):
    """A hello of another protocol version with a good token (a fleet's old clients behind one
    NAT address, after an upgrade) is refused `unsupported_version` each time, with its
    `connection_closed` line naming the device, and counts nothing: a bad token from that
    address after five of them is told `unauthorized` without `retry_ms`. Until the review of
    2026-12-07 each took from the address's bucket: past the burst the old clients' refusals
    went unlogged, and so did the address's failed tokens."""
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE) as h:
        old = wire.encode_frame({"t": "hello", "versions": [99], "token": h.token("old"),
                                 "device": "old-phone", "id": 7})
        with trio.fail_after(30):
            answers = [await refusal(h.server, old) for _ in range(5)]
            assert told(await answer(h.server, BAD))
        assert all(f.name == "unsupported_version" and f.retry_ms is None for f in answers), \
            answers
        assert h.broker.failed_hellos.throttled == 0
        closed = [e for e in events(h.logs, "connection_closed")
                  if e["reason"] == "protocol_error"]
        assert [e["device"] for e in closed] == ["old-phone"] * 5, closed
        assert not events(h.logs, "auth_throttled")


async def test_a_failed_tls_handshake_is_a_failed_hello(tmp_path):
    """Bytes on a TLS port that begin as TLS (0x16) and are no TLS handshake are a failed
    hello, in the bucket of the address's failed tokens: within the burst each is logged
    `tls_failed`; past it, nothing of its own (no `tls_failed` nor `connection_closed` line)
    but the address's `auth_throttled` (code `tls_failed`), a bad token over TLS after them is
    throttled, and a good one welcomed. Until the review of 2026-12-07 none was counted: two
    log lines each, as fast as a peer could connect."""
    ca, cert_path, key_path = tls_pair(tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    not_tls = b"\x16\x03\x01\x00\x08" + b"\xff" * 8  # a handshake record of garbage
    async with running_broker(tmp_path / "data", auth_fail_rate=RATE, tls_cert=cert_path,
                              tls_key=key_path) as h:
        with trio.fail_after(30):
            for _ in range(5):
                said = await raw_bytes_exchange(h.server, not_tls, read_s=10)
                assert said[:1] in (b"", b"\x15"), said  # TLS's alert at most: no frame
            c = await RawClient.connect(h.server, ssl_context=ctx)
            await c.send(wire.Hello(versions=(1,), token=BAD, device="d", id=7))
            assert throttled(await c.next())
            await c.aclose()
            async with open_client(h.server, h.token("alice"), "d", tls=ctx) as alice:
                assert (await alice.send("over tls", to="bob")).seq == 1
        assert len(events(h.logs, "tls_failed")) == 3, events(h.logs, "tls_failed")
        closed = [e["reason"] for e in events(h.logs, "connection_closed")]
        assert closed.count("broken") == 3, closed
        [said] = events(h.logs, "auth_throttled")
        assert said["code"] == "tls_failed" and said["refused"] == 1, said
        assert h.broker.failed_hellos.throttled == 3
