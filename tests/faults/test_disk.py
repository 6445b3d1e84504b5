"""Disk faults: a truly full filesystem under a running broker, and space coming back.

(The LMDB map growing by itself is covered in tests/storage: test_rules.py and test_faults.py
open a 64 KiB map and write past it.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.disks import fill, tmpfs
from tests.faults.checker import History, stop_and_check


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not permitted)."""
    with tmpfs(tmp_path, "4m") as mnt:
        yield mnt


async def test_full_disk_refuses_sends_keeps_delivering_and_recovers(broker_process, tiny_disk,
                                                                     tally):
    """Full disk: sends get unavailable, stored messages are still delivered; after space
    returns, sends are accepted again; the log verifies."""
    bp = broker_process(data=tiny_disk / "data")
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (2 << 20))
    history = History()
    body = "z" * 4000
    with trio.fail_after(90):
        async with bp.client("alice") as alice:
            refused = 0
            for i in range(2000):
                history.attempt("alice", f"f{i}", f"{i}{body}", ("bob",))
                try:
                    r = await alice.send(f"{i}{body}", to="bob", cid=f"f{i}")
                except ClientError as exc:
                    assert exc.name == "unavailable", exc
                    refused += 1
                    if refused >= 5:
                        break
                    continue
                history.accept("alice", f"f{i}", r.conv, r.seq)
            assert refused >= 5, "the disk never filled"
            tally.add("disk full: sends refused with unavailable", refused)
            accepted = len(history.accepted)
            assert accepted > 10
            assert bp.alive()
            async with bp.client("bob") as bob:
                for _ in range(accepted):
                    d = await bob.deliveries().receive()
                    history.deliver("bob", "d1", bob, d)
                    await bob.ack(d.inbox_seq)
            tally.add("disk full: stored messages delivered", accepted)
            filler.unlink()
            for i in range(5):
                cid = f"after{i}"
                history.attempt("alice", cid, f"back {i}", ("bob",))
                r = await alice.send(f"back {i}", to="bob", cid=cid)
                history.accept("alice", cid, r.conv, r.seq)
            tally.add("disk full: sends accepted after space returned", 5)
        async with bp.client("bob") as bob:
            for _ in range(5):
                d = await bob.deliveries().receive()
                history.deliver("bob", "d1", bob, d)
                await bob.ack(d.inbox_seq)
    await stop_and_check(bp, history)


async def test_a_broker_restarted_on_a_full_disk_serves_reads(tiny_disk):
    """A clean stop, the disk filled, a start again: the broker opens (its lock file is
    written in place, in the block it has) and serves what is stored; a send is refused
    `unavailable`. (With the lock file emptied at the clean stop, the start needed a new block
    for the pid and failed: "No space left on device".)"""
    from tests.harness import running_broker

    data = tiny_disk / "data"
    async with running_broker(data) as h, h.client("alice") as alice:
        sent = await alice.send("before the disk filled", to="bob")
    fill(tiny_disk / "filler")
    async with running_broker(data, expected_errors={"batch_failed"}) as h, \
            h.client("bob") as bob:
        page = await bob.history(sent.conv)
        assert [m.body for m in page.messages] == ["before the disk filled"]
        with pytest.raises(ClientError) as refused:
            await bob.send("after", to="alice")
        assert refused.value.name == "unavailable", refused.value


async def test_audit_rebuild_on_a_full_disk_is_a_json_error_and_changes_nothing(tiny_disk):
    """`homing audit rebuild` that runs out of space says so as the audit's JSON error (exit 1)
    and leaves the directory as it was: verify passes, and passes again once space returns."""
    import json

    from tests.harness import running_broker
    from tests.procs import homing

    data = tiny_disk / "data"
    async with running_broker(data) as h, h.client("alice") as alice:
        for i in range(300):
            await alice.send(f"{i:04d}" + "x" * 1000, to=f"user{i % 50}")
    filler = tiny_disk / "filler"
    fill(filler)
    proc = homing("audit", "rebuild", "--data", str(data), check=False, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "storage_error" and "nothing changed" in err["message"]
    filler.unlink()
    for args in (("verify",), ("rebuild",), ("verify",)):
        proc = homing("audit", *args, "--data", str(data), check=False, timeout=60)
        assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0])["ok"], proc


async def test_a_backup_onto_a_full_disk_is_refused_and_taken_away(tmp_path, tiny_disk):
    """`homing backup` of a data directory larger than the disk it copies onto ends with the
    `data_dir` error naming the cause (exit 2) and leaves no half copy, nor the directory it
    made for it; the same backup elsewhere succeeds."""
    import json

    from tests.harness import running_broker
    from tests.procs import homing

    data = tmp_path / "data"
    async with running_broker(data) as h, h.client("alice") as alice:
        for i in range(300):
            await alice.send(f"{i:04d}" + "x" * 20_000, to=f"user{i % 50}")
    assert (data / "data.mdb").stat().st_size > 5 << 20  # over the 4 MiB disk
    proc = homing("backup", str(tiny_disk / "bk"), "--data", str(data), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    err = json.loads(proc.stderr)
    assert err["error"] == "data_dir" and err["message"].endswith("No space left on device")
    assert list(tiny_disk.iterdir()) == []
    proc = homing("backup", str(tmp_path / "bk"), "--data", str(data), timeout=60)
    assert json.loads(proc.stdout)["last_lsn"] > 300


READER = """
import sys
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32, subdir=True)
txn = env.begin()
print("ready", flush=True)
sys.stdin.readline()
"""


async def test_a_retried_ack_is_not_ok_until_it_is_durable(broker_process, tiny_disk, tally):
    """An ack with an id whose commit fails (a full disk) is answered `unavailable`; the client
    retries it, as §7 says. The session's cursor moved on when the first one arrived, so the
    retry moves nothing in memory: its `ok` must still wait until the device's ack is durable
    (PROTOCOL.md §5.2), not come at once while nothing of it is on disk. A reader in another
    process holds an old snapshot (a backup, an audit), so commits cannot reuse freed pages and
    need the space the disk no longer has."""
    from tests.faults.conftest import RawClient, replies

    bp = broker_process(data=tiny_disk / "data")
    with trio.fail_after(60):
        async with bp.client("alice") as alice:
            for i in range(20):
                conv = (await alice.send(f"m{i}", to="bob")).conv
        reader = subprocess.Popen([sys.executable, "-c", READER, str(tiny_disk / "data")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        filler = tiny_disk / "filler"
        try:
            assert reader.stdout.readline().strip() == "ready"
            fill(filler)
            bob = await RawClient.connect(bp.server, bp.token("bob"), "b1")
            got = []
            while len(got) < 20:
                f = await bob.next()
                if isinstance(f, wire.Deliver):
                    got.append(f)
            failed = None
            for f in got:
                await bob.send(wire.Ack(upto=f.inbox_seq, id=f.inbox_seq))
                answer = await bob.reply(f.inbox_seq)
                if isinstance(answer, wire.Error):
                    assert answer.name == "unavailable", answer
                    failed = f
                    break
            assert failed is not None, "no ack failed: the disk never filled"
            tally.add("disk full: an ack with an id refused, then retried")
            # The retry, on the disk still full: nothing can be durable, so no `ok`.
            await bob.send(wire.Ack(upto=failed.inbox_seq, id=1000))
            answer = await bob.reply(1000)
            assert isinstance(answer, wire.Error) and answer.name == "unavailable", answer
        finally:
            reader.kill()
            reader.wait()
            filler.unlink(missing_ok=True)
        # Space is back: the retry is `ok`, and durable, as `receipts` shows.
        await bob.send(wire.Ack(upto=failed.inbox_seq, id=1001))
        assert isinstance((await replies(bob, [1001]))[1001], wire.Ok)
        await bob.send(wire.Receipts(id=1002, conv=conv, seq=failed.seq))
        assert "bob" in (await replies(bob, [1002]))[1002].delivered
        await bob.aclose()
    assert await bp.aterminate() == 0
    store = bp.open_store(readonly=True)
    try:
        assert store.delivered("bob", "b1") >= failed.inbox_seq
    finally:
        store.close()
