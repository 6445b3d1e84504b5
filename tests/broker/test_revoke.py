"""Revoking a user's tokens (an admin's `revoke`, `homing revoke USER`): a real broker process
ends the sessions opened with them and refuses them at hello, across a restart, while tokens
minted afterwards and other users' go on working; the log that says so passes its audit."""

from __future__ import annotations

import itertools
import json
import os
import time

import pytest
import trio

from broker.client import ClientError, open_client
from storage import audit
from storage.store import Store
from tests.procs import BrokerProcess, homing, lines


async def test_revoked_tokens_end_their_sessions_and_are_refused_until_restart_and_after(
        tmp_path):
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(60):
        old = bp.token("bob")
        env = {"HOMING_SERVER": bp.server}
        async with bp.client("alice") as alice:
            with pytest.raises(ClientError) as stopped:
                async with open_client(bp.server, old, "phone") as bob:
                    await bob.conversations()  # connected with the token to revoke

                    refused = await trio.to_thread.run_sync(lambda: homing(
                        "revoke", "bob", check=False,
                        env={**env, "HOMING_TOKEN": bp.token("shop", "service")}))
                    assert refused.returncode == 1
                    assert json.loads(refused.stderr)["error"] == "forbidden"

                    [done] = lines(await trio.to_thread.run_sync(lambda: homing(
                        "revoke", "bob", env={**env, "HOMING_TOKEN": bp.token("ops", "admin")})))
                    async for _ in bob.deliveries():  # ended by the broker, not by us
                        pass
            assert stopped.value.name == "unauthorized" and "revoked" in stopped.value.message
            assert done["user"] == "bob" and isinstance(done["before"], int)
            await alice.conversations()  # another user's session goes on

        async def refused_at_hello(token: str) -> str:
            with pytest.raises(ClientError) as refused:
                async with open_client(bp.server, token, "laptop") as again:
                    await again.conversations()
            return refused.value.message

        assert "revoked" in await refused_at_hello(old)
        fresh = bp.token("bob")  # minted once `homing revoke` returned: after the cut-off
        async with open_client(bp.server, fresh, "phone") as bob:
            await bob.send("back", to="alice")

        bp.kill()  # the cut-off is a projection of the log: it survives a SIGKILL
        await bp.astart()
        assert "revoked" in await refused_at_hello(old)
        async with open_client(bp.server, fresh, "phone") as bob:
            await bob.conversations()

    verified = json.loads(homing("audit", "verify", "--data", str(bp.data)).stdout)
    assert verified["ok"] is True


async def test_revoke_over_the_sdk_returns_the_cut_off(tmp_path):
    """`revoke_tokens` answers `before`, a whole second after the moment of the revocation;
    revoking again in the same second answers the same one, and a user's token is refused."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(30):
        async with bp.client("ops", role="admin") as ops, bp.client("eve") as eve:
            asked = time.time()
            before = await ops.revoke_tokens("bob")
            assert type(before) is int and asked < before <= time.time() + 1
            assert await ops.revoke_tokens("bob") in (before, before + 1)
            with pytest.raises(ClientError) as refused:
                await eve.revoke_tokens("bob")
            assert refused.value.name == "forbidden"


def test_homing_revoke_needs_a_user(tmp_path):
    proc = homing("revoke", check=False, env={**os.environ, "HOMING_TOKEN": "x"})
    assert proc.returncode == 2 and json.loads(proc.stderr)["error"] == "usage"


def logged(data) -> list:
    store = Store.open(str(data), readonly=True)
    try:
        return list(audit.iter_events(store))
    finally:
        store.close()


async def test_nothing_a_revoked_token_sends_is_logged_after_the_revocation(tmp_path):
    """Four devices of bob, four sends in flight each, send while an admin revokes bob: bob's
    sessions end at once, so every message of theirs in the log precedes the revocation, and
    every send answered with a `result` is in the log (a result that arrived in the read that
    also ended the session is returned, not overwritten by the session's end)."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(60):
        old = bp.token("bob")
        answered: list[str] = []
        stopped: list[set[str]] = []

        async def keep_sending(bob, name: str) -> None:
            for n in itertools.count():
                r = await bob.send(name, to="alice", cid=f"{name}-{n}")
                answered.append(r.cid)

        async def device(name: str) -> None:
            try:
                async with open_client(bp.server, old, name) as bob, trio.open_nursery() as n:
                    for lane in range(4):  # four sends in flight
                        n.start_soon(keep_sending, bob, f"{name}.{lane}")
            except* ClientError as group:  # each of its lanes raises the same
                stopped.append({exc.name for exc in group.exceptions})

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(device, f"d{i}")
            while len(answered) < 200:
                await trio.sleep(0.01)
            async with bp.client("ops", role="admin") as ops:
                await ops.revoke_tokens("bob")
        assert stopped == [{"unauthorized"}] * 4
    events = logged(bp.data)
    [revoked] = [e.lsn for e in events if e.type == "tokens.revoked"]
    sent = {e.data["cid"]: e.lsn for e in events if e.type == "message.accepted"}
    assert sent and max(sent.values()) < revoked
    assert set(answered) <= set(sent)


async def test_an_admin_revoking_their_own_user_gets_the_answer_then_is_ended(tmp_path):
    """The asking session, revoking its own user, is answered before it ends: the SDK returns
    `before`, and `homing revoke` prints its line and exits 0."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(30):
        with pytest.raises(ClientError) as stopped:
            async with bp.client("ops", role="admin") as ops:
                before = await ops.revoke_tokens("ops")
                assert before > time.time() - 5
                await ops.conversations()  # ended after the answer
        assert stopped.value.name == "unauthorized"
        env = {"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token("root", "admin")}
        proc = await trio.to_thread.run_sync(lambda: homing("revoke", "root", env=env))
        [line] = lines(proc)
        assert line["user"] == "root" and line["before"] <= time.time()
