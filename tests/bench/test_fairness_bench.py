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
    committed = [int(n) for n in re.findall(r"answered (\d+)/s", out)]
    assert committed[0] == 0 and committed[1] > 0, out
    assert "other errors 0" in out


@pytest.mark.parametrize("request_", ["resend", "read-forbidden", "read-stale", "revoke", "history",
                                      "typing"])
def test_the_fairness_bench_floods_with_other_requests(request_):
    """`--request` floods with reads, revokes, history pages or typing instead of sends: the
    noisy requests sent are counted, and those the broker refuses (a read of a conversation
    the user is not in, a user token's revoke) are the other errors."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.fairness", "--seconds", "1", "--noisy-users", "1",
         "--noisy-conns", "1", "--pipeline", "16", "--request", request_],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    sent = [int(n) for n in re.findall(r"noisy requests sent (\d+)/s", run.stdout)]
    assert sent[0] == 0 and sent[1] > 0, run.stdout
    errors = [int(n) for n in re.findall(r"other errors (\d+)", run.stdout)]
    assert (errors[1] > 0) == (request_ in ("read-forbidden", "revoke")), run.stdout
