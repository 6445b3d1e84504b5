"""Crash safety: a real child process appending through a Store is SIGKILLed at random moments.

The child (kill_child.py) prints `ACK <lsn> <cid>` for each send once its commit is durable,
either straight from `Store.execute` batches or through the broker's group commit (the
`Committer` and its worker thread); iterations alternate between the two. A timer SIGKILLs it
at a random moment after its first ack, whatever it is doing then. After each kill the data
directory must hold every acked send at the LSN it was acked with (and still hold those of the
earlier iterations), its LSNs must be gapless from 1 with the digest chain verifying, and the
projections must equal a replay.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage.records import MESSAGE_ACCEPTED
from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("kill_child.py")
BODY = "x" * 200  # kill_child.BODY
MODES = ("batch", "committer")


def _run_and_kill(path: Path, seed: int, mode: str, rng: random.Random,
                  log: Path) -> dict[int, str]:
    """Start the child, SIGKILL it a random while after its first ack; return {lsn: cid} of
    every send it acked. Fails unless it was our SIGKILL that ended it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(path), str(seed), mode],
                                stdout=subprocess.PIPE, stderr=err, env=env)
    acked: dict[int, str] = {}
    timer = None
    guard = threading.Timer(120, proc.kill)  # a child that never acks fails, not hangs
    guard.start()
    try:
        for line in proc.stdout:  # to EOF: the timer's SIGKILL ends it
            if not line.startswith(b"ACK "):
                continue
            _, lsn, cid = line.split()
            assert int(lsn) not in acked, f"lsn {int(lsn)} acked twice"
            acked[int(lsn)] = cid.decode()
            if timer is None:
                timer = threading.Timer(rng.uniform(0.0, 0.3), proc.kill)
                timer.start()
    finally:
        for t in (timer, guard):
            if t is not None:
                t.cancel()
                t.join()
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"seed {seed}: the child ended by itself (status {proc.returncode}), not killed "
        f"mid-append:\n{log.read_text(errors='replace')[-3000:]}")
    assert acked, f"seed {seed}: nothing was acked before the kill"
    return acked


def _check_acked(store: Store, acked: dict[int, str]) -> None:
    """Every acked send is in the log at its LSN, as sent."""
    logged = {e.lsn: e for e in store.read_events(min(acked), max(acked))}
    problems = []
    for lsn, cid in sorted(acked.items()):
        e = logged.get(lsn)
        if e is None or e.type != MESSAGE_ACCEPTED or e.data.get("cid") != cid \
                or e.data.get("body") != BODY:
            problems.append(f"lsn {lsn} acked as {cid}, logged as {e}")
    assert not problems, f"{len(problems)} acked sends lost or changed: {problems[:5]}"


def _kill_iterations(tmp_path, iterations: int) -> None:
    rng = random.Random(1234)
    path = tmp_path / "data"
    every: dict[int, str] = {}
    for i in range(iterations):
        acked = _run_and_kill(path, i, MODES[i % 2], rng, tmp_path / f"child-{i}.log")
        assert min(acked) > max(every, default=0), f"iteration {i} acked an LSN of before"
        every.update(acked)
        store = Store.open(path)
        try:
            last = store.last_lsn()
            assert last >= max(acked), f"iteration {i}: acked {max(acked)} but only {last} on disk"
            assert store.verify_log() == last  # LSNs 1..last, gapless, the chain verifies
            assert store.check_projections() is None
            _check_acked(store, acked)
        finally:
            store.close()
    store = Store.open(path, readonly=True)
    try:
        _check_acked(store, every)  # the later crashes lost nothing of the earlier ones
    finally:
        store.close()


def test_kill_during_appends(tmp_path):
    """After SIGKILL at random moments, every acked event is present, gapless and chained."""
    _kill_iterations(tmp_path, 20)


@pytest.mark.long
def test_kill_during_appends_long(tmp_path):
    """The kill test with more iterations (soak)."""
    _kill_iterations(tmp_path, 100)
