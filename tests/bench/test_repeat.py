"""`homing bench --repeat N`: the medians of N runs, each run kept, each round's ratio."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

from bench.repeat import merge, spread, with_rounds
from bench.report import table


def _cpu(broker: float, bound: bool) -> dict:
    return {"broker_pct": broker, "load_pct_total": 40.0, "load_pct_max_process": 10.0,
            "load_pct": [10.0, 10.0, 10.0, 10.0], "other_pct": 1.0, "load_bound": bound}


def _throughput(msgs: int, redis: int, errors: dict, bound: bool = False) -> dict:
    return {"senders": 16, "msgs_per_s": msgs, "seconds": 200_000 / msgs, "errors": errors,
            "cpu": _cpu(80.0 + msgs / 10_000, bound),
            "peer": {"redis": {"msgs_per_s": redis, "cpu": _cpu(25.0, True)}},
            "ratio": {"redis": {"msgs_per_s": round(msgs / redis, 3)}}}


def _merged(runs: list) -> object:
    return with_rounds(merge(runs), runs)


def test_every_number_is_the_median_of_its_runs_and_each_run_is_kept():
    runs = [_throughput(30_000, 40_000, {}), _throughput(24_000, 20_000, {"timeout": 1}, True),
            _throughput(33_000, 30_000, {"timeout": 2})]
    entry = _merged(runs)
    assert entry["msgs_per_s"] == 30_000 and isinstance(entry["msgs_per_s"], int)
    assert entry["seconds"] == round(statistics.median(r["seconds"] for r in runs), 3)
    assert entry["senders"] == 16
    assert entry["cpu"]["broker_pct"] == 83.0 and entry["cpu"]["load_pct"] == [10.0] * 4
    assert entry["cpu"]["load_bound"] is True  # it was in one of the runs
    assert entry["errors"] == {"timeout": 3}  # counts are summed, not medians
    assert entry["peer"]["redis"]["msgs_per_s"] == 30_000
    # The ratio is the median of each round's own (0.75, 1.2, 1.1), not 30,000 / 30,000.
    assert entry["ratio"]["redis"]["msgs_per_s"] == 1.1
    assert [r["msgs_per_s"] for r in entry["rounds"]] == [30_000, 24_000, 33_000]
    assert [r["ratio"]["redis"]["msgs_per_s"] for r in entry["rounds"]] == [0.75, 1.2, 1.1]
    assert all("peer" not in r and "rounds" not in r for r in entry["rounds"])
    assert [r["msgs_per_s"] for r in entry["peer"]["redis"]["rounds"]] == [40_000, 20_000, 30_000]
    assert spread(entry, "msgs_per_s") == (24_000, 33_000)
    assert spread(entry["peer"]["redis"], "msgs_per_s") == (20_000, 40_000)


def test_an_even_number_of_runs_gives_the_middle_of_the_two_in_the_middle():
    entry = _merged([{"p99_ms": 4.0, "acks": 10}, {"p99_ms": 5.5, "acks": 13}])
    assert entry["p99_ms"] == 4.75 and entry["acks"] == 12  # an int stays an int


def test_entries_per_rate_merge_rate_by_rate_and_a_run_on_top_keeps_its_own_runs():
    latency = _merged([[{"rate": 1000, "p99_ms": 3.0}, {"rate": 5000, "p99_ms": 14.0}],
                       [{"rate": 1000, "p99_ms": 2.0}, {"rate": 5000, "p99_ms": 12.0}],
                       [{"rate": 1000, "p99_ms": 9.0}, {"rate": 5000, "p99_ms": 30.0}]])
    assert [(e["rate"], e["p99_ms"]) for e in latency] == [(1000, 3.0), (5000, 14.0)]
    assert [r["p99_ms"] for r in latency[1]["rounds"]] == [14.0, 12.0, 30.0]
    connections = _merged([{"rss_mib": 240, "throughput": {"msgs_per_s": 29_000}},
                           {"rss_mib": 250, "throughput": {"msgs_per_s": 31_000}},
                           {"rss_mib": 239, "throughput": {"msgs_per_s": 25_000}}])
    assert connections["rss_mib"] == 240 and connections["throughput"]["msgs_per_s"] == 29_000
    assert connections["rounds"] == [{"rss_mib": 240}, {"rss_mib": 250}, {"rss_mib": 239}]
    assert [r["msgs_per_s"] for r in connections["throughput"]["rounds"]] == [29_000, 31_000,
                                                                            25_000]


def test_one_run_is_reported_as_it_was():
    run = _throughput(30_000, 40_000, {})
    assert _merged([run]) is run and spread(run, "msgs_per_s") is None


def test_the_table_shows_the_median_and_the_range_of_the_runs():
    entry = _merged([_throughput(30_000, 40_000, {}), _throughput(24_000, 20_000, {}),
                     _throughput(33_000, 44_000, {})])
    text = table({"throughput": entry})
    assert "| 30,000 (24,000-33,000) |" in text
    assert "redis: 40,000 (20,000-44,000)" in text
    assert "| 0.750 " in text


def test_repeat_must_be_at_least_one():
    run = subprocess.run([sys.executable, "-m", "broker.cli", "bench", "throughput",
                          "--repeat", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--repeat: expected a whole number of at least 1, got '0'" in run.stderr


def test_a_repeated_run_reports_the_medians_of_real_runs(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "throughput", "--repeat", "3",
         "--procs", "2", "--senders", "2", "--receivers", "2", "--messages", "1000",
         "--timeout", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stderr.splitlines() if line.startswith("== throughput")] == [
        "== throughput, run 1 of 3", "== throughput, run 2 of 3", "== throughput, run 3 of 3"]
    assert "each figure: the median of 3 runs" in run.stdout
    doc = json.loads(out.read_text())
    entry = doc["results"]["throughput"]
    runs = [r["msgs_per_s"] for r in entry["rounds"]]
    assert len(runs) == 3 and all(r["received"] == 1000 for r in entry["rounds"])
    assert entry["msgs_per_s"] == statistics.median(runs)
    cell = f"{entry['msgs_per_s']:,} ({min(runs):,}-{max(runs):,})"
    assert re.search(rf"\| {re.escape(cell)} +\|", run.stdout), run.stdout
    assert doc["environment"]["settings"]["repeat"] == 3


def test_a_repeat_that_kept_one_run_keeps_it_under_rounds_as_every_repeat_entry():
    """--repeat N whose run 2 failed keeps run 1 (`bench.cli._measure`): its entry, a latency
    list's, a peer's and the throughput on top of connections hold it under `rounds` as any
    --repeat entry does (they had none: a reader of `rounds` met a KeyError), and the JSON of
    it is written (the one run its own round would be a cycle)."""
    import copy

    runs = [{"conns": 100, "throughput": _throughput(30_000, 40_000, {})}]
    entry = with_rounds(copy.deepcopy(runs[0]), runs, repeated=True)
    assert [r["conns"] for r in entry["rounds"]] == [100]
    assert [r["msgs_per_s"] for r in entry["throughput"]["rounds"]] == [30_000]
    assert [r["msgs_per_s"] for r in entry["throughput"]["peer"]["redis"]["rounds"]] == [40_000]
    assert spread(entry["throughput"], "msgs_per_s") is None
    latency = [[{"rate": 1000, "p99_ms": 3.0}, {"rate": 5000, "p99_ms": 14.0}]]
    merged = with_rounds(copy.deepcopy(latency[0]), latency, repeated=True)
    assert [[r["p99_ms"] for r in e["rounds"]] for e in merged] == [[3.0], [14.0]]
    json.dumps([entry, merged])
    assert "rounds" not in with_rounds(copy.deepcopy(runs[0]), runs)  # --repeat 1: as ever
