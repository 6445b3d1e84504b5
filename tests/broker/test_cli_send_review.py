"""`homing send` that gives up with its message perhaps accepted: a review of sending
(2026-12-05), run against a real broker process.

The broker takes the send, then stops answering (SIGSTOP) before its commit; the command gives
up (`unreachable`, exit 3), and the broker, let go, commits the send it had queued. The message
is then on disk though the command failed. Run again as it was, the command appended the
message a second time (a fresh cid each run), and the error named no cid that would have made
the retry a dup. Now it names the cid (the prefix, for --stdin) to run it again with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import trio

import protocol as wire
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, lines
from tests.stalls import committing, conversation_bodies, held_commits, queued_behind


async def _until(check, timeout: float = 30.0):
    with trio.fail_after(timeout):
        while not (found := check()):
            await trio.sleep(0.05)
        return found


async def _given_up_after_its_send_was_taken(bp: BrokerProcess, args: list[str],
                                             stdin: bytes | None, sends: int) -> dict:
    """Run `homing send ARGS` while the broker's commits are held, stop the broker once the
    `sends` wait in its queue, and return the error the command ends with (exit 3) once the
    broker is let go and has committed the send."""
    env = {**os.environ, **as_user(bp, "shop")}
    blocker = await RawClient.connect(bp.server, bp.token("ann"), "d1")
    async with held_commits(bp.data):
        # A batch of its own, held at its commit: the command's send queues behind it.
        await blocker.send(wire.Send(id=1, cid="blocker", body="first", to="bob"))
        await _until(lambda: committing(bp, 1))
        cmd = subprocess.Popen([*homing_cmd(), "send", "--to", "bob", "--connect-timeout",
                                "1", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               stdin=subprocess.PIPE if stdin is not None else None)
        if stdin is not None:
            cmd.stdin.write(stdin)
            cmd.stdin.close()
            cmd.stdin = None  # (communicate would flush it)
        await _until(lambda: queued_behind(bp, sends))
        bp.proc.send_signal(signal.SIGSTOP)  # nothing more answered: the command gives up
        try:
            out, err = await trio.to_thread.run_sync(cmd.communicate)
        finally:
            bp.proc.send_signal(signal.SIGCONT)
    assert cmd.returncode == 3, (cmd.returncode, out, err)
    assert out == b"", out
    await blocker.aclose()  # (its idle timeout closed it: it answers no ping)
    return json.loads(err.decode().strip().splitlines()[-1])


async def test_a_send_given_up_on_names_the_cid_that_makes_its_retry_a_dup(tmp_path):
    """`homing send TEXT` (no --cid) that ends `unreachable` after the broker took its send:
    the message is committed all the same; the error names the cid, and a run again with
    `--cid` that cid is a dup: the message is in the conversation once."""
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1", "--stats-interval", "1") as bp:
        error = await _given_up_after_its_send_was_taken(bp, ["order 7 shipped"], None, 1)
        assert error["error"] == "unreachable", error
        assert "may have been accepted" in error["message"], error
        cid = error["message"].split("--cid ")[1].split()[0]
        with trio.fail_after(30):
            while "order 7 shipped" not in await conversation_bodies(bp, "shop", "dm:bob:shop"):
                await trio.sleep(0.05)
        again = lines(homing("send", "--to", "bob", "--cid", cid, "order 7 shipped",
                             env=as_user(bp, "shop")))
        assert again[0]["dup"] is True, again
        assert (await conversation_bodies(bp, "shop", "dm:bob:shop")).count("order 7 shipped") == 1


async def test_stdin_given_up_on_names_the_prefix_that_makes_a_run_again_send_no_line_twice(
        tmp_path):
    """`homing send --stdin` without --cid-prefix that ends `unreachable` after the broker
    took its lines: the error names the fresh prefix; run again with it on the same input,
    every line is in the conversation once."""
    text = "".join(f"line {i}\n" for i in range(1, 6))
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1", "--stats-interval", "1") as bp:
        error = await _given_up_after_its_send_was_taken(bp, ["--stdin"], text.encode(), 5)
        assert error["error"] == "unreachable", error
        prefix = error["message"].split("--cid-prefix ")[1].split()[0]
        with trio.fail_after(30):
            while len(await conversation_bodies(bp, "shop", "dm:bob:shop")) < 5:
                await trio.sleep(0.05)
        again = lines(homing("send", "--to", "bob", "--stdin", "--cid-prefix", prefix,
                             input=text, env=as_user(bp, "shop")))
        assert [r["dup"] for r in again] == [True] * 5, again
        bodies = await conversation_bodies(bp, "shop", "dm:bob:shop")
        assert sorted(bodies) == sorted(text.splitlines()), bodies
