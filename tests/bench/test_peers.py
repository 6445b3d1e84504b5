"""`homing bench --peer` as a user meets it (review of the bench as a product, 2026-12-06).

The JSON keys issue 6 fixes as a contract, under `peer.<name>` and `ratio.<name>`, from a tiny
real run against the NATS and Redis on their usual ports (each skipped when not there); a
peer's run leaves nothing in the temporary directory; an address where another kind of server
answers is said to be no such peer, and the run goes on without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from bench import cli, peers
from tests.bench.talker import Talker

HOMING = [sys.executable, "-m", "broker.cli", "bench"]
TINY = ["--procs", "1", "--senders", "2", "--receivers", "2", "--messages", "400",
        "--rates", "200", "--duration", "1", "--timeout", "60"]
# The keys scripts read (docs/BENCHMARKS.md, "Scenarios"): homing's, each peer's the same.
THROUGHPUT_KEYS = ("msgs_per_s", "sends_per_s")
LATENCY_KEYS = ("rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
PEERS = {"redis": "redis://127.0.0.1:6379", "nats": "nats://127.0.0.1:4222"}


def _usable(name: str) -> bool:
    """Whether the usual peer `name` is up, and a bench run may use it here: Redis before 7
    takes the fresh data directory the bench gives it, which would be this test's tmp_path."""
    if peers.unreachable(PEERS[name]):
        return False
    if name == "redis":
        import redis

        r = redis.Redis.from_url(PEERS[name])
        try:
            return int(r.info("server")["redis_version"].split(".")[0]) >= 7
        finally:
            r.close()
    return True


def test_each_peer_has_the_contract_keys_and_its_ratios_and_leaves_nothing(tmp_path):
    """Throughput and latency against each running peer: `peer.<name>` holds the keys homing's
    entry does, `ratio.<name>` homing / peer for each compared key, and the run leaves nothing
    in $TMPDIR (each run against Redis 7 left an empty `redis-bench-*` folder there: 126 of
    them in /tmp on the shared machine of 2026-12-06)."""
    up = [name for name in PEERS if _usable(name)]
    if not up:
        pytest.skip("neither NATS at 127.0.0.1:4222 nor Redis 7 at 127.0.0.1:6379 is running")
    tmp, out = tmp_path / "tmp", tmp_path / "b.json"
    tmp.mkdir()
    run = subprocess.run([*HOMING, "throughput", "latency", *TINY, "--json", str(out),
                          *(f"--peer={PEERS[name]}" for name in up)],
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    (lat,) = results["latency"]
    for entry, keys in ((results["throughput"], THROUGHPUT_KEYS), (lat, LATENCY_KEYS)):
        for name in up:
            for key in keys:
                assert entry["peer"][name][key] > 0, (name, key)
            for key in keys:
                if key != "rate":
                    ratio = entry["ratio"][name][key]
                    assert ratio == round(entry[key] / entry["peer"][name][key], 3), (name, key)
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_a_server_of_another_kind_is_no_peer():
    """Where an HTTP server (a proxy) answers, neither peer is reachable, and the reason says
    what answered; Redis' port, silent until spoken to, is no NATS."""
    with Talker(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n") as talker:
        for name in PEERS:
            problem = peers.unreachable(f"{name}://127.0.0.1:{talker.port}")
            assert problem == (f"a server answers there, but not as {name} does "
                               "(it said b'HTTP/1.1 400 Bad Request')"), problem


def test_a_nats_peer_at_a_silent_port_is_skipped_and_the_run_goes_on(tmp_path):
    """`--peer nats://` at a port where a server accepts but says nothing (Redis' own, mistyped):
    said not reachable, and homing's figures come out at once. nats-py retried it for minutes,
    printing a traceback each 2 s, before the peer failed."""
    with Talker(b"") as silent:
        url = f"nats://127.0.0.1:{silent.port}"
        run = subprocess.run([*HOMING, "throughput", *TINY, "--peer", url],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "| throughput" in run.stdout
    (line,) = [x for x in run.stdout.splitlines() if "not compared" in x]
    assert line == (f"peer nats ({url}) not compared: not reachable (a server answers there, "
                    "but not as nats does (it said nothing within 2 s))")


def test_a_peer_that_answers_as_its_kind_is_reachable():
    """The check lets the real peers through (each skipped where nothing listens on its port,
    or where its Python client, the `bench` extra, is not installed)."""
    listening = []
    for name, url in PEERS.items():
        if importlib.util.find_spec(name) is None:
            continue
        try:
            socket.create_connection(peers.address(url), 2).close()
            listening.append(name)
        except OSError:
            pass
    if not listening:
        pytest.skip("no peer with its client here listens on 127.0.0.1:4222 or 127.0.0.1:6379")
    status = cli._reach_peers([PEERS[name] for name in listening])
    assert all(status[name]["reachable"] for name in listening), status
