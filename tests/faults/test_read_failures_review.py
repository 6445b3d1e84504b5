"""More of the broker's store reads failing for real (tests/faults/test_read_failures.py): the
reads outside a request's own handler, the SDK through them, and the `homing audit` tools.

The fault is the same: another process holds every free slot of LMDB's reader table.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import protocol as wire
from broker.client import BrokerUnavailable, ConnectionLost, open_client
from storage import commands as cmd
from storage.store import Store
from tests.faults.conftest import RawClient
from tests.faults.test_read_failures import EXPECTED, HOLDER, ReadersHeld
from tests.harness import running_broker

ROOT = Path(__file__).resolve().parents[2]


async def test_an_admin_send_is_answered_while_reads_fail(tmp_path):
    """An admin token's send commits (a write), and its `result` is built by a reply callback
    that reads the store (whether the admin is a member of the conversation): that read
    failing left the send without any answer, and logged `commit_callback_failed`."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("root", role="admin") as admin:
            conv = (await admin.send("first", to="bob")).conv
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                with trio.fail_after(10):
                    result = await admin.send("while full", conv=conv)
                assert (result.conv, result.seq, result.dup) == (conv, 2, False)
            finally:
                holder.release()
            page = await admin.history(conv, order="oldest")
            assert [m.body for m in page.messages] == ["first", "while full"]
        assert not [e for e in h.logs if e["event"] == "commit_callback_failed"]


async def test_typing_whose_read_fails_is_dropped_without_a_word(tmp_path):
    """`typing` has no id and is ephemeral (PROTOCOL.md §5: dropped without a word when it
    cannot go out). Its membership read failing was answered an `unavailable` error without
    an id and not closing, which the error registry says of `unavailable` only when it closes
    the connection."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("alice") as alice:
            conv = (await alice.send("hi", to="bob")).conv
            raw = await RawClient.connect(h.server, h.token("alice"), device="raw")
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                await raw.send(wire.Typing(conv=conv))
                await raw.send(wire.Ping(id=7))
                said = []
                with trio.fail_after(10):
                    while not said or not isinstance(said[-1], wire.Pong):
                        said.append(await raw.next())
                        assert said[-1] is not None, said
                assert said[-1].id == 7
                assert not [f for f in said if isinstance(f, wire.Error)], said
            finally:
                holder.release()
                await raw.aclose()


async def test_deliveries_resume_after_the_readers_are_freed(tmp_path):
    """A device whose delivery needs a read (the mute state of a conversation new to its
    session) is closed with `unavailable`; the SDK reconnects (refused `unavailable` while the
    table stays full) and, once it is free, is delivered everything, once, in order."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("bob", reconnect_timeout=60) as bob, h.client("carol") as carol:
            await bob.send("hello", to="dave")  # bob is delivered nothing yet
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                sent = [(await carol.send(f"m{i}", to="bob")).seq for i in range(3)]
                assert sent == [1, 2, 3]
                with trio.fail_after(10):
                    while not any(e["event"] == "delivery_read_failed" for e in h.logs):
                        await trio.sleep(0.01)
                await trio.sleep(0.5)  # a reconnect or two refused meanwhile
            finally:
                holder.release()
            got = []
            with trio.fail_after(30):
                async for d in bob.deliveries():
                    got.append(d.body)
                    await bob.ack(d.inbox_seq)
                    if len(got) == 3:
                        break
            assert got == ["m0", "m1", "m2"]
            assert bob.reconnects >= 1
            # And the session goes on: a new message comes through.
            await carol.send("m3", to="bob")
            with trio.fail_after(10):
                d = await bob.deliveries().receive()
            assert d.body == "m3"


async def test_a_client_that_can_never_connect_gives_up_in_time(tmp_path):
    """`unavailable` at hello is retried, within reconnect_timeout only; giving up then says
    the broker refused the session (BrokerUnavailable), not "cannot reach" it, as it did."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("alice") as alice:
            await alice.send("hi", to="bob")
        holder = ReadersHeld(tmp_path / "data")
        try:
            assert await holder.held() > 1000
            started = time.monotonic()
            told: list[str] = []
            with trio.fail_after(20), pytest.raises(BrokerUnavailable) as lost:
                async with open_client(h.server, h.token("bob"), "d1", reconnect_timeout=2,
                                       on_unreachable=told.append):
                    pass
            assert time.monotonic() - started < 10
            assert isinstance(lost.value, ConnectionLost)
            assert (lost.value.name, lost.value.code) == ("unavailable", 10)
            said = f"{h.server} refused the session: unavailable: storage unavailable"
            assert str(lost.value) == f"{said} (gave up after 2 s)"
            assert told == [said]
        finally:
            holder.release()


# ------------------------------------------------------------------ homing audit


def _log_of(path: Path, messages: int) -> None:
    """A data directory whose log holds `messages` sends of 200 bytes each."""
    store = Store.open(str(path))
    try:
        for b in range(0, messages, 100):
            store.execute([cmd.SendMessage("alice", "d", "user", f"c{b}-{i}", "x" * 200,
                                           to="bob") for i in range(100)])
    finally:
        store.close()


@pytest.mark.parametrize("action", [["log", "--json"], ["export"]])
def test_audit_reads_that_fail_midway_end_with_one_error_line(tmp_path, action):
    """`homing audit log` and `export` read the log in chunks, each in a short read
    transaction. The reader table filling up between two chunks (the command blocked writing
    to a slow stdout) ended them in a traceback; the CLI's contract is one JSON error line."""
    data = tmp_path / "data"
    _log_of(data, 3000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "audit", *action,
                             "--data", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    holder = None
    try:
        # It opened and printed: the rest of its first chunk (1,024 events) fills the pipe,
        # and it waits to write, holding no read transaction.
        first = proc.stdout.read(1)
        assert first
        time.sleep(0.5)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert int(holder.stdout.readline()) > 1000
        out, err = proc.communicate(timeout=60)
        out = first + out
    finally:
        proc.kill()
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=30)
    lines = err.decode().strip().splitlines()
    assert "Traceback" not in err.decode(), err.decode()[-2000:]
    error = json.loads(lines[-1])
    assert error["error"] == "no_data" and "MDB_READERS_FULL" in error["message"], error
    assert proc.returncode == 2
    assert out  # what it read before



async def test_a_group_post_and_a_shutdown_while_reads_fail(tmp_path):
    """A post to a group whose members' sessions do not know its mute state (one read for all
    of them, `Hub._learn_muted`, then one each as they deliver): each is closed with
    `unavailable`, none is lost once the table is free; and a shutdown meanwhile (its status
    pushes unreadable) stops the broker cleanly."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with contextlib.AsyncExitStack() as stack:
            ann = await stack.enter_async_context(h.client("ann"))
            conv = await ann.create_group("g", ["m1", "m2", "m3"])
            members = {user: await stack.enter_async_context(
                h.client(user, reconnect_timeout=60)) for user in ("m1", "m2", "m3")}
            for client in members.values():  # each is delivered its join entry
                with trio.fail_after(10):
                    d = await client.deliveries().receive()
                await client.ack(d.inbox_seq)
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                assert (await ann.send("to all", conv=conv)).seq == 1
                with trio.fail_after(10):
                    while sum(e["event"] == "delivery_read_failed" for e in h.logs) < 3:
                        await trio.sleep(0.01)
            finally:
                holder.release()
            for user, client in members.items():
                with trio.fail_after(30):
                    d = await client.deliveries().receive()
                assert (d.conv, d.body) == (conv, "to all"), user
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                h.broker.shutdown()
                with trio.fail_after(20):
                    await h.broker.wait_stopped()
            finally:
                holder.release()



async def test_commands_commit_and_are_answered_while_reads_fail(tmp_path):
    """The commit thread reads through its write transaction only: membership changes, a
    mute, a read mark and acks (one whose conversations the rules read from the inbox) all
    commit and are answered while no read transaction can begin."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("alice") as alice, h.client("carol") as carol:
            dm = (await carol.send("one", to="bob")).conv
            await carol.send("two", to="bob")
            bob = await RawClient.connect(h.server, h.token("bob"))
            try:
                holder = ReadersHeld(tmp_path / "data")
                try:
                    assert await holder.held() > 1000
                    await carol.mute(dm)
                    await carol.read(dm, 1)
                    # Past what this session was sent: the rules read the conversations.
                    await bob.send(wire.Ack(upto=2, id=41))
                    said = []
                    with trio.fail_after(10):
                        while not said or getattr(said[-1], "id", None) != 41:
                            said.append(await bob.next())
                            assert said[-1] is not None, said
                    assert isinstance(said[-1], wire.Ok), said
                    # (Their membership entries close bob's and carol's sessions: delivered
                    # from disk, `unavailable`; the SDK's carol comes back once it is free.)
                    group = await alice.create_group("g", ["bob"])
                    await alice.invite(group, "carol")
                    await alice.send("in the group", conv=group)
                finally:
                    holder.release()
            finally:
                await bob.aclose()
            members = await alice.members(group)
            assert (list(members.owners), list(members.members)) == (["alice"], ["bob", "carol"])
            assert (await carol.conversations()).convs
            receipts = await carol.receipts(dm, 2)
            assert "bob" in receipts.delivered


async def test_a_fresh_batch_cut_by_a_failed_read_is_delivered_once_and_whole(tmp_path):
    """Two entries committed together reach a caught-up device from memory; the first's mute
    state is known, the second's is read, and that read fails half-way through the batch: the
    first goes out, the session closes with `unavailable`, and after the reconnect the SDK
    hands over the second, nothing twice, nothing skipped."""
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("bob", reconnect_timeout=60) as bob, h.client("ann") as ann:
            group = await ann.create_group("g", ["bob"])
            dm = (await ann.send("first", to="bob")).conv
            got = []
            with trio.fail_after(10):
                async for d in bob.deliveries():
                    got.append(d.body)
                    await bob.ack(d.inbox_seq)
                    if d.body == "first":
                        break
            raw = await RawClient.connect(h.server, h.token("ann"), device="raw")
            holder = ReadersHeld(tmp_path / "data")
            try:
                assert await holder.held() > 1000
                # One write, so both are read and queued for the same commit.
                await raw.stream.send_all(
                    raw.conn.send(wire.Send(id=1, cid="c-dm", body="dm", to="bob"))
                    + raw.conn.send(wire.Send(id=2, cid="c-group", body="group", conv=group)))
                with trio.fail_after(10):
                    while not any(e["event"] == "delivery_read_failed" for e in h.logs):
                        await trio.sleep(0.01)
            finally:
                holder.release()
                await raw.aclose()
            got = []
            with trio.fail_after(30):
                async for d in bob.deliveries():
                    got.append((d.conv, d.body))
                    await bob.ack(d.inbox_seq)
                    if d.body == "group":
                        break
            assert got == [(dm, "dm"), (group, "group")]
