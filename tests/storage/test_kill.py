"""Crash safety: a real child process appending through a Store is SIGKILLed at random moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("kill_child.py")


def _run_and_kill(path: Path, seed: int, rng: random.Random) -> int:
    """Start the child, let it commit for a random while, SIGKILL it; return the last acked LSN."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(path), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    acked = 0
    deadline = None
    try:
        for line in proc.stdout:
            if line.startswith(b"ACK "):
                acked = max(acked, int(line.split()[1]))
                if deadline is None:
                    deadline = time.monotonic() + rng.uniform(0.0, 0.3)
                elif time.monotonic() >= deadline:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
    for line in rest.splitlines():
        if line.startswith(b"ACK "):
            acked = max(acked, int(line.split()[1]))
    return acked


def _kill_iterations(tmp_path, iterations: int) -> None:
    rng = random.Random(1234)
    path = tmp_path / "data"
    for i in range(iterations):
        acked = _run_and_kill(path, i, rng)
        store = Store.open(path)
        try:
            last = store.last_lsn()
            assert last >= acked, f"iteration {i}: acked {acked} but only {last} on disk"
            assert store.verify_log() == last
            assert store.check_projections() is None
        finally:
            store.close()


def test_kill_during_appends(tmp_path):
    """After SIGKILL at random moments, every acked event is present, gapless and chained."""
    _kill_iterations(tmp_path, 20)


@pytest.mark.long
def test_kill_during_appends_long(tmp_path):
    """The kill test with more iterations (soak)."""
    _kill_iterations(tmp_path, 100)
