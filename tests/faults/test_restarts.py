"""Restarts end to end, with `homing serve` as a real child process: a SIGKILL while a group
post fans out to many members with deliveries unacked, a SIGTERM while SDK clients send, a
restart with lower limits over data written under higher ones, a second broker on the same
directory, and a directory the broker cannot write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.disks import fill, tmpfs
from tests.faults.checker import History, stop_and_check
from tests.faults.conftest import RawClient, scaled
from tests.faults.test_read_failures import ReadersHeld
from tests.procs import BrokerProcess, homing, homing_cmd

MEMBERS = tuple(f"m{i:02}" for i in range(16))


async def _raw_reconnect(bp: BrokerProcess, user: str, device: str) -> RawClient:
    """A raw session of `user`/`device`, retried while the broker restarts."""
    while True:
        try:
            return await RawClient.connect(bp.server, bp.token(user), device)
        except (OSError, trio.BrokenResourceError, AssertionError):
            await trio.sleep(0.05)


async def _raw_device(bp, user, device, sessions: list, done: trio.Event):
    """A raw device that acks every third delivery with an id, through restarts: `sessions`
    gets (welcome.acked, [inbox_seq...], [each ack answered ok]) per session."""
    rid, pending = 100, (0, 0)
    while not done.is_set():
        c = await _raw_reconnect(bp, user, device)
        seen: list[int] = []
        oks: list[int] = []
        sessions.append((c.welcome.acked, seen, oks))
        try:
            while not done.is_set():
                with trio.move_on_after(0.2):
                    f = await c.next()
                    if f is None:
                        break
                    if isinstance(f, wire.Deliver):
                        seen.append(f.inbox_seq)
                        if len(seen) % 3 == 0:
                            rid += 1
                            await c.send(wire.Ack(upto=f.inbox_seq, id=rid))
                            pending = (rid, f.inbox_seq)
                        else:
                            await c.send(wire.Ack(upto=f.inbox_seq))
                    elif isinstance(f, wire.Ok) and f.id == pending[0]:
                        oks.append(pending[1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await c.aclose()


async def test_sigkill_while_a_group_post_fans_out_to_unacked_devices(broker_process, tally):
    """A SIGKILL while posts to a group of 17 fan out, with a window of 8 unacked deliveries
    per device and acks (some with ids) on their way: after the restart the SDK resends what
    it had no answer for (answered `dup` if the first was stored), every member device gets
    every accepted post once, in conversation order, with no gap; a raw device resumes at its
    welcome's `acked`, which is at least its last ack answered `ok`, gapless from there."""
    bp = broker_process("--window", "8")
    history = History()
    got: dict[str, list[tuple[int, int]]] = {m: [] for m in MEMBERS}
    sessions: list = []
    done = trio.Event()
    accepted = 0
    dups = 0

    async def member(user, group_made: trio.Event):
        async with bp.client(user, "d1") as c:
            group_made.set() if user == MEMBERS[-1] else None
            n = 0
            async for d in c.deliveries():
                if d.kind == "msg":
                    got[user].append((d.inbox_seq, d.seq))
                    history.deliver(user, "d1", c, d)
                n += 1
                await c.ack(d.inbox_seq, durable=n % 4 == 0)

    async def sender(alice, group, k):
        nonlocal accepted, dups
        for i in range(12):
            cid, body = f"p{k}-{i}", f"post {k}.{i}"
            history.attempt("alice", cid, body, MEMBERS)
            r = await alice.send(body, conv=group, cid=cid)
            history.accept("alice", cid, r.conv, r.seq)
            accepted += 1
            dups += bool(r.dup)

    with trio.fail_after(40):
        async with bp.client("alice", "a1") as alice:
            group = await alice.create_group("crowd", list(MEMBERS))
            async with trio.open_nursery() as listeners:
                ready = trio.Event()
                for m in MEMBERS:
                    listeners.start_soon(member, m, ready)
                listeners.start_soon(_raw_device, bp, MEMBERS[0], "raw", sessions, done)
                async with trio.open_nursery() as senders:
                    for k in range(4):
                        senders.start_soon(sender, alice, group, k)
                    while accepted < 10:
                        await trio.sleep(0.005)
                    bp.kill()
                    tally.add("SIGKILL during a group fan-out")
                    await trio.sleep(0.2)
                    await bp.astart()
                with trio.fail_after(20):
                    while any(len(got[m]) < accepted for m in MEMBERS):
                        await trio.sleep(0.05)
                    while len(sessions) < 2:  # the raw device is back too (asserted below)
                        await trio.sleep(0.05)
                await trio.sleep(0.5)  # the raw device takes its last deliveries
                done.set()
                listeners.cancel_scope.cancel()
    assert accepted == 48
    tally.add("SDK resends after SIGKILL answered dup", dups)
    for m in MEMBERS:
        assert [seq for _, seq in got[m]] == list(range(1, 49)), (m, got[m])
        inbox = [i for i, _ in got[m]]
        assert inbox == sorted(set(inbox)), (m, inbox)
    # The raw device: each session resumes at its welcome's acked, at least the last ack
    # answered ok before it, and runs gapless from there.
    assert len(sessions) >= 2, sessions
    last_ok = 0
    for n, (welcome_acked, seen, oks) in enumerate(sessions):
        assert welcome_acked >= last_ok, sessions
        if seen:
            assert seen == list(range(welcome_acked + 1, welcome_acked + 1 + len(seen))), \
                (n, welcome_acked, seen)
        last_ok = max([last_ok, *oks])
    assert sessions[-1][1] and sessions[-1][1][-1] >= 49  # the create's entry and 48 posts
    report = await stop_and_check(bp, history)
    tally.add("group fan-out after SIGKILL: deliveries checked", report.deliveries)


async def test_sigterm_while_sdk_clients_send_loses_nothing_and_they_carry_on(broker_process,
                                                                              tally):
    """SIGTERM while four SDK clients send to a group and a member acks: the broker exits 0
    with `broker_stopping`, `broker_stopped` and `storage_closed` logged in that order; the
    clients ride over the stop (each send returns once the restarted broker has it, resent if
    the stop cut it off) and every accepted post is stored once and delivered in order."""
    bp = broker_process()
    history = History()
    users = ("s0", "s1", "s2", "s3")
    got: list[int] = []
    stopped = trio.Event()
    status: list[int] = []
    accepted = 0

    async def sender(c, group, user):
        nonlocal accepted
        for i in range(40):
            cid, body = f"{user}-{i}", f"{user} {i}"
            history.attempt(user, cid, body, ("bob",))
            r = await c.send(body, conv=group, cid=cid)
            history.accept(user, cid, r.conv, r.seq)
            accepted += 1

    async def listener(c):
        async for d in c.deliveries():
            if d.kind == "msg":
                history.deliver("bob", "b1", c, d)
                got.append(d.seq)
            await c.ack(d.inbox_seq)

    with trio.fail_after(40):
        async with bp.client("s0") as c0, bp.client("s1") as c1, bp.client("s2") as c2, \
                bp.client("s3") as c3, bp.client("bob", "b1") as bob:
            group = await c0.create_group("team", ["s1", "s2", "s3", "bob"])
            async with trio.open_nursery() as n:
                n.start_soon(listener, bob)
                async with trio.open_nursery() as senders:
                    for c, u in zip((c0, c1, c2, c3), users, strict=True):
                        senders.start_soon(sender, c, group, u)
                    while accepted < 30:
                        await trio.sleep(0.005)
                    status.append(await bp.aterminate())
                    stopped.set()
                    tally.add("SIGTERM while SDK clients send")
                    await bp.astart()
                with trio.fail_after(15):
                    while len(got) < 160:
                        await trio.sleep(0.05)
                n.cancel_scope.cancel()
            assert all(c.reconnects >= 1 for c in (c0, c1, c2, c3, bob))
    assert status == [0], bp.log_tail()
    assert got == list(range(1, 161))
    names = [e.get("event") for e in bp.log_events()]
    first_stop = names.index("broker_stopping")
    assert names.index("broker_stopped", first_stop) < names.index("storage_closed", first_stop)
    assert "Traceback" not in bp.logfile.read_text()
    await stop_and_check(bp, history)


async def _delivery(c: RawClient) -> wire.Deliver:
    """The next delivery (pushes in between skipped)."""
    while not isinstance(frame := await c.next(), wire.Deliver):
        assert frame is not None, "closed"
    return frame


async def test_a_restart_with_lower_limits_serves_what_was_written_under_higher_ones(
        broker_process, tally):
    """Data written under the default --window and --max-members, the broker SIGKILLed with
    20 deliveries out unacked, restarted with --window 4 and --max-members 3: the device
    resumes after its acked entry with 4 in flight, then more as it acks; the group of 6 made
    before still gets every post fanned out to all, and its members can leave or be removed;
    growing it, or a new group past 3, is `limit_exceeded`."""
    bp = broker_process()
    with trio.fail_after(30):
        async with bp.client("alice") as alice:
            group = await alice.create_group("six", ["u1", "u2", "u3", "u4", "u5"])
            for i in range(20):
                await alice.send(f"m{i}", to="bob")
        bob = await RawClient.connect(bp.server, bp.token("bob"), "b1")
        seen = [await _delivery(bob) for _ in range(20)]
        await bob.send(wire.Ack(upto=seen[4].inbox_seq, id=1))
        assert isinstance(await bob.reply(1), wire.Ok)
        bp.kill()
        await bob.aclose()
        bp.flags += ["--window", "4", "--max-members", "3"]
        await bp.astart()
        tally.add("restart with a lower --window and --max-members")

        bob = await RawClient.connect(bp.server, bp.token("bob"), "b1")
        assert bob.welcome.acked == seen[4].inbox_seq
        got = [await _delivery(bob) for _ in range(4)]
        assert [d.body for d in got] == ["m5", "m6", "m7", "m8"]
        with trio.move_on_after(0.5):
            raise AssertionError(f"a fifth delivery before any ack: {await _delivery(bob)}")
        await bob.send(wire.Ack(upto=got[1].inbox_seq))
        assert [(await _delivery(bob)).body for _ in range(2)] == ["m9", "m10"]
        await bob.aclose()

        async with bp.client("alice") as alice:
            r = await alice.send("to all six", conv=group)
            for user in ("u1", "u5"):
                async with bp.client(user) as c:
                    msgs = [d async for d in _take(c, 1)]
                    assert msgs[0].body == "to all six" and msgs[0].seq == r.seq
            with pytest.raises(ClientError) as refused:
                await alice.invite(group, "u6")
            assert refused.value.name == "limit_exceeded"
            with pytest.raises(ClientError) as refused:
                await alice.create_group("new", ["v1", "v2", "v3"])
            assert refused.value.name == "limit_exceeded"
            await alice.remove(group, "u5")
            async with bp.client("u4") as u4:
                await u4.leave(group)
            assert len((await alice.members(group)).members) == 3
    await bp.aterminate()


async def _take(c, n: int):
    """The first `n` message deliveries of an SDK client."""
    async for d in c.deliveries():
        if d.kind == "msg":
            yield d
            n -= 1
            if not n:
                return


def _serve_error(data: Path, *args: str, **kw) -> tuple[int, dict, str]:
    proc = homing("serve", "--data", str(data), "--port", "0", *args, check=False, timeout=20,
                  **kw)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stderr.strip().splitlines()[-1]), proc.stderr


async def test_a_second_broker_on_the_same_directory_is_refused_and_the_first_serves_on(
        broker_process, tally):
    """A second `homing serve` on a directory a broker serves exits 2 with one `locked` error
    naming the first broker's pid, and changes nothing: the first goes on serving."""
    bp = broker_process()
    with trio.fail_after(30):
        async with bp.client("alice") as alice:
            await alice.send("before", to="bob")
        status, err, _ = await trio.to_thread.run_sync(_serve_error, bp.data)
        assert status == 2 and err["error"] == "locked", err
        assert f"is locked by process {bp.pid} " in err["message"]
        tally.add("a second broker on the same data directory")
        async with bp.client("alice") as alice:
            assert (await alice.send("after", to="bob")).seq == 2
    assert bp.alive()
    await bp.aterminate()


def test_serve_on_a_read_only_filesystem_is_a_data_dir_error(tmp_path):
    """A data directory on a filesystem mounted read-only: exit 2 and one `data_dir` error,
    not a traceback."""
    data = tmp_path / "data"
    bp = BrokerProcess(data)
    bp.start()
    bp.terminate()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(data), str(ro)], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)],
                          capture_output=True).returncode:
            pytest.skip("read-only remounts are not permitted here")
        status, err, _ = _serve_error(ro)
        assert status == 2 and err["error"] == "data_dir", err
        assert err["message"].startswith(f"cannot use {ro}: ") and "Read-only" in err["message"]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_start_after_a_sigkill_says_the_last_stop_was_unclean(tmp_path):
    """A broker restarted after a SIGKILL (or a crash, or its machine stopping) logged the same
    lines as after a clean stop: only a `broker_stopped` missing before it told the operator.
    Now the lock file's pid, written over at a clean close, is said as `unclean_stop_found`."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()  # a new directory: nothing to say
    killed = bp.pid
    bp.kill()
    bp.start()  # after the SIGKILL
    assert bp.terminate() == 0
    bp.start()  # after a clean stop
    assert bp.terminate() == 0
    found = [e for e in bp.log_events() if e["event"] == "unclean_stop_found"]
    assert [(e["pid"], e["level"]) for e in found] == [(killed, "warning")], found
    assert (bp.data / "homing.lock").read_text().split() == ["stopped"]


def test_an_unclean_stop_is_still_said_after_a_start_that_failed(tmp_path):
    """A broker SIGKILLed, then a start kept out (the reader table full: `unavailable`), then a
    start that serves: the failed one put back the pid it found, so the one that serves still
    says the stop before them was not clean."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    killed = bp.pid
    bp.kill()
    holder = ReadersHeld(bp.data)
    try:
        assert int(holder.proc.stdout.readline()) > 0
        status, err, _ = _serve_error(bp.data)
        assert (status, err["error"]) == (1, "unavailable"), err
    finally:
        holder.release()
    bp.start()
    assert bp.terminate() == 0
    found = [e for e in bp.log_events() if e["event"] == "unclean_stop_found"]
    assert [e["pid"] for e in found] == [killed], found


def test_a_start_kept_out_by_a_full_reader_table_exits_1_and_starts_once_it_is_free(tmp_path):
    """Every reader slot of the data directory held by other processes (a crowd of audits) as
    the broker starts: it cannot open the directory, and said so as `data_dir`, exit 2, the
    status the systemd unit of docs/OPERATIONS.md does not restart on, though the cause passes
    by itself. Now `unavailable`, exit 1, so that Restart=on-failure tries again; and it starts
    once the slots are free."""
    data = tmp_path / "data"
    bp = BrokerProcess(data)
    bp.start()
    bp.terminate()
    holder = ReadersHeld(data)
    try:
        assert int(holder.proc.stdout.readline()) > 0
        status, err, _ = _serve_error(data)
        assert (status, err["error"]) == (1, "unavailable"), err
        assert err["message"].startswith(f"cannot use {data}: ") and "READERS_FULL" in \
            err["message"], err
    finally:
        holder.release()
    bp = BrokerProcess(data)
    bp.start()
    assert bp.alive()
    bp.terminate()


def test_a_start_on_a_full_disk_exits_1_so_that_it_is_tried_again(tmp_path):
    """A new data directory on a disk with no space left: `unavailable`, exit 1 (it was
    `data_dir`, exit 2, which the systemd unit does not restart on): space comes back."""
    with tmpfs(tmp_path, "2m") as disk:
        fill(disk / "filler")
        status, err, _ = _serve_error(disk / "data")
        assert (status, err["error"]) == (1, "unavailable"), err
        assert "No space left on device" in err["message"], err


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the broker as another user")
@pytest.mark.parametrize("mode, files, nobodys, says", [
    (0o755, 0o644, (), "{data}/homing.lock: Permission denied (the broker runs as uid 65534)"),
    (0o777, 0o644, (), "{data}/homing.lock: Permission denied (the broker runs as uid 65534)"),
    # a copy restored as root and not given to the broker's user (docs/OPERATIONS.md,
    # "Running the broker": the key is opened first)
    (0o700, 0o600, (), "{data}/secret.key: Permission denied (the broker runs as uid 65534)"),
    (0o755, 0o600, (), "{data}/secret.key: Permission denied (the broker runs as uid 65534)"),
    (0o700, 0o644, ("homing.lock", "secret.key", "lock.mdb"),
     "cannot open {data}: {data}/data.mdb: Permission denied (uid 65534 may not write it)"),
    (0o700, 0o644, ("homing.lock", "secret.key", "data.mdb"),
     "cannot open {data}: {data}/lock.mdb: Permission denied (uid 65534 may not write it)"),
])
def test_serve_as_a_user_who_cannot_write_the_data_names_the_file(mode, files, nobodys, says):
    """A data directory whose files are root's (mode `files`), but for `nobodys`, which are
    nobody's, and `homing serve` run as nobody: exit 2 and one `data_dir` error naming the
    file it could not open and the uid it runs as, not a traceback. It said only "cannot use
    DIR: Permission denied", or "cannot open DIR: DIR: Permission denied" for an LMDB file."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*as_nobody, *homing_cmd(), "--help"], capture_output=True,
                           text=True, timeout=20)
    if probe.returncode != 0:  # e.g. a pyenv Python under /root (0700): nobody cannot load it
        pytest.skip(f"homing cannot run as uid 65534 here: {probe.stderr.strip()[-200:]}")
    top = Path(tempfile.mkdtemp(prefix="homing-perm-"))  # pytest's tmp is root's only
    try:
        top.chmod(0o755)
        data = top / "data"
        bp = BrokerProcess(data)
        bp.start()
        bp.terminate()
        data.chmod(mode)
        if nobodys:
            os.chown(data, 65534, 65534)
        for f in data.iterdir():
            f.chmod(files)
            if f.name in nobodys:
                os.chown(f, 65534, 65534)
                f.chmod(0o600)
        proc = subprocess.run([*as_nobody, *homing_cmd(), "serve", "--data", str(data),
                               "--port", "0"], capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        err = json.loads(proc.stderr.strip().splitlines()[-1])
        assert err["error"] == "data_dir", err
        assert err["message"] == f"cannot use {data}: " + says.format(data=data), err
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _events(bp: BrokerProcess) -> list:
    store = bp.open_store(readonly=True)
    try:
        return [(e.type, e.user, dict(e.data)) for e in store.read_events()]
    finally:
        store.close()


async def test_a_create_or_membership_change_cut_off_by_sigkill_is_done_once(broker_process,
                                                                           tally):
    """A create, an invite, a remove and a leave, each cut off by a SIGKILL a few
    milliseconds after the SDK wrote it (before or after its commit, as it falls): the call
    returns once the restarted broker has it, and the log holds it once."""
    await _cut_changes(broker_process(), tally, (0.0, 0.005))


@pytest.mark.long
async def test_creates_and_membership_changes_cut_off_at_many_moments(broker_process, tally):
    """As above at HOMING_LONG_SCALE x 16 moments from 0 to 15 ms after the write."""
    moments = scaled(16, 2)
    await _cut_changes(broker_process(), tally, tuple(i * 0.015 / moments for i in range(moments)))


async def _cut_changes(bp: BrokerProcess, tally, delays: tuple[float, ...]) -> None:
    steps: list[tuple[str, bool]] = []  # (step, whether the kill came after its commit)

    async def cut(name: str, call, delay: float, count) -> object:
        before = count(_events(bp))
        result: list = []

        async def run():
            result.append(await call())

        async with trio.open_nursery() as n:
            n.start_soon(run)
            await trio.sleep(delay)
            bp.kill()
            steps.append((name, count(_events(bp)) > before))
            await bp.astart()
        assert count(_events(bp)) == before + 1, (name, delay)
        return result[0]

    def created(events):
        return sum(t == "conv.created" for t, _, _ in events)

    def added(events):
        return sum(t == "member.added" and d.get("user") == "zed" for t, _, d in events)

    def removed(who):
        return lambda events: sum(t == "member.removed" and who in (u, d.get("user"))
                                  for t, u, d in events)

    with trio.fail_after(10 + 8 * len(delays)):
        async with bp.client("alice") as alice, bp.client("bob") as bob:
            for i, delay in enumerate(delays):
                group = await cut("create", partial(alice.create_group, f"g{i}", ["bob"]),
                                  delay, created)
                await cut("invite", partial(alice.invite, group, "zed"), delay, added)
                await cut("remove", partial(alice.remove, group, "zed"), delay, removed("zed"))
                await cut("leave", partial(bob.leave, group), delay, removed("bob"))
                members = await alice.members(group)
                assert (members.owners, members.admins, members.members) == (("alice",), (), ())
                tally.add("SIGKILL with a create or membership change on its way", 4)
    tally.add("of which killed after the commit", sum(after for _, after in steps))
    await bp.aterminate()


async def test_an_ack_written_just_before_sigterm_is_kept(broker_process, tally):
    """A device acks (without an id) the 20 deliveries it has and the broker gets SIGTERM a
    moment later: the stop commits that queued ack, so after the restart the device's welcome
    says acked 20 and nothing is delivered again; an ack written after the closing error
    `shutting_down` is not promised, and is at most redelivered."""
    bp = broker_process()
    with trio.fail_after(30):
        async with bp.client("alice") as alice:
            for i in range(20):
                await alice.send(f"m{i}", to="bob")
        bob = await RawClient.connect(bp.server, bp.token("bob"), "b1")
        seen = [await _delivery(bob) for _ in range(20)]
        await bob.send(wire.Ack(upto=seen[-1].inbox_seq))
        await trio.sleep(0.001)
        assert await bp.aterminate() == 0
        while (f := await bob.next()) is not None:
            last = f
        assert isinstance(last, wire.Error) and last.name == "shutting_down" and last.close
        await bob.aclose()
        tally.add("SIGTERM right after an ack without id")
        await bp.astart()
        bob = await RawClient.connect(bp.server, bp.token("bob"), "b1")
        assert bob.welcome.acked == seen[-1].inbox_seq
        with trio.move_on_after(0.3):
            raise AssertionError(f"delivered again: {await _delivery(bob)}")
        await bob.aclose()
    await bp.aterminate()


async def test_a_resend_of_a_message_over_a_lowered_body_limit_is_a_dup(broker_process,
                                                                        tally):
    """A 5,000-byte message accepted, its result lost with a SIGKILL, and the broker restarted
    with --max-body-bytes 1000: the resend with its cid is answered with the first result
    (`dup`), raw or through the SDK, as past the rate limits; it was `invalid`, telling the
    sender that a stored and delivered message had failed. A new body of that size, or one
    repeating a cid that was never accepted, is still `invalid`."""
    bp = broker_process()
    big = "x" * 5000
    with trio.fail_after(30):
        c = await RawClient.connect(bp.server, bp.token("alice"), "a1")
        await c.send(wire.Send(id=1, cid="big", body=big, to="bob"))
        first = await c.reply(1)
        assert isinstance(first, wire.Result)
        await c.aclose()
        bp.kill()
        bp.flags += ["--max-body-bytes", "1000"]
        await bp.astart()
        tally.add("restart with a lower --max-body-bytes, then a resend of a bigger message")

        c = await RawClient.connect(bp.server, bp.token("alice"), "a1")
        await c.send(wire.Send(id=2, cid="big", body=big, to="bob"))
        again = await c.reply(2)
        assert isinstance(again, wire.Result), again
        assert (again.conv, again.seq, again.dup) == (first.conv, first.seq, True)
        await c.send(wire.Send(id=3, cid="new", body=big, to="bob"))
        refused = await c.reply(3)
        assert isinstance(refused, wire.Error) and refused.name == "invalid", refused
        assert refused.message == ("send: bad value for field 'body': a body of 5,000 bytes, "
                                   "over the limit of 1,000")
        await c.aclose()

        async with bp.client("alice", "a2") as alice:
            r = await alice.send(big, to="bob", cid="big")
            assert (r.conv, r.seq, r.dup) == (first.conv, first.seq, True)
            with pytest.raises(ClientError) as info:
                await alice.send(big, to="bob", cid="never")
            assert info.value.name == "invalid"
            assert (await alice.send("small", to="bob")).seq == 2
    await bp.aterminate()


async def test_sighup_stops_the_broker_cleanly(broker_process, tally):
    """SIGHUP (the terminal that ran `homing serve` closed, an ssh session dropped) stops the
    broker as SIGTERM does: its connections told `shutting_down`, exit status 0. It killed the
    process (exit status -1), the connections cut without a word. The child starts with
    SIGHUP's default action whatever this process has (a run under `nohup` ignores it, and a
    broker started so keeps ignoring it: the next test)."""
    bp = broker_process(preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    with trio.fail_after(30):
        c = await RawClient.connect(bp.server, bp.token("alice"), "d1")
        await c.send(wire.Send(id=1, cid="before", body="x", to="bob"))
        assert isinstance(await c.reply(1), wire.Result)
        bp.proc.send_signal(signal.SIGHUP)
        frames = []
        while (f := await c.next()) is not None:
            frames.append(f)
        assert any(isinstance(f, wire.Error) and f.name == "shutting_down" for f in frames), frames
        assert await trio.to_thread.run_sync(bp.proc.wait, 20) == 0
        await c.aclose()
    assert any(e.get("event") == "broker_stopped" for e in bp.log_events())
    tally.add("SIGHUP to the broker")


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # in the child before exec, as `nohup` does


async def test_sighup_ignored_at_start_stays_ignored(broker_process):
    """`nohup homing serve` (SIGHUP ignored when it starts) goes on serving when its terminal
    closes: SIGHUP stops only a broker that did not start with it ignored."""
    bp = broker_process(preexec_fn=_ignore_sighup)
    with trio.fail_after(30):
        c = await RawClient.connect(bp.server, bp.token("alice"), "d1")
        bp.proc.send_signal(signal.SIGHUP)
        # Each answer passes through the event loop that a caught SIGHUP wakes: by the later
        # ones, a broker that took it would be stopping (its connection told `shutting_down`).
        for n in range(1, 5):
            await c.send(wire.Send(id=n, cid=f"after{n}", body="x", to="bob"))
            assert isinstance(await c.reply(n), wire.Result), n
        await c.aclose()
    assert bp.alive()
    assert not any(e.get("event") == "broker_stopping" for e in bp.log_events())
    assert await bp.aterminate() == 0
