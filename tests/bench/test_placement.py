"""`homing bench --pin`: the split of the CPUs, and real processes placed on their halves; the
load processes' scheduling policy (`--load-sched`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from bench import placement
from bench.harness import BrokerProcess, Workers

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 usable CPUs")
needs_batch = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="needs SCHED_BATCH")


def report_affinity(spec: dict, pipe: Any) -> None:
    """A load-process target: say which CPUs this process, and a thread it starts, may use."""
    seen = {}
    t = threading.Thread(target=lambda: seen.update(thread=sorted(os.sched_getaffinity(0))))
    t.start()
    t.join()
    pipe.send(("ready", {"process": sorted(os.sched_getaffinity(0)), **seen}))
    pipe.recv()


def report_sched(spec: dict, pipe: Any) -> None:
    """A load-process target: say the scheduling policy of this process and of a thread it
    starts."""
    seen = {}
    t = threading.Thread(target=lambda: seen.update(thread=os.sched_getscheduler(0)))
    t.start()
    t.join()
    pipe.send(("ready", {"process": os.sched_getscheduler(0), **seen}))
    pipe.recv()


def test_the_server_gets_the_first_half_and_the_load_the_rest():
    assert placement.plan([0, 1]) == {"server": [0], "load": [1]}
    assert placement.plan([3, 1, 2, 0]) == {"server": [0, 1], "load": [2, 3]}
    assert placement.plan(range(5)) == {"server": [0, 1], "load": [2, 3, 4]}
    with pytest.raises(placement.PlacementError, match="at least 2 CPUs"):
        placement.plan([0])


@needs_two
def test_load_processes_and_their_threads_run_on_the_load_cpus():
    chosen = placement.plan(CPUS)
    with Workers([("tests.bench.test_placement.report_affinity", {})] * 2,
                 cpus=chosen["load"]) as workers:
        seen = workers.gather("ready", 60)
    assert seen == [{"process": chosen["load"], "thread": chosen["load"]}] * 2


@needs_batch
def test_load_processes_and_their_threads_run_under_the_policy_asked_for():
    for sched, policy in (("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)):
        with Workers([("tests.bench.test_placement.report_sched", {})] * 2,
                     sched=sched) as workers:
            seen = workers.gather("ready", 60)
        assert seen == [{"process": policy, "thread": policy}] * 2, sched
    with pytest.raises(placement.PlacementError, match="unknown scheduling policy"):
        placement.set_sched("fifo")


@needs_two
def test_the_broker_runs_on_the_server_cpus_with_all_its_threads():
    chosen = placement.plan(CPUS)
    with BrokerProcess(cpus=chosen["server"]) as broker:
        tids = os.listdir(f"/proc/{broker.pid}/task")
        assert {tuple(sorted(os.sched_getaffinity(int(t)))) for t in tids} == {
            tuple(chosen["server"])}


@needs_two
def test_a_running_process_is_pinned_for_the_block_and_then_put_back():
    child = subprocess.Popen([sys.executable, "-c",
                              "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(60,)).start()\n"
                              "time.sleep(60)"])
    try:
        tids: list[int] = []
        deadline = time.monotonic() + 30
        while len(tids) < 2 and time.monotonic() < deadline:  # wait for its second thread
            tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 2
        before = {t: os.sched_getaffinity(t) for t in tids}
        with placement.pinned(child.pid, CPUS[:1]):
            assert {t: os.sched_getaffinity(t) for t in tids} == {t: {CPUS[0]} for t in tids}
        assert {t: os.sched_getaffinity(t) for t in tids} == before
    finally:
        child.kill()
        child.wait()


def test_pinning_a_process_that_is_gone_is_a_placement_error():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(placement.PlacementError, match="cannot see the threads"):
        with placement.pinned(child.pid, CPUS[:1] or [0]):
            pass


@needs_two
def test_bench_pin_on_one_cpu_is_a_usage_error():
    run = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "latency", "--pin"],
        capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {CPUS[0]}))
    assert run.returncode == 2
    assert "--pin needs at least 2 CPUs; this process may use 1" in run.stderr


@needs_two
def test_bench_pin_records_the_placement_and_flags_nothing_at_a_light_load(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "latency", "--pin", "--procs", "1",
         "--senders", "2", "--receivers", "2", "--rates", "200", "--duration", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    chosen = placement.plan(CPUS)
    assert (f"pinned: server on CPUs {','.join(map(str, chosen['server']))}, "
            f"load on CPUs {','.join(map(str, chosen['load']))}") in run.stdout
    assert "CPU-bound" not in run.stdout
    assert "load processes: SCHED_BATCH (--load-sched)" in run.stdout  # the default
    doc = json.loads(out.read_text())
    assert doc["environment"]["settings"]["placement"] == chosen
    assert doc["environment"]["settings"]["load_sched"] == "batch"
    (lat,) = doc["results"]["latency"]
    assert lat["received"] == 200 and lat["cpu"]["load_bound"] is False


def test_a_load_side_at_its_limit_is_flagged_as_the_bottleneck():
    from bench.report import load_bound
    from bench.scenarios import _cpu_summary

    pinned = {"placement": {"server": [0], "load": [1]}}
    free = {"placement": None}
    # One process cannot use more than one core, whatever the others do.
    long_s = 10.0  # a phase long enough for its ticks
    assert _cpu_summary({"broker": 20.0, "load0": 91.0, "load1": 2.0}, free, long_s)["load_bound"]
    # Pinned: the load's own CPUs are full although no single process is.
    assert _cpu_summary({"broker": 20.0, "load0": 46.0, "load1": 45.0}, pinned,
                        long_s)["load_bound"]
    assert not _cpu_summary({"broker": 95.0, "load0": 40.0, "load1": 40.0}, pinned,
                            long_s)["load_bound"]
    # Not pinned: the whole machine is the capacity.
    cores = os.cpu_count() or 1
    busy = {"broker": 100.0 * cores * 0.5, "load0": 100.0 * cores * 0.45}
    assert _cpu_summary(busy, free, long_s)["load_bound"]
    assert not _cpu_summary({"broker": 10.0, "load0": 10.0}, free, long_s)["load_bound"]
    results = {"latency": [{"rate": 5000, "cpu": {"load_bound": False},
                            "peer": {"redis": {"cpu": {"load_bound": True}}}}],
               "connections": {"cpu": {}, "throughput": {"cpu": {"load_bound": True}}}}
    assert load_bound(results) == ["latency 5000/s vs redis", "connections+throughput"]


def test_a_run_beside_other_busy_processes_is_flagged_as_disturbed():
    """The rest of the machine (other processes, a hypervisor's steal) at DISTURBED_PCT of a
    core or more marks the run: in its entry, in the table and among the runs the closing line
    names."""
    from bench.repeat import merge
    from bench.report import disturbed, table
    from bench.scenarios import DISTURBED_PCT, _cpu_summary

    free = {"placement": None}
    quiet = _cpu_summary({"broker": 90.0, "load0": 40.0, "other": DISTURBED_PCT - 1.0}, free,
                         10.0)
    busy = _cpu_summary({"broker": 60.0, "load0": 30.0, "other": 94.5, "steal": 0.1}, free,
                        10.0)
    assert not quiet["disturbed"] and busy["disturbed"]
    # With --repeat, one disturbed round marks the merged entry, as load_bound does.
    merged = merge([{"msgs_per_s": 19_000, "cpu": quiet}, {"msgs_per_s": 14_000, "cpu": busy},
                    {"msgs_per_s": 18_000, "cpu": quiet}])
    assert merged["cpu"]["disturbed"] is True and merged["msgs_per_s"] == 18_000
    results = {"throughput": {**merged, "peer": {"redis": {"cpu": quiet}}},
               "latency": [{"rate": 1000, "cpu": quiet, "peer": {"nats": {"cpu": busy}}}]}
    assert disturbed(results) == ["throughput", "latency 1000/s vs nats"]
    text = table(results)
    assert re.search(r"\| 90 / 40 \(max 40\) / 29 +\| nats: 60 / 30 \(max 30\) / 94 \* ! +\|",
                     text)  # the busy machine starved the load too: both marks


def test_the_table_shows_each_peers_cpu_and_marks_a_load_bound_run():
    from bench.report import table

    def cpu(server, load, bound):
        return {"broker_pct": server, "load_pct_total": load, "load_pct_max_process": load / 4,
                "other_pct": 0.0, "load_bound": bound}

    text = table({"throughput": {
        "msgs_per_s": 40_000, "cpu": cpu(85.0, 39.0, False),
        "peer": {"redis": {"msgs_per_s": 49_000, "cpu": cpu(31.0, 164.0, True)}},
        "ratio": {"redis": {"msgs_per_s": 0.816}}}})
    assert "| 85 / 39 (max 10) / 0 " in text
    assert "redis: 31 / 164 (max 41) / 0 *" in text


def test_steal_is_shown_as_part_of_other_and_not_counted_twice():
    from bench.harness import machine_busy_seconds
    from bench.report import table
    from bench.scenarios import _cpu_summary

    busy, steal = machine_busy_seconds()
    assert 0 <= steal <= busy
    cores = os.cpu_count() or 1
    # Half the machine was other, all of it steal: counted once, so the load is not to blame.
    half = 100.0 * cores * 0.5
    cpu = _cpu_summary({"broker": 10.0, "load0": 10.0, "other": half, "steal": half},
                       {"placement": None}, 10.0)
    assert cpu["other_pct"] == cpu["steal_pct"] == round(half, 1)
    assert not cpu["load_bound"]
    text = table({"throughput": {"msgs_per_s": 1, "cpu": {**cpu, "other_pct": 30.0,
                                                          "steal_pct": 12.4}}})
    assert "| 10 / 10 (max 10) / 30 (steal 12) " in text
    # No steal (bare metal, or an entry written before steal_pct existed): nothing added.
    for quiet in ({**cpu, "steal_pct": 0.2}, {k: v for k, v in cpu.items() if k != "steal_pct"}):
        text = table({"throughput": {"msgs_per_s": 1, "cpu": {**quiet, "other_pct": 30.0}}})
        assert "| 10 / 10 (max 10) / 30 " in text and "steal" not in text
