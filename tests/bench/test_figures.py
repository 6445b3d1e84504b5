"""The figures mean what docs/BENCHMARKS.md says they mean (review of the bench, 2026-12-04)."""

from __future__ import annotations

import select
import socket
import statistics
import time

import protocol as wire
from bench import peers, scenarios
from bench.harness import BrokerProcess
from bench.loadgen import SenderStats, read_ready, tally_results


def _result(i: int) -> wire.Result:
    return wire.Result(id=i, conv="dm:a:b", seq=i, lsn=i, cid=f"c{i}", dup=False)


def test_a_durable_ack_of_a_warm_up_send_is_not_recorded():
    """The warm-up is not recorded (docs/BENCHMARKS.md, `latency`): not for the deliveries and
    not for the durable acks either. Both sends are answered; only the one scheduled at or after
    the cutoff has its send -> result latency recorded."""
    stats = SenderStats()
    sched = {1: 1_000_000, 2: 5_000_000}
    tally_results(stats, [_result(1), _result(2)], 9_000_000, sched, cutoff=5_000_000)
    assert stats.answered == 2 and sched == {}
    assert stats.ack_latency.count == 1 and stats.ack_latency.max == 4_000  # us

    peer = peers._Stats()
    peer.acked(1_000_000, 9_000_000, 5_000_000)
    peer.acked(5_000_000, 9_000_000, 5_000_000)
    assert peer.ack_latency.count == 1 and peer.ack_latency.max == 4_000


def test_the_latency_run_records_durable_acks_only_after_the_warm_up():
    """End to end, a real broker: the durable acks recorded are those of the sends whose
    deliveries are recorded, the ones scheduled after the warm-up, not every send."""
    opts = {"senders": 2, "receivers": 2, "procs": 1, "pipeline": 64, "duration": 1.0,
            "placement": None, "load_sched": "normal"}
    with BrokerProcess() as broker:
        entry = scenarios.latency(broker, opts, 100)
    assert entry["received"] == entry["messages"] == 100
    assert 0 < entry["samples"] < entry["messages"]  # the first fifth is warm-up
    assert entry["durable_ack_samples"] == entry["samples"]


def test_the_open_loop_waits_to_the_microsecond_not_to_the_next_millisecond():
    """`read_ready` with a timeout below a millisecond returns when it ran out. epoll_wait counts
    whole milliseconds and Python rounds a wait up, so a send due in 0.2 ms left 1 ms later: a
    send was late by 0.6 ms at the median (against 0.14 ms for the peers' clients on uvloop),
    and the open loop charges a late send to the server's latency."""
    ours, peer = socket.socketpair()
    ep = select.epoll()
    ep.register(ours.fileno(), select.EPOLLIN)
    try:
        waits = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert read_ready(ep, 0.0002) == []
            waits.append(time.perf_counter() - t0)
        peer.send(b"x")  # and something ready is read at once, not when the wait runs out
        t0 = time.perf_counter()
        (got,) = read_ready(ep, 30)
        assert got[0] == ours.fileno() and got[2] == b"x" and time.perf_counter() - t0 < 15
    finally:
        ep.close()
        ours.close()
        peer.close()
    assert 0.00019 <= min(waits) < 0.0009, waits  # the least is what the timer gives
    assert statistics.median(waits) >= 0.00019


def test_the_fanout_p99_is_the_nearest_rank_not_the_one_above_it():
    """`last_delivery_p99_ms` over 100 posts is the 99th slowest, not the slowest: it took
    index int(n * 0.99), one rank above the nearest rank whenever n * 0.99 is whole (100, 200
    posts), while the latency histograms take ceil(n * p / 100) (bench/histogram.py)."""
    times = [float(v) for v in range(1, 101)]
    assert scenarios.nearest_rank(times, 99) == 99.0
    assert scenarios.nearest_rank(times[:20], 99) == 20.0  # the default 20 posts: the slowest
    assert scenarios.nearest_rank([float(v) for v in range(1, 201)], 99) == 198.0
    assert scenarios.nearest_rank([7.0], 99) == 7.0
    assert scenarios.nearest_rank(times, 50) == 50.0


def test_p999_takes_the_rank_of_its_percent_exactly():
    """The p99.9 of 41,000 values is the 40,959th: 41,000 * 99.9 is 4,095,900.0000000005 in
    floating point, whose ceiling took the 40,960th (so at 40,000 to 170,000 samples, a latency
    run's counts, 64 counts below 2,000,000 were a rank too high)."""
    from bench.histogram import Histogram

    h = Histogram()
    for _ in range(40_959):
        h.record(0)
    for _ in range(41):
        h.record(1_000)
    assert h.count == 41_000
    assert h.percentile(99.9) == 0
    assert h.percentile(99.99) == 1_000  # the 40,996th
    assert h.percentile(50) == 0 and h.percentile(100) == 1_000


def test_a_redis_receiver_reads_on_without_waiting_for_its_xack():
    """Against the Redis at 127.0.0.1:6379 (skipped without it): a receiver's XACK goes out in
    the same write as its next XREADGROUP. It used to await the XACK's reply first, which with
    `appendfsync always` waits for an fsync, while homing's receivers send their ack and read on:
    at 5,000/s that doubled Redis' measured latency (p50 4.2 to 4.9 -> 2.0 to 2.3 ms, p99 9.3 to
    14.0 -> 5.0 to 6.9 ms in three alternating pairs), a comparison homing won by the client."""
    import asyncio
    import os

    import pytest

    redis = pytest.importorskip("redis")
    import redis.asyncio as aioredis
    from redis.asyncio.connection import Connection

    writes: list[bytes] = []

    class Logged(Connection):
        async def send_packed_command(self, command, check_health=True):
            parts = [command] if isinstance(command, bytes | str) else list(command)
            writes.append(b"".join(p.encode() if isinstance(p, str) else bytes(p)
                                   for p in parts))
            return await super().send_packed_command(command, check_health)

    tag = f"homingtest{os.getpid()}"
    key = f"{tag}:r0"

    async def main() -> tuple[peers._Stats, int]:
        setup = aioredis.Redis(host="127.0.0.1", port=6379)
        try:
            await setup.ping()
        except (OSError, redis.ConnectionError):
            await setup.aclose()
            pytest.skip("no Redis at 127.0.0.1:6379")
        logged = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            connection_class=Logged, host="127.0.0.1", port=6379))
        try:
            await setup.xgroup_create(key, "g", id="0", mkstream=True)
            p = setup.pipeline(transaction=False)
            for i in range(300):  # two reads: 256, then 44
                p.xadd(key, {"b": f"m{i}"})
            await p.execute()
            spec = {"tag": tag, "stamped": False, "senders": [],
                    "receivers": [{"name": "r0", "expected": 300}]}
            (st,) = await peers._redis_run(spec, {"senders": [], "receivers": [logged]}, {})
            pending = (await setup.xpending(key, "g"))["pending"]
            return st, pending
        finally:
            await setup.delete(key)
            await setup.aclose()
            await logged.aclose()
            # A pool given to Redis() is not closed with it: its sockets were left to the
            # garbage collector, whose ResourceWarning failed a later test of the same worker.
            await logged.connection_pool.disconnect()

    st, pending = asyncio.run(main())
    assert st.received == 300 and pending == 0  # every entry read and acked
    reads = [w for w in writes if b"XREADGROUP" in w]
    acks = [w for w in writes if b"XACK" in w]
    assert len(reads) == 2 and len(acks) == 2 and st.acks == 2
    assert b"XACK" in reads[1]  # the first batch's ack went out with the second read


def test_a_rate_the_machine_cannot_reach_is_said():
    """A latency run whose deliveries fell well short of the rate asked (the broker or the load
    could not keep up: a queue grew all run, and the latencies measure it) is `fell_behind`, and
    the run's summary names it with the rate achieved. It was a row of figures among the others
    (`homing bench latency --rates 200000`: p50 9,961 ms, achieved 22,555/s, said nowhere)."""
    from bench import report

    opts = {"senders": 2, "receivers": 2, "procs": 1, "pipeline": 64, "duration": 0.1,
            "placement": None, "load_sched": "normal"}
    with BrokerProcess() as broker:
        behind = scenarios.latency(broker, opts, 200_000)
        opts["duration"] = 1.0
        kept_up = scenarios.latency(broker, opts, 100)
    assert behind["received"] == behind["messages"] == 20_000
    assert behind["achieved_per_s"] < 0.9 * 200_000 and behind["fell_behind"] is True
    assert kept_up["fell_behind"] is False
    results = {"latency": [kept_up, behind]}
    assert report.fell_behind(results) == [
        f"latency 200000/s ({behind['achieved_per_s']:,}/s achieved)"]
    peer = {**behind, "achieved_per_s": 150_000}
    kept_up["peer"] = {"redis": {**kept_up}}
    behind["peer"] = {"redis": peer}
    assert report.fell_behind(results) == [
        f"latency 200000/s ({behind['achieved_per_s']:,}/s achieved)",
        "latency 200000/s vs redis (150,000/s achieved)"]
