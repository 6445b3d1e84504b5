"""tests/procs.py's `free_port`, with real sockets: where the ports it picks come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import free_port


def _first_ephemeral() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.parametrize("worker", ["gw2", "gw3", "gw4", "gw9"])
def test_a_restarted_xdist_worker_picks_below_the_ephemeral_range(monkeypatch, worker):
    """pytest-xdist replaces a crashed worker with one of the next id (gw2 of two workers,
    then gw3, ...: xdist's `_clone_node`): its slice began at 10000 + id x width, in the
    ephemeral range (gw2 of two: 32768 on, where every outgoing connection takes its port),
    then past 65535 (gw4: bind raised OverflowError, not the OSError it skips). Its slice is
    now its id modulo the worker count: the crashed worker's, which no one else uses."""
    first = _first_ephemeral()
    if (first - 10000) // 2 < 1000:
        pytest.skip(f"no room below the ephemeral range ({first})")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    width = (first - 10000) // 2
    start = 10000 + int(worker.removeprefix("gw")) % 2 * width
    for _ in range(20):
        assert start <= free_port() < start + width
