"""A monitor's `homing health` during a reconnect storm: a `homing serve` child SIGKILLed and
started again, and a crowd of devices, each with a backlog, coming back at once at a small
--max-handshakes. The check is answered, `ok` and promptly, all through the storm, and every
device still gets every entry of its inbox, in order.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import trio

import protocol as wire
from broker.client import open_client
from tests.faults import monitor_child
from tests.procs import BrokerProcess, as_user, homing_cmd

DEVICES = 300  # a restart's crowd, scaled to two busy cores
BACKLOG = 600  # notices each device catches up on, posted while it was away
HANDSHAKES = 1  # --max-handshakes: the crowd holds the place while it comes back
CHECK_EVERY_S = 0.3  # `homing health`, a process each
PROBE_EVERY_S = 0.05  # the same check, from tests/faults/monitor_child.py
# What a check may take, the broker's own answer (`answer_ms`: connect, hello and answer). A
# liveness probe restarts a broker it has no answer from; --timeout 5 in the docs' example.
# Measured (2026-12-07, 2 cores): `homing health` 4 to 150 ms here, in storms of 5 to 12 s;
# before, 12 to 28 of the 52 to 100 probes of each storm (2.8 to 5.4 s) and some of the
# `homing health` checks were refused `limit_exceeded` (exit 4).
ANSWER_BOUND_MS = 2000


async def _device(bp: BrokerProcess, token: str, device: str, last: int,
                  got: list[int]) -> None:
    """A raw device: hello, take every delivery (in order: each the next one, or one again
    after a reconnect), ack what a read brought; reconnect as the SDK does (50 ms doubling to
    2 s, 0.5 to 1.5 times that) when refused or dropped, until it has entry `last`."""
    backoff = 0.05
    while not got or got[-1] < last:
        stream = None
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", bp.port)
            conn = wire.Connection(wire.Role.CLIENT)
            await stream.send_all(conn.send(wire.Hello(versions=(1,), token=token,
                                                       device=device, id=0)))
            while data := await stream.receive_some(65536):
                conn.receive_data(data)
                upto = None
                while (ev := conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                    if isinstance(ev, wire.Welcome):
                        conn.max_frame_bytes, backoff = ev.max_frame, 0.05
                    elif isinstance(ev, wire.Deliver):
                        assert ev.inbox_seq <= (got[-1] if got else 0) + 1, (device, ev, got[-3:])
                        if not got or ev.inbox_seq > got[-1]:
                            got.append(ev.inbox_seq)
                        upto = ev.inbox_seq
                if upto is not None:
                    await stream.send_all(conn.send(wire.Ack(upto=upto)))
                if got and got[-1] >= last:
                    return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
        await trio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(2.0, backoff * 2)


def _check(env: dict) -> dict:
    """One `homing health --timeout 10`: its figures (or error) and exit status."""
    began = time.monotonic()
    proc = subprocess.run([*homing_cmd(), "health", "--timeout", "10"], env=env,
                          capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return {"exit": proc.returncode, "answer_ms": out.get("answer_ms"),
            "handshaking": out.get("handshaking"), "connections": out.get("connections"),
            "wall_s": round(time.monotonic() - began, 2), "stderr": proc.stderr[-300:]}


# Long (one at a time in CI): a probe past --max-handshakes must say its hello within
# handshake.CHECK_CROWDED_S of its connect, and a test beside it in the default run's other
# worker delayed the prober's hellos past that (2 of 238 probes refused, at 118 and 168 ms, in a
# default run of 2026-12-07 on 2 cores; the same under two busy loops, 3 of 6 runs).
@pytest.mark.long
async def test_health_is_answered_promptly_through_a_reconnect_storm(broker_process, tally):
    """Every `homing health` run while 300 devices, each 600 notices behind, come back at once
    after a SIGKILL and restart at --max-handshakes 1 is answered `ok` (exit 0) within
    ANSWER_BOUND_MS, and every device gets its whole inbox in order. Before 2026-12-07 the
    broker took one connection off the listen backlog a turn of its event loop, each turn a
    round of every session catching up (up to a window of deliveries each), refused the check
    `limit_exceeded` while the crowd held the handshake places, and looked at the sessions for
    `backlog_max` in slices of 128, a turn each: a liveness probe then had a healthy broker
    killed and restarted, at every restart."""
    bp: BrokerProcess = broker_process("--max-handshakes", str(HANDSHAKES))
    users = [f"store-{i}" for i in range(DEVICES)]
    tokens = [bp.token(u) for u in users]
    env = {**os.environ, **as_user(bp, "nagios", "monitor")}
    with trio.fail_after(60):
        async with open_client(bp.server, bp.token("hq"), "desk") as hq:
            conv = await hq.create_channel("notices", members=users)
            for k in range(BACKLOG):
                await hq.send(f"notice {k}", conv=conv)
        last = BACKLOG + 1  # the channel's membership entry, then the notices
        await trio.to_thread.run_sync(bp.kill)
        await bp.astart()
        got: dict[int, list[int]] = {i: [] for i in range(DEVICES)}
        checks: list[dict] = []
        prober = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.monitor_child", bp.server,
             bp.token("nagios", "monitor"), str(PROBE_EVERY_S)], stdout=subprocess.PIPE,
            text=True)
        try:
            async with trio.open_nursery() as nursery:
                for i in range(DEVICES):
                    nursery.start_soon(_device, bp, tokens[i], "pos", last, got[i])
                began = time.monotonic()
                while not all(g and g[-1] >= last for g in got.values()):
                    checks.append(await trio.to_thread.run_sync(_check, env))
                    await trio.sleep(CHECK_EVERY_S)
                storm_s = time.monotonic() - began
        finally:
            prober.terminate()
            probes = [json.loads(line) for line in prober.communicate(timeout=20)[0].splitlines()]
    assert all(g == list(range(1, last + 1)) for g in got.values())
    assert len(checks) >= 3, (storm_s, checks)  # the storm outlasted a few checks
    # The probes of its last 10 s may be cut short by the end: those of the storm had 10 s.
    probes = probes[:int(storm_s / PROBE_EVERY_S)]
    slow = [p for p in probes if p["refused"] or p["ms"] is None or p["ms"] > ANSWER_BOUND_MS]
    assert not slow, (f"{len(slow)} of {len(probes)} probes refused or late in a storm of "
                      f"{storm_s:.1f} s: {slow[:4]}")
    late = [c for c in checks if c["exit"] != 0 or c["answer_ms"] > ANSWER_BOUND_MS]
    assert not late, (f"{len(late)} of {len(checks)} checks failed or were late in a storm of "
                      f"{storm_s:.1f} s: {late[:4]}")
    tally.add("crowd: a monitor's check through a reconnect storm", len(checks))


FLOOD = 2000  # connections that never say a byte, made at once
FLOOD_HANDSHAKES = 20  # --max-handshakes: the flood's first take them for --handshake-timeout
# What a check (and a device's refusal) behind the flood may take. Measured (2026-12-07, 2
# cores): 7 to 8 s before the review, the flood drained from the listen backlog 256 a second
# (64 places of 250 ms); since, about 1 s.
FLOOD_BOUND_MS = 3000


def _flood(port: int, sockets: list[socket.socket]) -> None:
    for _ in range(FLOOD):
        sockets.append(socket.create_connection(("127.0.0.1", port)))


async def test_a_check_behind_a_flood_of_silent_connections(broker_process):
    """2,000 connections that never speak, made at once at --max-handshakes 20, then a
    monitor's check and a device's hello: both are answered within FLOOD_BOUND_MS, the device
    welcomed, or refused `limit_exceeded` if its hello came before the flood's first 20 had
    been silent awaiting.SILENT_S (tests/broker/test_awaiting.py). Those 20 hold the handshake
    places (for --handshake-timeout, 10 s, until then), and the rest go through the 64 places
    past the limit; with
    them all taken and connections waiting in the listen backlog, a place held 25 ms is given
    up (handshake.CHECK_CROWDED_S). Before the review each held its place its whole 250 ms, so
    the backlog drained 256 connections a second and the check waited behind the flood (7 to 8
    s: behind 4,000 at the default limits, 16 s, past a probe's --timeout)."""
    bp: BrokerProcess = broker_process("--max-handshakes", str(FLOOD_HANDSHAKES))
    host, port = bp.server.rsplit(":", 1)
    sockets: list[socket.socket] = []
    try:
        await trio.to_thread.run_sync(_flood, bp.port, sockets)
        device = wire.Hello(versions=(1,), token=bp.token("store-1"), device="pos", id=0)
        results = {}

        async def ask(name: str, hello: object) -> None:
            results[name] = await monitor_child.answer(
                host, int(port), bp.token("nagios", "monitor"), hello)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "check", None)
            nursery.start_soon(ask, "device", device)
    finally:
        for sock in sockets:
            sock.close()
    check, device = results["check"], results["device"]
    assert check["refused"] is None and check["ms"] <= FLOOD_BOUND_MS, results
    assert device["refused"] in (None, "limit_exceeded"), results
    assert device["ms"] <= FLOOD_BOUND_MS, results
