"""A create without a cid that fails with its outcome unknown: a review of leftovers
(2026-12-06), run against a real broker process.

The broker takes the create, then stops answering (SIGSTOP) before its commit; the client gives
up, and the broker, let go, commits the create it had queued. The SDK made the create's cid and
named it nowhere, so a retry made a second group. Now the SDK's error names it (`.cid`), as a
send's does, and `homing group create` names `--cid` in its message, as `homing send` does.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import trio

import protocol as wire
from broker.client import ClientError, ConnectionLost, open_client
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, lines
from tests.stalls import committing, held_commits, queued_behind


async def _until(check, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def _groups_named(bp: BrokerProcess, user: str, name: str) -> list[str]:
    """The conv ids of `user`'s conversations named `name`."""
    c = await RawClient.connect(bp.server, bp.token(user), "convs")
    await c.send(wire.Convs(id=1, limit=100))
    page = await c.reply(1)
    await c.aclose()
    return [e.conv for e in page.convs if e.name == name]


async def _until_created(bp: BrokerProcess, user: str, name: str) -> None:
    with trio.fail_after(30):
        while not await _groups_named(bp, user, name):
            await trio.sleep(0.05)


async def _held_then_stopped(bp: BrokerProcess, run, failed: list) -> None:
    """Run `run()` (a create) while the broker's commits are held, stop the broker once it
    waits in the queue, until `failed` holds what it ended with; then let the broker go on."""
    blocker = await RawClient.connect(bp.server, bp.token("ann"), "d1")
    async with held_commits(bp.data):
        # A batch of its own, held at its commit: the create queues behind it.
        await blocker.send(wire.Send(id=1, cid="blocker", body="first", to="bob"))
        await _until(lambda: committing(bp, 1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await _until(lambda: queued_behind(bp, 1))
            bp.proc.send_signal(signal.SIGSTOP)  # nothing answered: the client gives up
            try:
                await _until(lambda: failed, 60)
            finally:
                bp.proc.send_signal(signal.SIGCONT)
    await blocker.aclose()


async def test_a_create_given_up_on_names_its_cid_and_a_retry_with_it_makes_no_second(
        tmp_path):
    """`create_group(name)` (no cid) that raises ConnectionLost after the broker took it: the
    group is created all the same; the exception carries the create's cid, and a create again
    with it returns that group: the user is in one group of that name."""
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1", "--stats-interval", "1") as bp:
        failed: list[BaseException] = []
        async with open_client(bp.server, bp.token("shop"), "d1", reconnect_timeout=1) as client:

            async def create() -> None:
                try:
                    await client.create_group("order 7", ["bob"])
                except ConnectionLost as exc:
                    failed.append(exc)

            await _held_then_stopped(bp, create, failed)
        cid = failed[0].cid
        assert cid, failed
        await _until_created(bp, "shop", "order 7")
        first = await _groups_named(bp, "shop", "order 7")
        async with open_client(bp.server, bp.token("shop"), "d1") as client:
            again = await client.create_group("order 7", ["bob"], cid=cid)
        assert [again] == first == await _groups_named(bp, "shop", "order 7")


async def test_a_create_given_up_on_names_the_cid_to_run_it_again_with(tmp_path):
    """`homing group create NAME` (no --cid) that ends `unreachable` after the broker took the
    create: the group is created all the same; the error names the `--cid` to run it again
    with, which prints that group, and the user is in one group of that name."""
    env = {**os.environ}
    failed: list[tuple] = []
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1", "--stats-interval", "1") as bp:
        env.update(as_user(bp, "shop"))

        async def create() -> None:
            cmd = await trio.run_process(
                [*homing_cmd(), "group", "create", "order 8", "--members", "bob",
                 "--connect-timeout", "1"], env=env, capture_stdout=True, capture_stderr=True,
                check=False)
            failed.append((cmd.returncode, cmd.stdout, cmd.stderr))

        await _held_then_stopped(bp, create, failed)
        status, out, err = failed[0]
        assert (status, out) == (3, b""), failed
        error = json.loads(err.decode().strip().splitlines()[-1])
        assert error["error"] == "unreachable", error
        assert "the group may have been created" in error["message"], error
        cid = error["message"].split("--cid ")[1].split()[0]
        await _until_created(bp, "shop", "order 8")
        first = await _groups_named(bp, "shop", "order 8")
        again = lines(homing("group", "create", "order 8", "--members", "bob", "--cid", cid,
                             env=as_user(bp, "shop")))
        assert [again[0]["conv"]] == first == await _groups_named(bp, "shop", "order 8")


async def test_a_refused_create_names_no_cid(tmp_path):
    """A create the broker refused (more members than its --max-members) did nothing: the
    SDK's error has no cid, and the command's message says nothing of running it again."""
    with BrokerProcess(tmp_path / "data", "--max-members", "2") as bp:
        async with open_client(bp.server, bp.token("shop"), "d1") as client:
            with pytest.raises(ClientError) as refused:
                await client.create_group("x", ["bob", "carl"])
        failed = homing("group", "create", "x", "--members", "bob,carl",
                        env=as_user(bp, "shop"), check=False)
    assert (refused.value.name, refused.value.cid) == ("limit_exceeded", None), refused.value
    assert failed.returncode == 1, failed
    assert "limit_exceeded" in failed.stderr and "--cid" not in failed.stderr, failed.stderr
