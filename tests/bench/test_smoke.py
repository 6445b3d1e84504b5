"""Smoke test of `homing bench`: every scenario at a tiny size, so the suite cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

TINY = [
    "--procs", "2", "--senders", "4", "--receivers", "4", "--messages", "2000",
    "--rates", "500", "--duration", "1", "--subscribers", "5", "--posts", "3",
    "--interval", "0.05", "--connections", "50", "--idle-procs", "1",
    "--catchup-messages", "1000", "--replay-events", "2000", "--timeout", "60",
]


def _positive(entry: dict, *keys: str) -> None:
    for key in keys:
        assert key in entry, key
        assert entry[key] > 0, (key, entry[key])


def test_every_scenario_runs_and_reports_its_keys(tmp_path):
    """`homing bench all` at tiny sizes prints a table and writes every documented JSON key."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "all", *TINY, "--json", str(out),
         "--peer", "redis://127.0.0.1:1"],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| throughput" in run.stdout
    assert "not reachable" in run.stderr
    doc = json.loads(out.read_text())
    results = doc["results"]
    _positive(results["throughput"], "msgs_per_s", "sends_per_s")
    assert results["throughput"]["received"] == 2000
    (lat,) = results["latency"]
    _positive(lat, "rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
    assert lat["received"] == lat["messages"] == 500 and lat["errors"] == {}
    (fan,) = results["fanout"]
    _positive(fan, "subscribers", "last_delivery_ms")
    _positive(results["connections"], "connections", "rss_mib")
    assert results["connections"]["connections"] == 50
    _positive(results["catchup"], "events_per_s")
    _positive(results["replay"], "events_per_s")
    env = doc["environment"]
    assert env["cores"] and env["python"] and env["cpu_model"]
    _positive(env["disk"], "pages", "one_page_ms", "scattered_ms", "contiguous_ms")
    assert "scattered pages" in run.stdout
    assert doc["peers"]["redis"]["reachable"] is False
