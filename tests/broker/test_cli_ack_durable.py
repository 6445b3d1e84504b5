"""`homing ack` and `homing listen` end only once their ack is on the broker's disk: a broker
SIGKILLed after the command returned does not deliver again what it printed as acked; one that
cannot commit it (a full disk) makes them say what is left of the ack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from tests.disks import fill, tmpfs
from tests.faults.test_disk import READER
from tests.procs import BrokerProcess, homing, homing_cmd, last_error, lines
from tests.stalls import held_commits

HOLD_S = 2.0  # how long the test holds the broker's commits: the command must still wait


@pytest.fixture
def bp(tmp_path):
    with BrokerProcess(tmp_path / "data") as b:
        yield b


def _env(bp: BrokerProcess, user: str) -> dict:
    return {"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token(user)}


async def _killed_when_it_returns(bp: BrokerProcess, *args: str, env: dict) -> list[dict]:
    """Run `homing ARGS` while the broker commits nothing; SIGKILL the broker the moment the
    command has exited (held or not), restart it, and return what the command printed."""
    proc = subprocess.Popen([*homing_cmd(), *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with held_commits(bp.data):
            with trio.move_on_after(HOLD_S):
                while proc.poll() is None:
                    await trio.sleep(0.02)
            if proc.poll() is not None:  # it returned while its ack could not be on disk
                bp.kill()
        out, err = await trio.to_thread.run_sync(proc.communicate, None, 30)
        assert proc.returncode == 0, err
        bp.kill()  # right after it returned, if it waited for the commit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    await bp.astart()
    return lines(subprocess.CompletedProcess(args, 0, out, ""))


async def test_homing_ack_returns_once_the_ack_is_durable(bp):
    """A member's phone acks with `homing ack` what `listen --no-ack` printed; the broker is
    SIGKILLed as soon as `homing ack` printed {"acked": 1}: the entry is not delivered again.
    Until 2026-12-07 `homing ack` returned once the ack reached the broker, before its commit
    (which waits up to 5 ms for other work, and as long as the disk takes), so the book's
    notice came to the phone a second time after the crash."""
    homing("send", "--to", "member-42", "--cid", "hold-991", "Your reserved book is back",
           env=_env(bp, "library"))
    phone = _env(bp, "member-42")
    printed = lines(homing("listen", "--device", "phone", "--no-ack", "--count", "1",
                           "--timeout", "10", env=phone))
    assert [d["inbox_seq"] for d in printed] == [1]
    assert await _killed_when_it_returns(bp, "ack", "--device", "phone", "--upto", "1",
                                         env=phone) == [{"acked": 1}]
    again = lines(homing("listen", "--device", "phone", "--timeout", "1", env=phone))
    assert again == [], again


async def test_homing_listen_returns_once_its_acks_are_durable(bp):
    """`homing listen --count 1` prints the notice and acks it; the broker SIGKILLed as soon
    as the command ended does not deliver the notice to that device again (until 2026-12-07
    it did: the command ended once its last ack reached the broker, not its disk)."""
    homing("send", "--to", "member-42", "--cid", "hold-992", "Your reserved book is back",
           env=_env(bp, "library"))
    phone = _env(bp, "member-42")
    printed = await _killed_when_it_returns(bp, "listen", "--device", "phone", "--count", "1",
                                            "--timeout", "10", env=phone)
    assert [(d["inbox_seq"], d["cid"]) for d in printed] == [(1, "hold-992")]
    again = lines(homing("listen", "--device", "phone", "--timeout", "1", env=phone))
    assert again == [], again


def test_on_a_full_disk_ack_and_listen_say_the_ack_is_not_kept(tmp_path):
    """The broker's disk is full (a backup's reader holds old pages, so nothing is freed):
    `homing ack` and `homing listen` cannot make their ack durable and exit 1 `unavailable`.
    The error says what that leaves: the ack may not be kept, so run `homing ack` again (a
    repeat changes nothing), and what `listen` printed may come again. Until 2026-12-07 (review)
    it said only "storage full: the broker cannot accept writes now", after `listen` had
    printed the deliveries, as though nothing had come of the command."""
    with tmpfs(tmp_path, "4m") as disk, BrokerProcess(disk / "data") as bp:
        homing("send", "--to", "member-42", "--stdin", "--cid-prefix", "due-",
               input="".join(f"Book {i} is due\n" for i in range(20)), env=_env(bp, "library"))
        reader = subprocess.Popen([sys.executable, "-c", READER, str(bp.data)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            fill(disk / "filler")
            phone = _env(bp, "member-42")
            for upto in range(1, 21):  # each ack a commit: one of them finds no room
                acked = homing("ack", "--device", "phone", "--upto", str(upto), env=phone,
                               check=False)
                if acked.returncode:
                    break
            assert acked.returncode == 1 and acked.stdout == "", acked
            err = last_error(acked.stderr)
            assert err["error"] == "unavailable", err
            assert err["message"].endswith(
                "; the ack may not be on the broker's disk: run the command again (a repeat "
                "of an ack changes nothing)"), err
            for n in range(20):
                listened = homing("listen", "--device", f"tablet-{n}", "--count", "1",
                                  "--timeout", "10", env=phone, check=False)
                if listened.returncode:
                    break
            assert listened.returncode == 1, listened
            assert [d["inbox_seq"] for d in lines(listened)] == [1]
            err = last_error(listened.stderr)
            assert err["error"] == "unavailable", err
            assert err["message"].endswith(
                "; the ack of what was printed may not be on the broker's disk: those "
                "deliveries may come again"), err
        finally:
            reader.kill()
            reader.wait()
            (disk / "filler").unlink(missing_ok=True)
