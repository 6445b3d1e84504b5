"""Smoke test of `python -m bench.fairness` at a tiny size, so the script cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("target", ["one", "many", "channel"])
def test_the_fairness_bench_runs_and_prints_its_figures(target):
    """Each target floods a real broker for a second and the quiet client's five figures,
    the broker's CPU and the noisy sends committed are printed for both phases."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.fairness", "--seconds", "1", "--noisy-users", "2",
         "--noisy-conns", "1", "--pipeline", "16", "--many", "3", "--target", target],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for phase in ("idle", "flood"):
        assert re.search(rf"^{phase} +result p50 +[0-9.]+ p99 +[0-9.]+ ms \(n=[1-9]", out,
                         re.M), out
    for key in ("deliver", "history", "convs", "hello"):
        assert len(re.findall(rf"{key} p50 +[0-9.]+ p99 +[0-9.]+ ms \(n=[1-9]", out)) == 2, out
    committed = [int(n) for n in re.findall(r"noisy sends committed (\d+)/s", out)]
    assert committed[0] == 0 and committed[1] > 0, out
    assert "other errors 0" in out
