"""The SDK and the CLI of 2026-12-05 against a broker of the previous release, whose welcome
lacks the `create_cid` cap and which ignores a create's cid (an unknown key). Each test is a
defect a review of upgrade and compatibility found (2026-12-05). A real broker over a real
Store on loopback; its welcome's caps are those of the broker from before (`broker.handshake.CAPS`
emptied), as tests/broker/test_client_errors.py does."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.harness import running_broker
from tests.procs import homing_cmd


async def test_a_create_with_a_cid_of_ones_own_is_refused_by_a_broker_that_ignores_it(
        tmp_path, monkeypatch):
    """docs/CLIENT.md: "Pass your own `cid` (an order number, say) to make one conversation of
    calls in several runs". A broker from before 2026-12-05 ignores the cid, so each call made
    a group of its own, and said nothing: the shop's order had as many groups as the script
    had runs, with the courier and customer in each. The SDK sends no create with a cid of the
    caller's to a broker without the cap (ClientError "invalid", nothing created); a create
    without one goes out as before (the SDK's own cid is only for its repeats after a drop,
    which it does not make there)."""
    import broker.handshake

    monkeypatch.setattr(broker.handshake, "CAPS", ())  # the welcome of a broker from before
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, h.client("shop") as shop:
            assert wire.CAP_CREATE_CID not in shop.welcome.caps
            for _run in range(2):
                with pytest.raises(ClientError) as refused:
                    await shop.create_group("order 8", ["customer"], cid="order-8")
                assert refused.value.name == "invalid"
                assert "create_cid" in refused.value.message
            assert h.broker.store.user_convs("customer") == []
            conv = await shop.create_group("order 9", ["customer"])
            assert h.broker.store.user_convs("customer") == [conv]


def _create(server: str, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*homing_cmd(), "group", "create", "order 8", "--members", "customer", *args,
         "--server", server, "--connect-timeout", "5"],
        env={**os.environ, "HOMING_TOKEN": token}, capture_output=True, text=True,
        timeout=60)


async def test_group_create_with_cid_run_twice_against_a_broker_that_ignores_it(
        tmp_path, monkeypatch):
    """docs/CLI.md: `group create --cid CID` "run again with the same CID ... create nothing
    and print the conversation made the first time, so a script that failed half-way can be
    run again". Against a broker from before 2026-12-05 each run printed a new group, exit 0.
    Now it is refused as the SDK refuses it: `invalid`, exit 1, nothing created."""
    import broker.handshake

    monkeypatch.setattr(broker.handshake, "CAPS", ())
    with trio.fail_after(60):
        async with running_broker(tmp_path / "d") as h:
            for _run in range(2):
                proc = await trio.to_thread.run_sync(
                    _create, h.server, h.token("shop"), "--cid", "order-8")
                assert proc.returncode == 1, (proc.stdout, proc.stderr)
                assert proc.stdout == ""
                error = json.loads(proc.stderr.strip().splitlines()[-1])
                assert (error["error"], error["code"]) == ("invalid", 7), error
            assert h.broker.store.user_convs("customer") == []
            proc = await trio.to_thread.run_sync(_create, h.server, h.token("shop"))
            assert proc.returncode == 0, proc.stderr
            assert h.broker.store.user_convs("customer") == [json.loads(proc.stdout)["conv"]]


async def test_a_create_with_ones_own_cid_made_while_away_is_not_sent_to_a_broker_without_the_cap(
        tmp_path, monkeypatch):
    """A create with a cid of the caller's, made while the client was disconnected from a
    broker with the `create_cid` cap, waits for the next connection; if that broker lacks the
    cap (a downgrade while the client was away), the create is not sent there (it would be made
    and its cid ignored) and raises ClientError "invalid"; the client goes on."""
    import contextlib
    import functools

    import broker.handshake

    cut, allow = trio.Event(), trio.Event()
    seen = 0

    async def proxy(client_stream, port):  # the first line drops at `cut`; the next wait
        nonlocal seen
        seen += 1
        first = seen == 1
        if not first:
            await allow.wait()
        upstream = await trio.open_tcp_stream("127.0.0.1", port)

        async def pipe(src, dst):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await src.receive_some(65536):
                    await dst.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client_stream, upstream)
            nursery.start_soon(pipe, upstream, client_stream)
            if first:
                await cut.wait()
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(client_stream)
        await trio.aclose_forcefully(upstream)

    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, functools.partial(proxy, port=h.broker.port), 0,
                host="127.0.0.1"))
            server = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            from broker.client import open_client

            async with open_client(server, h.token("shop"), "d1") as shop:
                assert wire.CAP_CREATE_CID in shop.welcome.caps
                cut.set()
                while shop.connected.is_set():  # the drop is noticed
                    await trio.sleep(0.01)
                monkeypatch.setattr(broker.handshake, "CAPS", ())  # the broker it comes back to

                async def back() -> None:
                    await trio.sleep(0.2)  # the create below is made while away
                    allow.set()

                nursery.start_soon(back)
                with pytest.raises(ClientError) as refused:
                    await shop.create_group("order 8", ["customer"], cid="order-8")
                assert refused.value.name == "invalid"
                assert shop.reconnects == 1 and wire.CAP_CREATE_CID not in shop.welcome.caps
                await shop.ping()
            assert h.broker.store.user_convs("customer") == []
            nursery.cancel_scope.cancel()
