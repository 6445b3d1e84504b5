"""bench.bench_members at a tiny size: every figure comes out, and the script still runs."""

from __future__ import annotations

import subprocess
import sys

from bench.bench_members import one_run


def test_every_figure_comes_out_positive():
    """A group of 60: each figure is measured (the run checks the broker's roster against the
    store's member list at its end)."""
    figures = one_run(members=60, invites=5)
    assert set(figures) == {
        "mute_wall", "mute_cpu", "invite_wall", "invite_cpu", "batch_wall", "batch_cpu",
        "post_after_post", "post_after_post_cpu", "post_after_join", "post_after_join_cpu",
        "roster_cached", "roster_after_join", "demote_cpu", "leave_cpu"}
    assert all(value >= 0 for value in figures.values()), figures
    assert figures["batch_wall"] > 0 and figures["invite_wall"] > 0


def test_the_script_prints_its_lines():
    run = subprocess.run([sys.executable, "-m", "bench.bench_members", "--members", "40",
                          "--runs", "1", "--invites", "3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "group of 40 members, 1 runs" in run.stdout
    assert "100 invites in one commit" in run.stdout
    assert "admin made a member" in run.stdout and "admin leaving" in run.stdout
