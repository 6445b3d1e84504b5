"""The latency benchmark against known delays (docs/BENCHMARKS.md, "Method": how it is checked).

`homing bench latency` promises an open loop: each message stamped with its scheduled send time,
so whatever holds a message up, the broker, the load or the network, counts in full. Here the
load reaches the broker through `DelayProxy` (tests/bench/delay_proxy.py), which adds a known
delay to every byte in each direction or stalls all traffic once, and the figures must show
exactly that; and the histogram's percentiles are checked against exact ones.
"""

from __future__ import annotations

import math
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from bench import scenarios
from bench.harness import BrokerProcess
from bench.histogram import SUB_BUCKETS, Histogram, bucket_of
from tests.bench.delay_proxy import DelayProxy

SENDERS = RECEIVERS = 2


def _opts(duration: float, proxy: DelayProxy) -> dict:
    return {"senders": SENDERS, "receivers": RECEIVERS, "procs": 1, "pipeline": 64,
            "duration": duration, "placement": None, "load_sched": "normal",
            "connect": proxy.address}


def _run(delay_s: float, rate: float, duration: float, stall: tuple[float, float] | None = None
         ) -> tuple[dict, DelayProxy]:
    with BrokerProcess() as broker, DelayProxy(broker.server, delay_s) as proxy:
        if stall is not None:
            proxy.stall_after(SENDERS + RECEIVERS, *stall)
        entry = scenarios.latency(broker, _opts(duration, proxy), rate, histogram=True)
    assert entry["received"] == entry["messages"] and entry["errors"] == {}
    assert proxy.accepted == SENDERS + RECEIVERS  # every load connection went through it
    return entry, proxy


def count_above(h: Histogram, us: int) -> int:
    """How many recorded values lie above `us` (to the histogram's precision)."""
    return sum(n for i, n in h.buckets.items() if i > bucket_of(us))


DELAY_S = 0.100
# How far the p50's rise may be from 2 x DELAY_S plus the proxy's own lateness (its trio timers
# wait in whole milliseconds, epoll_wait rounded up: about 0.5 ms per hop at the median, which
# it measures, `late`): half the delay. The errors this guards against are at least the delay
# itself (a direction lost: a rise of D, not 2D; none counted: 0; the next message waiting for
# the last one's answer: the run falls behind), so half of it catches them all, and leaves
# the run-to-run spread of a loaded machine room: with D = 20 ms and +-5 ms (until 2026-12-05)
# the base's p50 alone was 1.3 to 3.6 ms on a quiet 2-core machine and 7.3 ms in a run beside
# two busy loops, and rises came out 3.9 ms from their expected value beside four. Measured
# beside four busy loops at D = 100 ms: rises 1 to 15 ms from 2 x (D + lateness).
RISE_TOLERANCE_MS = DELAY_S * 1000 / 2


def _rose_by_twice_the_delay(rise_ms: float, proxy_late_ms: float) -> bool:
    return abs(rise_ms - 2 * (DELAY_S * 1000 + proxy_late_ms)) <= RISE_TOLERANCE_MS


def test_a_known_delay_each_way_raises_the_p50_by_twice_the_delay():
    """Through the proxy with no delay, then with 100 ms each way: a message goes sender ->
    broker -> receiver, so its latency rises by 2 x 100 ms, and so does every percentile."""
    base, base_proxy = _run(0.0, 300, 2.5)
    slow, slow_proxy = _run(DELAY_S, 300, 2.5)
    rise = slow["p50_ms"] - base["p50_ms"]
    late = [statistics.median(p.late) * 1000 for p in (base_proxy, slow_proxy)]
    print(f"proxy late per hop, median: {late[0]:.3f} -> {late[1]:.3f} ms")
    print(f"p50 {base['p50_ms']} -> {slow['p50_ms']} ms (rise {rise:.3f} ms); "
          f"p99 {base['p99_ms']} -> {slow['p99_ms']} ms; min {base['histogram'].min} -> "
          f"{slow['histogram'].min} us; durable ack p50 {base['durable_ack_p50_ms']} -> "
          f"{slow['durable_ack_p50_ms']} ms")
    assert _rose_by_twice_the_delay(rise, late[1] - late[0])
    # a send's durable ack makes the same round trip: sender -> broker -> sender
    ack_rise = slow["durable_ack_p50_ms"] - base["durable_ack_p50_ms"]
    assert _rose_by_twice_the_delay(ack_rise, late[1] - late[0])
    assert slow["histogram"].min >= 2 * DELAY_S * 1e6  # nothing beats the delay
    assert not slow["fell_behind"]


def test_a_run_that_keeps_up_behind_a_long_delay_did_not_fall_behind():
    """200 ms each way, 300/s for 2 s: every message arrives 400 ms after its time, at the rate
    asked, and nothing queues. `achieved_per_s` counted the deliveries over first send -> last
    delivery, which takes that 400 ms in as if it were delivery time: 250/s, under 90 % of the
    rate, and the run was flagged `fell_behind`. A constant latency is no shortfall of rate."""
    entry, _ = _run(0.200, 300, 2.0)
    print(f"achieved {entry['achieved_per_s']}/s, p50 {entry['p50_ms']} ms")
    assert entry["p50_ms"] >= 400
    assert abs(entry["achieved_per_s"] - 300) <= 300 * 0.02
    assert not entry["fell_behind"]


STALL_S = 0.300
RATE = 400


def test_a_stall_is_charged_to_every_message_scheduled_during_it():
    """All traffic stops for 300 ms once, in the measured part of the run. The messages whose
    scheduled time fell in the stall go out or arrive when it ends, so their latencies run from
    about 300 ms down to 0: the max is about S, the p99 near it, and the samples above S/2 are
    those scheduled in the stall's first half (or in flight at its start), about
    rate x S / 2 (60 at 400/s). A closed loop, which sends the next message only when the last
    was answered, would record one slow sample per sender (2 here) and none in the rest."""
    # t0 is 0.3 s after the load's "ready", the warm-up 0.6 s of 3 s: the stall starts about
    # 1 s into the measured part.
    entry, proxy = _run(0.0, RATE, 3.0, stall=(1.9, STALL_S))
    h = entry["histogram"]
    above = count_above(h, int(STALL_S * 1e6 / 2))
    expected = RATE * STALL_S / 2
    print(f"p50 {entry['p50_ms']} p99 {entry['p99_ms']} max {entry['max_ms']} ms, "
          f"{above} of {h.count} samples above {STALL_S * 500:g} ms (about {expected:g} expected)")
    assert proxy.stalled is not None
    # every message scheduled after the warm-up is a sample, the stalled ones included
    assert abs(h.count - RATE * (3.0 - entry["warmup_s"])) <= SENDERS
    # Charged once: about S, never twice S (a stall counted again from the message before it).
    # Not S + 50 ms: a loaded machine keeps the proxy's thread from a core past the stall's
    # end (357.8 ms once, beside the helpers' tests and a second pytest worker).
    assert STALL_S * 1000 * 0.9 <= entry["max_ms"] <= STALL_S * 1000 * 1.5
    assert entry["p99_ms"] >= STALL_S * 1000 * 0.75
    assert entry["p50_ms"] < 20  # the rest of the run is untouched
    # At least the stall's first half, as an open loop charges it (a closed loop: 2). More is
    # the backlog drained after it: on a loaded machine, where the proxy's thread in this
    # process waits for a core, messages scheduled just after the stall wait behind it too
    # (92 against the 60 expected, once, beside a second test and a helper's tests; 1.25 x was
    # the bound until then). Twice the expected still fails a run that charged the stall to
    # the rest of the run, which the p50 above also rules out.
    assert 0.75 * expected <= above <= 2 * expected + SENDERS


# -- the histogram against exact percentiles -------------------------------------------------

PRECISION = 1 / SUB_BUCKETS  # bench/histogram.py: a value is known to within 1/128 of itself


def exact(values: list[int], p: float) -> int:
    """The nearest-rank percentile of `values`, from the values themselves."""
    return scenarios.nearest_rank(sorted(values), p)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.integers(0, 300), st.integers(0, 10**9)), min_size=1,
                       max_size=400),
       p=st.sampled_from([0.1, 1, 25, 50, 90, 99, 99.9, 99.99, 100]) | st.floats(0.01, 100))
def test_percentiles_are_the_exact_ones_to_the_stated_precision(values, p):
    """Never below the exact nearest-rank value, and above it by at most 1/128 of it (exact
    below 128); min, max and count exact, and the same after a merge of two halves."""
    whole, a, b = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        whole.record(v)
        (a if i % 2 else b).record(v)
    a.merge(b)
    want = exact(values, p)
    for h in (whole, a):
        got = h.percentile(p)
        assert want <= got <= want + math.floor(want * PRECISION), (p, want, got)
        if want < SUB_BUCKETS:
            assert got == want
        assert (h.count, h.min, h.max) == (len(values), min(values), max(values))
