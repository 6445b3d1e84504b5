"""The end-to-end scenarios: each drives a `homing serve` process with load processes.

Every scenario function takes the running `BrokerProcess` and its options, and returns a dict of
figures (the JSON keys scripts read are documented in docs/BENCHMARKS.md) plus `cpu`, the CPU%
of the broker and of each load process during the measured phase (100 = one core), which is how
we know whether the clients or the broker were the bottleneck.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import tempfile
import time
from fractions import Fraction
from typing import Any

import trio

import protocol as wire
from bench.harness import BrokerProcess, WorkerError, Workers, run_phase, say
from bench.histogram import Histogram
from bench.loadgen import Link
from bench.placement import load_cpus, load_sched

BODY_BYTES = 200
_tags = itertools.count(1)


def _tag(name: str) -> str:
    """A fresh user-name prefix, so scenarios sharing one broker never share users."""
    return f"{name}{next(_tags)}x{int(time.time()) % 100000}"


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def nearest_rank(values: list[float], p: float) -> float:
    """The value at or below which `p` percent of the sorted `values` lie: the ceil(n p / 100)-th,
    the nearest rank, as `Histogram.percentile` takes it (p99 of 100 values is the 99th)."""
    return values[max(1, math.ceil(len(values) * Fraction(str(p)) / 100)) - 1]


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def client_jobs(broker: BrokerProcess, *, senders: int, receivers: int, messages: int,
                procs: int, rate: float | None = None, sink: str | None = None,
                tag: str) -> list[dict]:
    """Per-process sender and receiver jobs: sender i posts to receiver i % R (or to `sink`)."""
    counts = _split(messages, senders)
    jobs = [{"senders": [], "receivers": []} for _ in range(procs)]
    expected = [0] * receivers
    for i, count in enumerate(counts):
        to = sink or f"{tag}r{i % receivers}"
        if not sink:
            expected[i % receivers] += count
        user = f"{tag}s{i}"
        jobs[i % procs]["senders"].append({
            "token": broker.token(user), "to": to, "count": count, "cid_prefix": f"{tag}-",
            "rate": rate / senders if rate else None,
            # Open loop: sender i runs i/rate s behind sender 0, so the senders' schedules
            # interleave into one evenly spaced stream at `rate` (not S sends at once).
            "phase_ns": int(i * 1e9 / rate) if rate else 0})
    if not sink:
        for j in range(receivers):
            user = f"{tag}r{j}"
            jobs[j % procs]["receivers"].append({"token": broker.token(user),
                                                 "expected": expected[j]})
    return jobs


def _spec(broker: BrokerProcess, job: dict, opts: dict, **extra: Any) -> dict:
    # opts["connect"]: the address the load's senders and receivers connect to instead of the
    # broker's, e.g. a delay proxy in front of it (tests/bench/test_honest.py); not a CLI flag.
    return {"server": opts.get("connect") or broker.server, "pipeline": opts["pipeline"],
            "body_bytes": BODY_BYTES, "stamped": False, **job, **extra}


def _merge(results: list[dict]) -> dict:
    """Sum and min/max the per-process figures of `bench.loadgen.clients`."""
    latency, ack_latency = Histogram(), Histogram()
    errors: dict[str, int] = {}
    for r in results:
        latency.merge(Histogram.from_dict(r["latency"]))
        ack_latency.merge(Histogram.from_dict(r["ack_latency"]))
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
    nonzero = [r["first_send"] for r in results if r["first_send"]]
    return {
        "sent": sum(r["sent"] for r in results), "received": sum(r["received"] for r in results),
        "acks": sum(r["acks"] for r in results), "errors": errors,
        "ack_rejected": sum(r.get("ack_rejected", 0) for r in results),
        "first_send": min(nonzero, default=0),
        "last_result": max(r["last_result"] for r in results),
        "first_delivery": min((r["first_delivery"] for r in results if r["first_delivery"]),
                              default=0),
        "last_delivery": max(r["last_delivery"] for r in results),
        "connect": min(r["connect"] for r in results),
        "latency": latency, "ack_latency": ack_latency,
    }


LOAD_BOUND_PCT = 90  # a load process (or the load's cores) this busy held the run back
# The rest of the machine (other processes, the hypervisor's steal) this busy: the run's figures
# are not the server's and the load's alone. Above what the bench itself adds there (its own
# process, the connections scenario's idle holders: up to about 17 % on the 2-core VMs).
DISTURBED_PCT = 30
# A phase shorter than this has no CPU% worth reading: /proc counts CPU time in clock ticks
# (10 ms at USER_HZ 100), and each process is read once before and once after, so its CPU
# seconds can be off by a tick at each end. Over 0.5 s (50 ticks) that is at most 4 % of a
# core, well inside the 10 points between LOAD_BOUND_PCT and a full core; over a 20 ms phase it
# is 100 %, and a single message's catchup read 271 % for one load process and was flagged.
MIN_PHASE_S = 0.5


def _cpu_summary(cpu: dict[str, float], opts: dict, wall: float) -> dict[str, Any]:
    """CPU% of the server, each load process and the rest (of which steal, on a VM); `load_bound`
    when the load side was
    busy enough to be the bottleneck: one load process at LOAD_BOUND_PCT of a core, or its CPUs
    (the load's half with --pin, else the whole machine) at LOAD_BOUND_PCT of their capacity;
    `disturbed` when the rest of the machine took DISTURBED_PCT of a core or more. A phase of
    `wall` seconds under MIN_PHASE_S is `too_short`: its figures are kept as measured, but it
    is neither flagged nor shown in the table, for its ticks cannot tell."""
    load = [v for k, v in cpu.items() if k.startswith("load")]
    pinned = load_cpus(opts)
    if pinned is not None:
        busy, capacity = sum(load), 100 * len(pinned)
    else:
        busy = sum(v for k, v in cpu.items() if k != "steal")  # steal is part of other
        capacity = 100 * (os.cpu_count() or 1)
    too_short = wall < MIN_PHASE_S
    bound = not too_short and (max(load, default=0.0) >= LOAD_BOUND_PCT
                               or busy >= capacity * LOAD_BOUND_PCT / 100)
    return {"broker_pct": round(cpu.get("broker", 0.0), 1),
            "load_pct_total": round(sum(load), 1),
            "load_pct_max_process": round(max(load, default=0.0), 1),
            "load_pct": [round(v, 1) for v in load],
            "other_pct": round(cpu.get("other", 0.0), 1),
            "steal_pct": round(cpu.get("steal", 0.0), 1),
            "load_bound": bound,
            "disturbed": not too_short and cpu.get("other", 0.0) >= DISTURBED_PCT,
            "phase_s": round(wall, 3), "too_short": too_short}


FELL_BEHIND_PCT = 90
"""A latency run whose deliveries came at less than this percentage of the rate asked fell
behind: the broker or the load did not keep up, a queue grew all run, and the latencies measure
that queue rather than the broker at that rate."""


def achieved_per_s(received: int, first_delivery: int, last_delivery: int) -> int:
    """The rate at which `received` deliveries came, from the first to the last (monotonic ns).

    Not from the first send: that span also holds the latency, so a run that kept up at the rate
    asked behind a constant 400 ms (a delay proxy, tests/bench/test_honest.py) achieved 250 of
    300/s, and was said to have fallen behind, until 2026-12-05."""
    span = (last_delivery - first_delivery) / 1e9
    return round((received - 1) / span) if received > 1 and span > 0 else 0


def fell_behind(achieved_per_s: float, rate: float) -> bool:
    """Whether a latency run at `rate` that delivered `achieved_per_s` fell behind its rate."""
    return achieved_per_s < rate * FELL_BEHIND_PCT / 100


def run_clients(broker: BrokerProcess, jobs: list[dict], opts: dict, *, label: str,
                timeout: float, progress: Any, go: Any = None, **extra: Any) -> tuple[dict, dict]:
    """Start one load process per job, run one phase, return (merged figures, cpu)."""
    specs = [("bench.loadgen.clients", _spec(broker, job, opts, **extra)) for job in jobs]
    with Workers(specs, progress, load_cpus(opts), load_sched(opts)) as workers:
        workers.gather("ready", 120, f"{label}: connecting")
        go_payload = go() if callable(go) else go
        results, cpu, wall = run_phase(workers, timeout=timeout, pids={"broker": broker.pid},
                                       label=label, go=go_payload)
    return _merge(results), _cpu_summary(cpu, opts, wall)


# -- scenarios ---------------------------------------------------------------------------------

def throughput(broker: BrokerProcess, opts: dict, progress: Any = None) -> dict:
    """S senders -> R receivers in direct conversations; each send durable, each delivery acked."""
    s, r, n = opts["senders"], opts["receivers"], opts["messages"]
    jobs = client_jobs(broker, senders=s, receivers=r, messages=n, procs=opts["procs"],
                       tag=_tag("t"))
    m, cpu = run_clients(broker, jobs, opts, label="throughput", timeout=opts["timeout"],
                         progress=progress)
    end_to_end = (m["last_delivery"] - m["first_send"]) / 1e9
    accepted = (m["last_result"] - m["first_send"]) / 1e9
    ok = m["sent"] - sum(m["errors"].values())
    return {
        "senders": s, "receivers": r, "messages": n, "received": m["received"],
        "msgs_per_s": round(m["received"] / end_to_end), "sends_per_s": round(ok / accepted),
        "seconds": round(end_to_end, 3), "acks": m["acks"], "errors": m["errors"],
        "ack_rejected": m["ack_rejected"], "cpu": cpu,
    }


def latency(broker: BrokerProcess, opts: dict, rate: float, progress: Any = None, *,
            histogram: bool = False) -> dict:
    """Open loop at `rate` msg/s for `duration` s; send -> delivery from the scheduled send time.
    With `histogram`, the entry also holds the delivery latencies' `Histogram` (us) itself, for
    the tests that check the method against known delays (not in the JSON)."""
    s, r, duration = opts["senders"], opts["receivers"], opts["duration"]
    warmup = min(1.0, duration / 5)
    n = int(rate * duration)
    jobs = client_jobs(broker, senders=s, receivers=r, messages=n, procs=opts["procs"],
                       rate=rate, tag=_tag("l"))

    def go() -> dict:
        return {"t0_ns": time.monotonic_ns() + 300_000_000, "warmup_ns": int(warmup * 1e9)}

    m, cpu = run_clients(broker, jobs, opts, label=f"latency {rate:g}/s", go=go,
                         timeout=duration * 4 + 60, progress=progress, stamped=True)
    h, a = m["latency"], m["ack_latency"]
    achieved = achieved_per_s(m["received"], m["first_delivery"], m["last_delivery"])
    return ({"histogram": h} if histogram else {}) | {
        "rate": rate, "duration_s": duration, "warmup_s": warmup, "messages": n,
        "received": m["received"], "achieved_per_s": achieved,
        "fell_behind": fell_behind(achieved, rate),
        "samples": h.count,
        "p50_ms": _ms(h.percentile(50)), "p90_ms": _ms(h.percentile(90)),
        "p99_ms": _ms(h.percentile(99)), "p999_ms": _ms(h.percentile(99.9)),
        "max_ms": _ms(h.max),
        "durable_ack_p50_ms": _ms(a.percentile(50)), "durable_ack_p99_ms": _ms(a.percentile(99)),
        "durable_ack_samples": a.count, "acks": m["acks"], "errors": m["errors"],
        "ack_rejected": m["ack_rejected"], "cpu": cpu,
    }


async def _create_channel(server: str, token: str) -> str:
    link = await Link.open(server, token, "setup")
    try:
        reply = await link.request(wire.Create(id=1, kind="channel", name="bench", open=True))
        return reply.conv
    finally:
        await link.aclose()


def fanout(broker: BrokerProcess, opts: dict, k: int, progress: Any = None) -> dict:
    """One post to a channel of `k` connected subscribers, repeated; time to the last delivery."""
    tag, posts = _tag("f"), opts["posts"]
    owner = broker.token(f"{tag}owner")
    conv = trio.run(_create_channel, broker.server, owner)
    procs = max(1, min(opts["procs"], k))
    subs = [(f"{tag}u{i}", broker.token(f"{tag}u{i}")) for i in range(k)]
    interval = max(opts["interval"], k / 1000)  # let one post's fan-out finish first
    specs = [("bench.loadgen.subscribers",
              {"server": broker.server, "conv": conv, "posts": posts, "subs": subs[p::procs]})
             for p in range(procs)]
    specs.append(("bench.loadgen.poster", {"server": broker.server, "token": owner, "conv": conv,
                                           "posts": posts, "interval_s": interval,
                                           "body_bytes": BODY_BYTES}))
    with Workers(specs, progress, load_cpus(opts), load_sched(opts)) as workers:
        workers.gather("ready", 300, f"fanout {k}: subscribing")
        results, cpu, wall = run_phase(workers, timeout=posts * interval * 4 + 60,
                                       pids={"broker": broker.pid}, label=f"fanout {k}")
    last: dict[int, int] = {}
    for res in results[:-1]:
        for seq, ns in res["last_ns"].items():
            last[seq] = max(last.get(seq, 0), ns)
    times = sorted(ns / 1e6 for ns in last.values())
    p50 = statistics.median(times)
    p99 = nearest_rank(times, 99)
    return {
        "subscribers": k, "posts": posts, "interval_s": interval,
        "deliveries": sum(res["deliveries"] for res in results[:-1]),
        "last_delivery_ms": round(p50, 3), "last_delivery_p99_ms": round(p99, 3),
        "last_delivery_max_ms": round(times[-1], 3),
        "deliveries_per_s": round(k / (p50 / 1000)) if p50 else 0,
        "cpu": _cpu_summary(cpu, opts, wall),
    }


def connections(broker: BrokerProcess, opts: dict, progress: Any = None) -> dict:
    """C idle authenticated connections: broker RSS, then a throughput run on top of them."""
    c, procs = opts["connections"], max(1, opts["idle_procs"])
    tag = _tag("c")
    base = broker.rss_mib()
    conns = [(broker.token(f"{tag}u{i}"), "idle") for i in range(c)]
    specs = [("bench.loadgen.idle", {"server": broker.server, "conns": conns[p::procs],
                                     "ping_s": 10})
             for p in range(procs)]
    started = time.monotonic()
    with Workers(specs, progress, load_cpus(opts), load_sched(opts)) as workers:
        ready = workers.gather("ready", 600, f"connections: opening {c}")
        connect_s = time.monotonic() - started
        time.sleep(1.0)
        rss = broker.rss_mib()
        connected = sum(x["connected"] for x in ready)
        failures: dict[str, int] = {}
        for x in ready:
            for name, n in x["failures"].items():
                failures[name] = failures.get(name, 0) + n
        _check_held(workers, ready, "during the idle hold")
        on_top = None
        if opts.get("connections_throughput"):
            on_top = throughput(broker, opts, progress)
            rss_after = broker.rss_mib()
            _check_held(workers, ready, "during the throughput run on top of them")
    out = {
        "connections": connected, "requested": c, "failures": failures,
        "rss_mib": round(rss, 1), "rss_base_mib": round(base, 1),
        "rss_per_connection_kib": round((rss - base) * 1024 / max(1, connected), 2),
        "connect_s": round(connect_s, 2), "nofile_per_process": ready[0]["nofile"],
    }
    if on_top is not None:
        out["throughput"] = on_top
        out["rss_after_throughput_mib"] = round(rss_after, 1)
    return out


def _check_held(workers: Workers, ready: list[dict], when: str) -> None:
    """Raise WorkerError unless every process holding the idle connections is alive and still
    holds every connection it opened: the figures of the phase just measured (`when`) would be
    for fewer connections than the scenario reports. A holder that died went unnoticed."""
    connected = sum(x["connected"] for x in ready)
    dead = workers.dead()
    if not dead:
        try:
            held = workers.ask(("count", None), "held", 30, "connections: counting")
        except WorkerError:
            dead = workers.dead()
            if not dead:
                raise
    if dead:
        raise WorkerError("; ".join(
            f"load process {i}, holding {ready[i]['connected']:,} of the {connected:,} idle "
            f"connections, died ({how}) {when}" for i, how in dead.items())
            + ": the figures would be for connections no longer held")
    closed = connected - sum(x["held"] for x in held)
    if closed:
        raise WorkerError(f"{closed:,} of the {connected:,} idle connections closed {when}: "
                          "the figures would be for connections no longer held")


def catchup(broker: BrokerProcess, opts: dict, progress: Any = None) -> dict:
    """A device offline while `catchup_messages` arrive, then connecting: its drain rate."""
    n, tag = opts["catchup_messages"], _tag("k")
    sink = f"{tag}sink"
    jobs = client_jobs(broker, senders=opts["senders"], receivers=0, messages=n,
                       procs=opts["procs"], sink=sink, tag=tag)
    fill, fill_cpu = run_clients(broker, jobs, opts, label="catchup: filling",
                                 timeout=opts["timeout"], progress=progress)
    fill_s = (fill["last_result"] - fill["first_send"]) / 1e9
    drain_job = {"senders": [], "receivers": [{"token": broker.token(sink), "expected": n}]}
    m, cpu = run_clients(broker, [drain_job], opts, label="catchup: draining",
                         timeout=opts["timeout"], progress=progress, receivers_connect_on_go=True)
    drain_s = (m["last_delivery"] - m["connect"]) / 1e9
    return {
        "messages": n, "fill_sends_per_s": round(n / fill_s) if fill_s else 0,
        "received": m["received"], "drain_s": round(drain_s, 3),
        "events_per_s": round(m["received"] / drain_s) if drain_s else 0,
        "acks": m["acks"], "ack_rejected": m["ack_rejected"], "cpu": cpu, "fill_cpu": fill_cpu,
    }


def replay(opts: dict, progress: Any = None) -> dict:
    """Rebuild-check rate over a log of `replay_events` message events (no broker).

    Reuses bench/bench_replay.py (the `homing audit rebuild --check` code path on a cached log)
    when it is there; otherwise times `Store.rebuild` on a freshly written log.
    """
    import logging

    import structlog

    # The storage layer logs its lifecycle (opened, closed) at info: not for this table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    n = opts["replay_events"]
    if progress is not None:
        progress("replay: preparing the log", 0.0, 0, 1)
    try:
        from bench import bench_replay
    except ImportError:
        return _replay_rebuild(n)
    # On stderr: stdout holds the results table only.
    path = bench_replay.ensure_log(n, say=lambda text: say(f"replay: {text}"))
    # The first run reads the files into the page cache; the figure is the median of the runs
    # after it, as bench/bench_replay.py reports (the first is kept as `first_run_events_per_s`).
    runs = [bench_replay.check_once(path) for _ in range(1 + bench_replay.RUNS)]
    wall = statistics.median(r[0] for r in runs[1:])
    cpu = statistics.median(r[1] for r in runs[1:])
    events = runs[0][2]
    return {"events": events, "seconds": round(wall, 3), "cpu_s": round(cpu, 3),
            "events_per_s": round(events / wall), "events_per_cpu_s": round(events / cpu),
            "first_run_events_per_s": round(events / runs[0][0]), "runs": bench_replay.RUNS,
            "method": "storage.audit.check_projections (homing audit rebuild --check)"}


def _replay_rebuild(n: int) -> dict:
    from storage.commands import SendMessage
    from storage.store import Store

    users = [f"u{i:02d}" for i in range(16)]
    with tempfile.TemporaryDirectory(prefix="homing-replay-") as d:
        store = Store.open(d)
        try:
            for base in range(0, n, 5000):
                store.execute([SendMessage(users[i % 16], "d", "user", f"c{i}", "x" * BODY_BYTES,
                                           to=users[(i % 16) ^ 1])
                               for i in range(base, min(base + 5000, n))])
            started = time.perf_counter()
            replayed = store.rebuild()
            seconds = time.perf_counter() - started
        finally:
            store.close()
    return {"events": replayed, "seconds": round(seconds, 3),
            "events_per_s": round(replayed / seconds), "method": "Store.rebuild"}
