"""TLS: an SDK client trusting the CA works; plaintext on the TLS port fails cleanly."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

import protocol as wire
from broker.client import NotTls, NotTrusted, open_client
from tests.faults.conftest import raw_bytes_exchange
from tests.harness import running_broker


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
                assert not out.startswith(b"\x00")  # no protocol frame in the clear
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
