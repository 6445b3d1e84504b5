"""`broker_stats`: every `--stats-interval` seconds a broker process logs what it holds and what
it did since the line before (docs/OPERATIONS.md, "Logs"); `--stats-interval 0` logs none."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.disks import fill, tmpfs
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, last_error, lines
from tests.waits import wait_until, wait_until_sync

FIELDS = {"connections", "requests_only", "handshaking", "lsn", "queued", "events_per_s",
          "commits_per_s", "commands_per_s", "failed_per_s", "cpu_pct", "rss_mib",
          "handshakes_full_per_s", "connections_full_per_s", "commits_stopped_per_s", "tasks",
          "auth_throttled_per_s", "accept_failed_per_s", "handshakes_given_up_per_s"}


def stats_lines(bp: BrokerProcess) -> list[dict]:
    events = [json.loads(line) for line in bp.logfile.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == "broker_stats"]


def test_the_stats_line_counts_what_the_broker_did(tmp_path):
    """Five sends and a listener: a later line shows the connection held and the log's last
    LSN, and the lines' rates account for the commits (each falls in one line's window)."""
    with BrokerProcess(tmp_path / "data", "--stats-interval", "1") as bp:
        env = {**os.environ, "HOMING_SERVER": bp.server}
        sent = lines(homing("send", "--to", "bob", "--stdin", input="a\nb\nc\nd\ne\n",
                            env={**env, "HOMING_TOKEN": bp.token("shop")}))
        listen = subprocess.Popen([*homing_cmd(), "listen"], text=True,
                                  env={**env, "HOMING_TOKEN": bp.token("bob")},
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            for _ in sent:
                assert listen.stdout.readline()
            last = max(r["lsn"] for r in sent)
            deadline = time.monotonic() + 20
            while not any(s["lsn"] >= last and s["connections"] == 1 for s in stats_lines(bp)):
                assert time.monotonic() < deadline, stats_lines(bp)
                time.sleep(0.05)
        finally:
            listen.kill()
            listen.wait()
    stats = stats_lines(bp)
    assert all(set(s) >= FIELDS for s in stats)
    assert any(s["events_per_s"] > 0 and s["commits_per_s"] > 0 and s["commands_per_s"] > 0
               for s in stats)
    assert all(s["queued"] >= 0 and s["cpu_pct"] >= 0 and s["rss_mib"] > 0 for s in stats)
    assert [s["lsn"] for s in stats] == sorted(s["lsn"] for s in stats)


async def test_the_stats_line_says_how_many_sessions_are_requests_only(tmp_path):
    """`connections` counts every session past hello; `requests_only` those of them that are
    sent no deliveries (`hello.deliver: false`, the one-shot `homing` commands), so a line
    with many connections and few listeners says what holds them."""
    with BrokerProcess(tmp_path / "data", "--stats-interval", "1") as bp:
        listener, asker = await RawClient.connect(bp.server), await RawClient.connect(bp.server)
        try:
            await listener.hello(bp.token("bob"), "d")
            await asker.hello(bp.token("bob"), "d", deliver=False)
            await wait_until(lambda: any(s["connections"] == 2 and s["requests_only"] == 1
                                         for s in stats_lines(bp)))
            await asker.aclose()
            await wait_until(lambda: (s := stats_lines(bp)[-1])["connections"] == 1
                             and s["requests_only"] == 0)
        finally:
            await listener.aclose()
            await asker.aclose()


def test_no_stats_lines_with_an_interval_of_zero(tmp_path):
    with BrokerProcess(tmp_path / "data", "--stats-interval", "0") as bp:
        homing("send", "--to", "bob", "hi", env={"HOMING_SERVER": bp.server,
                                                 "HOMING_TOKEN": bp.token("shop")})
        time.sleep(0.5)
    assert stats_lines(bp) == []


def test_writes_a_full_disk_refuses_are_counted_in_the_stats_line(tmp_path):
    """docs/OPERATIONS.md, "Logs": `broker_stats` is the line to alert on, and a broker
    refusing every write must show there. On a full disk every send was answered
    `unavailable`, and the lines said `commits_per_s` and `commands_per_s` 0.0 with the `lsn`
    still, as an idle broker's do (the guide's sign, "`lsn` standing still while
    `commands_per_s` is not zero", never showed: the commands of a failed commit were not
    counted). Found filling a 4 MiB tmpfs under a broker ("A full disk"). `failed_per_s`
    counts them now."""
    with tmpfs(tmp_path, "4m") as disk:
        bp = BrokerProcess(disk / "data", "--stats-interval", "1")
        bp.logfile = tmp_path / "broker.log"  # not on the disk it fills
        with bp:
            env = as_user(bp, "shop", "service")
            lsn = lines(homing("send", "--to", "bob", "first", env=env))[0]["lsn"]
            # the line whose window holds that send's commit: the lines after it hold none
            assert wait_until_sync(lambda: any(s["lsn"] == lsn for s in stats_lines(bp)))
            fill(disk / "filler")
            before = len(stats_lines(bp))
            for i in range(3):
                refused = homing("send", "--to", "bob", "--cid", f"big{i}", "x" * 60_000,
                                 env=env, check=False)
                assert last_error(refused.stderr)["error"] == "unavailable"
            after = len(stats_lines(bp))
            # two lines more: the window of the last refusal has ended
            assert wait_until_sync(lambda: len(stats_lines(bp)) > after + 1), bp.log_tail()
            stats = stats_lines(bp)[before:]
    assert all(s["lsn"] == lsn and s["commits_per_s"] == s["commands_per_s"] == 0
               for s in stats), stats
    assert sum(s["failed_per_s"] for s in stats) > 0, stats
