"""Acceptance: 5,000 piped lines ride through three SIGKILL restarts, each delivered once."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import trio

from tests.faults.checker import inbox
from tests.procs import homing_cmd

LINES = 5000
KILL_AFTER = (700, 2100, 3500)  # result lines seen on stdout before each SIGKILL


def audit_available() -> bool:
    res = subprocess.run([*homing_cmd(), "audit", "--help"], capture_output=True)
    return res.returncode == 0


def audit(data) -> None:
    """`homing audit verify` if it exists, else the store's own checks."""
    if audit_available():
        res = subprocess.run([*homing_cmd(), "audit", "verify", "--data", str(data)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        return
    from storage.store import Store

    store = Store.open(str(data), readonly=True)
    try:
        assert store.verify_log() == store.last_lsn()
        assert store.check_projections() is None
    finally:
        store.close()


async def test_piped_send_survives_three_sigkills(broker_process, tmp_path, tally):
    """`homing send --stdin` of 5,000 lines across 3 SIGKILL restarts: each line lands once."""
    await piped_send_through_restarts(broker_process(), tmp_path, tally, "SIGKILL")


async def test_piped_send_survives_rolling_sigterm_restarts(broker_process, tmp_path, tally):
    """The same through 3 clean SIGTERM restarts (a rolling upgrade): each line lands once."""
    await piped_send_through_restarts(broker_process(), tmp_path, tally, "SIGTERM")


async def piped_send_through_restarts(bp, tmp_path, tally, how: str) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line {i} of the run\n" for i in range(1, LINES + 1)))
    env = {**os.environ, "HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token("alice")}
    results: list[dict] = []
    with trio.fail_after(180):
        with open(lines, "rb") as stdin:
            proc = await trio.lowlevel.open_process(
                [*homing_cmd(), "send", "--to", "bob", "--stdin", "--cid-prefix", "run1"],
                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            kills = list(KILL_AFTER)
            buf = b""
            while True:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                results.extend(json.loads(x) for x in done if x)
                if kills and len(results) >= kills[0]:
                    kills.pop(0)
                    if how == "SIGKILL":
                        bp.kill()
                    else:
                        assert await bp.aterminate() == 0
                    tally.add(f"{how} during `homing send --stdin`")
                    await trio.sleep(0.3)
                    await bp.astart()
            status = await proc.wait()
            err = (await proc.stderr.receive_some(65536)).decode(errors="replace")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert not kills, f"the sender ended ({status}: {err}) before every kill: {kills}"
        assert status == 0, err
        assert len(results) == LINES
        cids = Counter(r["cid"] for r in results)
        assert set(cids) == {f"run1-{i}" for i in range(1, LINES + 1)}
        assert max(cids.values()) == 1
        tally.add(f"{how} restarts: lines accepted", len(results))
        tally.add(f"{how} restarts: lines answered dup",
                  sum(1 for r in results if r["dup"]))

        listen = await trio.run_process(
            [*homing_cmd(), "listen", "--count", str(LINES), "--timeout", "10"],
            env={**env, "HOMING_TOKEN": bp.token("bob")}, capture_stdout=True,
            capture_stderr=True, check=False)
    assert listen.returncode == 0, listen.stderr
    got = [json.loads(x) for x in listen.stdout.splitlines() if x]
    assert Counter(d["body"] for d in got) == Counter(
        f"line {i} of the run" for i in range(1, LINES + 1))
    assert await bp.aterminate() == 0
    store = bp.open_store(readonly=True)
    try:
        msgs = [it for it in inbox(store, "bob") if it.kind == "msg"]
    finally:
        store.close()
    assert Counter(it.cid for it in msgs) == Counter(f"run1-{i}" for i in range(1, LINES + 1))
    assert {it.sender for it in msgs} == {"alice"}
    audit(bp.data)
