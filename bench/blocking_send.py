"""What a send costs through the blocking client (broker/client_blocking.py), against the trio
SDK's and a `homing send` child process, on one running `homing serve`.

Each round sends `--sends` messages one after the other (each returns once durable) through
the trio API and through a BlockingClient, which of the two goes first by turns; then as many
pings each way (a round trip with no disk: what the thread hop adds shows best there); then
`--threads` threads sharing one BlockingClient and as many trio tasks sharing one Client, with
the same count in all; and `--subprocess` messages by `homing send`, one child process each.
The ways take turns, round after round, so that a machine busy with other work weighs on each
alike. Each round prints one JSON line per way: calls a second (from connect to close), and
the per-call median and p99 in ms where the calls go one after the other. Tokens are signed
with the data directory's secret, read here.

Run `python -m bench.blocking_send --server 127.0.0.1:7893 --data DIR --rounds 3`.
Figures of 2026-12-06 in docs/CLIENT.md, "From synchronous code and asyncio".
This is not a test (tests/broker/test_client_blocking.py is).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import trio

from broker import tokens
from broker.client import open_client
from broker.client_blocking import connect


def _summary(way: str, round_: int, count: int, elapsed: float,
             each: list[float] | None = None) -> dict:
    line = {"way": way, "round": round_, "sends": count, "per_s": round(count / elapsed, 1)}
    if each:
        each = sorted(each)
        line["median_ms"] = round(statistics.median(each) * 1000, 3)
        line["p99_ms"] = round(each[int(len(each) * 0.99) - 1] * 1000, 3)
    return line


async def _trio_sequential(server: str, token: str, count: int, ping: bool) -> list[float]:
    async with open_client(server, token, "bench-trio", deliver=False) as client:
        each = []
        for n in range(count):
            t = time.perf_counter()
            await (client.ping() if ping else client.send(f"trio {n}", to="bench-member"))
            each.append(time.perf_counter() - t)
        return each


async def _trio_tasks(server: str, token: str, count: int, tasks: int) -> None:
    async with open_client(server, token, "bench-trio", deliver=False) as client:
        async def sender(k: int) -> None:
            for n in range(count // tasks):
                await client.send(f"task {k} {n}", to="bench-member")

        async with trio.open_nursery() as nursery:
            for k in range(tasks):
                nursery.start_soon(sender, k)


def _blocking_sequential(server: str, token: str, count: int, ping: bool) -> list[float]:
    with connect(server, token, "bench-blocking", deliver=False) as client:
        each = []
        for n in range(count):
            t = time.perf_counter()
            client.ping() if ping else client.send(f"blocking {n}", to="bench-member")
            each.append(time.perf_counter() - t)
        return each


def _blocking_threads(server: str, token: str, count: int, threads: int) -> None:
    with connect(server, token, "bench-blocking", deliver=False) as client:
        def sender(k: int) -> None:
            for n in range(count // threads):
                client.send(f"thread {k} {n}", to="bench-member")

        workers = [threading.Thread(target=sender, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def _subprocess(server: str, token: str, count: int) -> list[float]:
    homing = Path(sys.executable).with_name("homing")
    cmd = [str(homing)] if homing.exists() else [sys.executable, "-m", "broker.cli"]
    env = {**os.environ, "HOMING_SERVER": server, "HOMING_TOKEN": token}
    each = []
    for n in range(count):
        t = time.perf_counter()
        subprocess.run([*cmd, "send", "--to", "bench-member", f"child {n}"], env=env,
                       check=True, capture_output=True)
        each.append(time.perf_counter() - t)
    return each


def _timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--data", required=True, type=Path, help="the broker's data directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sends", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--subprocess", type=int, default=20)
    args = parser.parse_args()
    token = tokens.issue(tokens.load_secret(args.data, create=False), "bench-shop", "service")
    s, n, k = args.server, args.sends, args.threads
    for r in range(1, args.rounds + 1):
        for ping in (False, True):
            op = "ping" if ping else "send"
            ways = [("trio", functools.partial(trio.run, _trio_sequential)),
                    ("blocking", _blocking_sequential)]
            for name, way in ways if r % 2 else ways[::-1]:  # who goes first, by turns
                elapsed, each = _timed(way, s, token, n, ping)
                print(json.dumps(_summary(f"{name}_{op}", r, n, elapsed, each)), flush=True)
        elapsed, _ = _timed(trio.run, _trio_tasks, s, token, n, k)
        print(json.dumps(_summary(f"trio_{k}_tasks", r, n // k * k, elapsed)), flush=True)
        elapsed, _ = _timed(_blocking_threads, s, token, n, k)
        print(json.dumps(_summary(f"blocking_{k}_threads", r, n // k * k, elapsed)), flush=True)
        elapsed, each = _timed(_subprocess, s, token, args.subprocess)
        print(json.dumps(_summary("homing_send", r, args.subprocess, elapsed, each)), flush=True)


if __name__ == "__main__":
    main()
