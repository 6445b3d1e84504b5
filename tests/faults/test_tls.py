"""TLS: an SDK client trusting the CA works; plaintext on the TLS port fails cleanly."""

from __future__ import annotations

import datetime
import ssl

import pytest
import trio
import trustme
from structlog.testing import capture_logs

import protocol as wire
from broker import awaiting, handshake
from broker.client import ClientError, NotTls, NotTrusted, open_client
from tests.faults.conftest import RawClient, raw_bytes_exchange, tls_pair
from tests.harness import running_broker
from tests.waits import wait_until


async def test_tls_serves_sdk_and_refuses_plaintext(tmp_path, tally):
    """A CA-trusting client sends and receives; plaintext and bad handshakes do no harm."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with running_broker(tmp_path / "data", tls_cert=cert_path, tls_key=key_path) as h:
        with trio.fail_after(30):
            hello = wire.encode_frame({"t": "hello", "versions": [1], "token": h.token("x"),
                                       "device": "d"})
            for _ in range(5):
                out = await raw_bytes_exchange(h.server, hello, read_s=2)
                # In the clear, only the closing error saying the port speaks TLS: no welcome.
                assert b"welcome" not in out and b"bad_frame" in out and b"speaks TLS" in out
                tally.add("TLS: plaintext hello on the TLS port")
            untrusting = ssl.create_default_context()  # does not trust our CA
            started = trio.current_time()
            with pytest.raises(NotTrusted) as refused:  # at once: retrying would not help
                async with open_client(h.server, h.token("eve"), "d", tls=untrusting,
                                       reconnect_timeout=20):
                    raise AssertionError("connected without trusting the CA")
            assert "not trusted" in str(refused.value) and "certificate" in str(refused.value)
            assert trio.current_time() - started < 5
            tally.add("TLS: client not trusting the CA")
            async with open_client(h.server, h.token("alice"), "d", tls=ctx) as alice, \
                    open_client(h.server, h.token("bob"), "d", tls=ctx) as bob:
                r = await alice.send("over tls", to="bob")
                d = await bob.deliveries().receive()
                assert (d.seq, d.body) == (r.seq, "over tls")


async def test_a_tls_client_of_a_plaintext_broker_stops_at_once(tmp_path):
    """Asking for TLS where the broker serves plaintext is a setting to fix, not an outage to
    wait out: the client stops at once with NotTls, saying so, and the broker serves on."""
    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(15):
            started = trio.current_time()
            with pytest.raises(NotTls) as refused:
                async with open_client(h.server, h.token("eve"), "d",
                                       tls=ssl.create_default_context(), reconnect_timeout=20):
                    raise AssertionError("a TLS session with a plaintext broker")
            assert trio.current_time() - started < 5
            assert "did not answer in TLS" in str(refused.value)
            async with open_client(h.server, h.token("eve"), "d") as eve:  # it serves on
                assert (await eve.send("plain", to="bob")).seq == 1


async def test_a_plaintext_client_of_a_tls_broker_is_told_and_stops_at_once(tmp_path,
                                                                            monkeypatch):
    """A client without TLS on the TLS port is answered in the clear with a closing `bad_frame`
    saying the port speaks TLS (logged as such), rather than dropped with nothing said: the SDK
    stops at once, not after its reconnect timeout with `expected welcome, got NoneType`. A
    client that says nothing still holds its handshake slot no longer than
    --handshake-timeout, and TLS clients are served throughout."""
    # Writing a closing error to a silent connection, or closing it, in TLS (never begun) would
    # wait for its ClientHello until PARTING_S was out; lengthened from 1 s to 30 s, the right
    # 1.5 s (the handshake timeout) and such a 31.5 s stay far apart on a busy machine.
    monkeypatch.setattr(handshake, "PARTING_S", 30.0)
    # The TLS client past --max-handshakes 1 comes while the silent one holds its place: on a
    # busy machine, maybe past the second after which it would take that place instead.
    monkeypatch.setattr(awaiting, "SILENT_S", 30.0)
    ca, cert_path, key_path = tls_pair(tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with running_broker(tmp_path / "data", tls_cert=cert_path, tls_key=key_path,
                              handshake_timeout_s=1.5, max_handshakes=1) as h:
        with capture_logs() as logs, trio.fail_after(90):
            started = trio.current_time()
            with pytest.raises(ClientError) as refused:
                async with open_client(h.server, h.token("eve"), "d", reconnect_timeout=20):
                    raise AssertionError("a plaintext session with a TLS broker")
            assert trio.current_time() - started < 10  # not its reconnect timeout (20 s)
            assert refused.value.name == "bad_frame"
            assert "speaks TLS" in refused.value.message, refused.value.message

            for _ in range(3):  # connected and gone without a byte (a port probe)
                probe = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
                await probe.aclose()
            # Each probe's slot is given back before the silent one connects (one still held
            # would have it refused at --max-handshakes 1).
            await wait_until(lambda: _closed(logs, "peer_eof") >= 3)
            silent = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
            started = trio.current_time()
            await wait_until(lambda: h.broker.handshaking == 1)
            # --max-handshakes 1 reached: a TLS client is still told so, in TLS.
            late = await RawClient.connect(h.server, ssl_context=ctx)
            refusal = await late.next()
            assert isinstance(refusal, wire.Error) and refusal.name == "limit_exceeded", refusal
            await late.aclose()
            while h.broker.handshaking:
                await trio.sleep(0.02)
            # Its 1.5 s, not PARTING_S (30 s) more: the bound between leaves room for a loaded
            # machine.
            assert trio.current_time() - started < 15
            assert await silent.receive_some(100) == b""  # closed then, nothing said
            assert trio.current_time() - started < 15
            await silent.aclose()
            half = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
            await half.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a hello
            started = trio.current_time()
            await _until_closed(half)  # at the handshake timeout (1.5 s), not 30 s more
            assert trio.current_time() - started < 15
            await wait_until(lambda: not h.broker.handshaking)
            await half.aclose()

            async with open_client(h.server, h.token("alice"), "d", tls=ctx) as alice:
                assert (await alice.send("over tls", to="bob")).seq == 1
    # (captured here, not by running_broker: a connection handler that crashed)
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")], logs
    rejected = [e for e in logs if e["event"] == "frame_rejected"]
    assert rejected and "speaks TLS" in rejected[0]["reason"], rejected


async def test_a_tls_client_takes_the_place_of_a_silent_connection(tmp_path):
    """At --max-handshakes 1, held by a connection silent for awaiting.SILENT_S, a TLS client
    (whose first byte begins its handshake: its hello cannot be read before TLS) takes its
    place and is welcomed; the silent one, to which TLS never began, is closed with nothing
    said. Before 2026-12-07 the client was refused `limit_exceeded` until the silent one timed
    out (30 s here)."""
    ca, cert_path, key_path = tls_pair(tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with running_broker(tmp_path / "data", tls_cert=cert_path, tls_key=key_path,
                              handshake_timeout_s=30, max_handshakes=1) as h:
        with trio.fail_after(30):
            silent = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
            await wait_until(lambda: h.broker.handshaking == 1)
            await trio.sleep(awaiting.SILENT_S + 0.1)
            began = trio.current_time()
            async with open_client(h.server, h.token("alice"), "d", tls=ctx,
                                   reconnect_timeout=2) as alice:
                assert (await alice.send("over tls", to="bob")).seq == 1
            assert trio.current_time() - began < 2
            assert await silent.receive_some(100) == b""  # closed, nothing said
            assert h.broker.places_given_up.total == 1
            await silent.aclose()


async def test_a_connection_that_said_nothing_does_not_hold_the_stop(tmp_path):
    """SIGTERM while a connection on the TLS port has said nothing yet: the broker stops at
    once, closing it as stopped, not when the connection's handshake timeout is out (30 s
    here, and a shutdown grace longer still, so that the two stay far apart on a busy
    machine)."""
    _ca, cert_path, key_path = tls_pair(tmp_path)
    async with running_broker(tmp_path / "data", tls_cert=cert_path, tls_key=key_path,
                              handshake_timeout_s=30, shutdown_grace_s=60) as h:
        with capture_logs() as logs, trio.fail_after(90):
            silent = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
            await wait_until(lambda: h.broker.handshaking == 1)
            started = trio.current_time()
            h.broker.shutdown()
            await h.broker.wait_stopped()
            assert trio.current_time() - started < 15  # not held to its timeout (30 s)
            await silent.aclose()
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")], logs
    assert _closed(logs, "shutdown") == 1, logs


async def test_a_tls_handshake_that_fails_is_logged_with_its_reason(tmp_path):
    """The broker's certificate expired, or a client does not trust its CA: each client stops
    at once with NotTrusted saying why, and the broker's log says why too
    (`tls_failed`, with OpenSSL's reason: the client's alert), where it said only
    `connection_closed` reason `broken`, alike for a reset."""
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=2),
                            not_after=now - datetime.timedelta(days=1))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    expired.cert_chain_pems[0].write_to_path(str(cert_path))
    expired.private_key_pem.write_to_path(str(key_path))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with running_broker(tmp_path / "data", tls_cert=cert_path, tls_key=key_path) as h:
        with capture_logs() as logs, trio.fail_after(60):
            for ctx, says in ((trusting, "expired"), (ssl.create_default_context(), "")):
                with pytest.raises(NotTrusted) as refused:
                    async with open_client(h.server, h.token("eve"), "d", tls=ctx,
                                           reconnect_timeout=10):
                        raise AssertionError("connected with a certificate to refuse")
                assert says in str(refused.value)
            for ctx in (trusting, ssl.create_default_context()):  # clients that send alerts
                await trio.to_thread.run_sync(_blocking_tls_connect, h.broker.port, ctx)
            await wait_until(lambda: len([e for e in logs if e["event"] == "tls_failed"]) >= 4)
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")], logs
    failed = [e for e in logs if e["event"] == "tls_failed"]
    # The SDK (trio) hangs up without its alert; OpenSSL's own socket clients send theirs.
    # Sorted: each handler logs when trio runs it, and two ready at once run in either order.
    assert sorted(e["reason"] for e in failed) == [
        "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_UNKNOWN_CA",
        "UNEXPECTED_EOF_WHILE_READING", "UNEXPECTED_EOF_WHILE_READING"], failed


def _closed(logs: list[dict], reason: str) -> int:
    """How many `connection_closed` lines with `reason` are in `logs`."""
    return sum(e["event"] == "connection_closed" and e.get("reason") == reason for e in logs)


async def _until_closed(stream: trio.SocketStream) -> None:
    """Read and drop until the broker closes `stream` (EOF, or a reset)."""
    try:
        while await stream.receive_some(100):
            pass
    except trio.BrokenResourceError:
        pass


def _blocking_tls_connect(port: int, ctx: ssl.SSLContext) -> None:
    """A TLS handshake with the standard library's socket client, expected to fail."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(sock, server_hostname="127.0.0.1")
