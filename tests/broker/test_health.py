"""`homing health` against real `homing serve` children: a healthy broker, one stopped by
SIGSTOP, one refusing connections, one whose commit hangs and one whose disk is full; and the
monitoring scripts of docs/OPERATIONS.md, "Monitoring", run as they are printed there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from tests.disks import fill, tmpfs
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, last_error, lines
from tests.stalls import held_commits
from tests.waits import wait_until_sync

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
HANG_GUARD_S = 60  # a check that has not returned by then hangs (its --timeout is far less)
FIGURES = {"status", "answer_ms", "lsn", "queued", "committing", "commit_running_ms",
           "failing", "commits", "commit_ms", "commands", "failed", "rate_limited",
           "connections", "requests_only", "handshaking", "uptime_s", "disk_free_bytes",
           "commits_stopped", "max_connections", "connections_full", "handshakes_full",
           "open_files", "open_files_limit", "tls_expires_s", "backlog_max", "windows_full",
           "auth_throttled", "accept_failed", "handshakes_given_up"}


@pytest.fixture
def broker(tmp_path):
    with BrokerProcess(tmp_path / "data") as b:
        yield b


def health(bp: BrokerProcess, *flags: str, role: str = "monitor") -> subprocess.CompletedProcess:
    """`homing health` of `bp` with a token of `role`; never raises for its exit status."""
    return homing("health", *flags, env=as_user(bp, "ops", role), timeout=HANG_GUARD_S,
                  check=False)


def test_a_healthy_broker_is_ok_with_its_figures(broker):
    """A serving broker is `ok`, exit 0, one JSON line of its figures, the lsn of what it
    committed among them, with a monitor token or an admin's; a user's is refused, exit 1."""
    sent = lines(homing("send", "--to", "bob", "hi", env=as_user(broker, "shop")))[0]
    proc = health(broker)
    assert proc.returncode == 0, proc.stderr
    [out] = lines(proc)
    assert set(out) == FIGURES
    assert out["status"] == "ok" and out["failing"] is False
    assert out["lsn"] == sent["lsn"] and out["commits"] >= 1 and out["commands"] >= 1
    assert out["commit_running_ms"] == 0 and out["queued"] == 0
    assert out["connections"] == 1  # the check's own session
    assert out["disk_free_bytes"] > 0
    assert out["commits_stopped"] == 0  # no batch passed --max-batch-rows

    assert lines(health(broker, role="admin"))[0]["status"] == "ok"
    refused = health(broker, role="user")
    assert refused.returncode == 1 and refused.stdout == ""
    assert last_error(refused.stderr)["error"] == "forbidden"


def test_a_stopped_broker_is_unreachable_at_the_timeout(broker):
    """A broker stopped by SIGSTOP still has its connections accepted by the kernel, yet the
    check does not hang: past --timeout it is `unreachable`, exit 3."""
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        proc = health(broker, "--timeout", "2")
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 3 and proc.stdout == ""
    err = last_error(proc.stderr)
    assert err["error"] == "unreachable" and "within 2 s" in err["message"], err


def test_a_broker_refusing_connections_is_unreachable_at_once(broker):
    """No broker on the port: `unreachable`, exit 3, saying the connection was refused
    (not tried again until the timeout)."""
    broker.kill()
    proc = health(broker, "--timeout", "30")
    assert proc.returncode == 3 and proc.stdout == ""
    err = last_error(proc.stderr)
    assert err["error"] == "unreachable" and "refused" in err["message"], err


async def test_a_hung_commit_is_stalled_and_ok_again_once_it_ends(tmp_path):
    """A commit that does not end (its disk held, as tests/stalls.py holds it) is answered
    for, not waited on: `stalled` past --stall, exit 4, its figures on stdout; `ok` once it
    ended."""
    bp = BrokerProcess(tmp_path / "data")
    await bp.astart()
    shop = as_user(bp, "shop")
    try:
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                async with held_commits(bp.data):
                    nursery.start_soon(trio.to_thread.run_sync,
                                       lambda: homing("send", "--to", "bob", "held", env=shop))
                    # polled: the send must reach the commit, and the commit run past --stall
                    while (proc := await trio.to_thread.run_sync(
                            health, bp, "--stall", "0.5")).returncode == 0:
                        await trio.sleep(0.1)
                    assert proc.returncode == 4, proc.stderr
                    [out] = lines(proc)
                    assert out["status"] == "stalled" and out["committing"] == 1
                    assert out["commit_running_ms"] >= 500
                    err = last_error(proc.stderr)
                    assert err["error"] == "stalled" and "--stall 0.5" in err["message"], err
            # released, and the send returned: its commit ended, ok again
            proc = await trio.to_thread.run_sync(health, bp, "--stall", "0.5")
            assert proc.returncode == 0, proc.stderr
            assert lines(proc)[0]["status"] == "ok"
    finally:
        bp.kill()


def test_a_full_disk_is_failing_until_a_commit_succeeds(tmp_path):
    """On a full disk a write is refused `unavailable`; the check then says `failing`, exit
    4, with `disk_free_bytes` 0; once space is back and a write commits, `ok` again."""
    with tmpfs(tmp_path, "4m") as disk:
        bp = BrokerProcess(disk / "data")
        try:
            bp.start()
            shop = as_user(bp, "shop")
            homing("send", "--to", "bob", "before", env=shop)
            fill(disk / "filler")
            refused = homing("send", "--to", "bob", "full", env=shop, check=False)
            assert last_error(refused.stderr)["error"] == "unavailable", refused.stderr

            proc = health(bp)
            assert proc.returncode == 4, proc.stderr
            [out] = lines(proc)
            assert out["status"] == "failing" and out["failing"] is True
            assert out["failed"] >= 1 and out["disk_free_bytes"] == 0
            assert last_error(proc.stderr)["error"] == "failing"

            (disk / "filler").unlink()
            homing("send", "--to", "bob", "after", env=shop)
            proc = health(bp)
            assert proc.returncode == 0, proc.stderr
            assert lines(proc)[0]["status"] == "ok"
        finally:
            bp.kill()


def test_a_device_whose_deliveries_pile_up_is_behind(broker):
    """`--backlog USER:DEVICE` says how many of the device's deliveries wait for its ack;
    past `--max-backlog` the broker is well but the device `behind`, exit 4; once the device
    read and acked them, `ok`."""
    shop = as_user(broker, "shop")
    for i in range(3):
        homing("send", "--to", "bob", f"order {i}", env=shop)
    figures = health(broker, "--backlog", "bob:phone")
    assert figures.returncode == 0, figures.stderr
    assert lines(figures)[0]["backlog"] == {"user": "bob", "device": "phone", "head": 3,
                                            "acked": 0, "unacked": 3}

    # --max-backlog N is the most that may wait: exactly N is still `ok` (only N - 1 and N + 1
    # were tried, so a bound that took N itself for `behind` passed).
    proc = health(broker, "--backlog", "bob:phone", "--max-backlog", "3")
    assert proc.returncode == 0 and lines(proc)[0]["status"] == "ok", proc.stderr

    proc = health(broker, "--backlog", "bob:phone", "--max-backlog", "2")
    assert proc.returncode == 4, proc.stderr
    assert lines(proc)[0]["status"] == "behind"
    err = last_error(proc.stderr)
    assert err["error"] == "behind" and err["message"].startswith("3 deliveries of bob's device "
                                                                  "phone wait"), err

    read = homing("listen", "--device", "phone", "--count", "3", env=as_user(broker, "bob"))
    assert len(lines(read)) == 3
    proc = health(broker, "--backlog", "bob:phone", "--max-backlog", "2")
    assert proc.returncode == 0, proc.stderr
    assert lines(proc)[0]["backlog"]["unacked"] == 0


def test_a_check_costs_two_log_lines_and_no_commit(broker):
    """A check opens one requests-only session and writes nothing: its `connection_opened`
    and `connection_closed`, and the lsn stays where it was."""
    homing("send", "--to", "bob", "hi", env=as_user(broker, "shop"))
    before = lines(health(broker))[0]

    def lines_of_check() -> list[dict]:
        return [e for e in broker.log_events() if e.get("device") == "health"]

    seen = len(lines_of_check())
    after = lines(health(broker))[0]
    assert wait_until_sync(lambda: len(lines_of_check()) == seen + 2), broker.log_tail()
    assert [e["event"] for e in lines_of_check()[seen:]] == ["connection_opened",
                                                             "connection_closed"]
    assert after["lsn"] == before["lsn"]


# -- the scripts of docs/OPERATIONS.md, "Monitoring" -------------------------------------------


def doc_script(name: str) -> str:
    """The fenced `sh` block of OPERATIONS.md whose second line is `# NAME: ...`."""
    text = OPERATIONS.read_text(encoding="utf-8")
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        if block.startswith("#!/bin/sh\n") and block.split("\n")[1].startswith(f"# {name}:"):
            return block
    raise AssertionError(f"no `{name}` script in docs/OPERATIONS.md")


def run_script(tmp_path: Path, name: str, bp: BrokerProcess, *args: str, **env: str):
    script = tmp_path / name
    script.write_text(doc_script(name))
    script.chmod(0o755)
    bindir = str(Path(homing_cmd()[0]).parent)
    full = {**os.environ, **as_user(bp, "ops", "monitor"),
            "PATH": bindir + os.pathsep + os.environ["PATH"], **env}
    return subprocess.run(["/bin/sh", str(script), *args], env=full, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_the_nagios_check_says_ok_and_critical(tmp_path):
    """`check_homing` exits 0 (OK) on a serving broker, 2 (CRITICAL) for a device behind, a
    stopped broker and a gone one."""
    bp = BrokerProcess(tmp_path / "data")
    try:
        bp.start()
        ok = run_script(tmp_path, "check_homing", bp)
        assert ok.returncode == 0 and ok.stdout.startswith("HOMING OK"), ok
        homing("send", "--to", "bob", "order", env=as_user(bp, "shop"))
        behind = run_script(tmp_path, "check_homing", bp, "--backlog", "bob:phone",
                            "--max-backlog", "1")
        assert behind.returncode == 0, behind  # one waiting: not more than 1
        homing("send", "--to", "bob", "order 2", env=as_user(bp, "shop"))
        behind = run_script(tmp_path, "check_homing", bp, "--backlog", "bob:phone",
                            "--max-backlog", "1")
        assert behind.returncode == 2 and "not well" in behind.stdout, behind
        assert "2 deliveries of bob's device phone" in behind.stdout, behind
        bp.proc.send_signal(signal.SIGSTOP)
        try:
            down = run_script(tmp_path, "check_homing", bp)
        finally:
            bp.proc.send_signal(signal.SIGCONT)
        assert down.returncode == 2 and down.stdout.startswith("HOMING CRITICAL"), down
        bp.kill()
        gone = run_script(tmp_path, "check_homing", bp)
        assert gone.returncode == 2 and "refused" in gone.stdout, gone
    finally:
        bp.kill()


def test_the_textfile_exporter_writes_the_figures(tmp_path):
    """`homing_textfile` writes node-exporter's text format: `homing_up 1` and a line per
    figure of a serving broker; `homing_up 0` alone once it is gone."""
    bp = BrokerProcess(tmp_path / "data")
    out = tmp_path / "textfile"
    out.mkdir()
    try:
        bp.start()
        done = run_script(tmp_path, "homing_textfile", bp, TEXTFILE_DIR=str(out))
        assert done.returncode == 0, done
        metrics = dict(line.split(" ") for line in (out / "homing.prom").read_text().splitlines())
        assert metrics["homing_up"] == "1" and metrics["homing_ok"] == "1"
        assert {"homing_lsn", "homing_commits", "homing_commit_ms", "homing_queued",
                "homing_commit_running_ms", "homing_connections"} <= set(metrics)
        assert all(re.fullmatch(r"-?[\d.]+(e[+-]?\d+)?", v) for v in metrics.values()), metrics
        bp.kill()
        done = run_script(tmp_path, "homing_textfile", bp, TEXTFILE_DIR=str(out))
        assert done.returncode == 0, done
        assert (out / "homing.prom").read_text() == "homing_up 0\n"
        assert [p.name for p in out.iterdir()] == ["homing.prom"]  # no temporary file left
    finally:
        bp.kill()
