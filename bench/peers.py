"""Peers for comparison: NATS JetStream and Redis Streams, driven like homing.

Same payloads (200-byte bodies, the open-loop ones starting with their scheduled send time),
same rates, same process layout (`--procs` load processes, sender i -> receiver i % R, one
connection per sender and per receiver, but a Redis sender's 4 pipelines in flight each on a
connection of its own, `--pipeline` sends in flight per sender):

* NATS JetStream: one stream on file storage holding every subject `<tag>.r<j>`; senders
  `publish_async` and count a send when its PubAck arrived; each receiver has a durable pull
  consumer (explicit ack policy) on its subject, fetches up to 256 and acks each message. A
  PubAck does not mean fsynced: the server syncs its files every `sync_interval` (2 minutes by
  default), so NATS does less than homing and Redis here (docs/BENCHMARKS.md, "Method").
* Redis Streams: one stream per receiver; senders pipeline XADD (a reply comes after the
  append is fsynced: the bench sets `appendonly yes`, `appendfsync always` and, where Redis
  allows it, a fresh data `dir`, with CONFIG SET); each receiver XREADGROUPs up to 256 and
  XACKs the batch in one call (Redis has no cumulative ack), sent with its next XREADGROUP in one
  round trip, so it reads on without waiting for the ack's reply, as homing's receivers do.

The peers' clients run on uvloop's event loop and redis-py parses with hiredis, when installed
(both are in the `bench` extra): without them the peers' Python clients, not the servers, set
the figures (Redis Streams did 28,043 and 29,204 msgs/s with redis-py's Python parser and 52,496
and 58,078 with hiredis; with uvloop too, Redis 55,446 / 58,848 -> 62,984 / 61,150 and NATS
18,431 / 17,428 -> 23,039 / 20,929: docs/BENCHMARKS.md, "Method"). `clients()` says what a run
has, and the bench warns when they are missing (`missing_speedups`).

Worker processes return the same figures as `bench.loadgen.clients`, so the scenarios' merge
and report code is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

from bench.harness import Workers, run_phase
from bench.histogram import Histogram
from bench.loadgen import STAMP_DIGITS, raise_nofile, stamped_body
from bench.placement import load_cpus, load_sched, pinned, server_cpus

FETCH = 256


DEFAULT_PORTS = {"nats": 4222, "redis": 6379}  # what the clients' libraries assume too


def peer_name(url: str) -> str:
    return urlsplit(url).scheme or url


def url_problem(url: str) -> str | None:
    """What makes `url` no peer URL at all (a usage error), or None."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        return f"{url!r}: the peer must be nats://HOST[:PORT] or redis://HOST[:PORT]"
    try:
        port = parts.port  # raises ValueError when it is out of range or not a number
    except ValueError:
        port = 0
    if port == 0:  # 0 would mean the usual port, as a URL without one
        return f"{url!r}: the port must be a number from 1 to 65535"
    if not parts.hostname:  # `nats://`, `redis:/h`: the clients would go to localhost
        return f"{url!r}: the URL names no HOST: nats://HOST[:PORT] or redis://HOST[:PORT]"
    return None


def address(url: str) -> tuple[str, int]:
    """The peer's host and port, the scheme's usual port when the URL names none."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[parts.scheme]


GREETING_S = 2.0  # for the TCP connection, then for the peer's first line


def unreachable(url: str) -> str | None:
    """Why `url` cannot be used, or None if the server there answers as its kind does.

    A TCP connection alone is not enough: a port of another server (NATS at Redis' port, an
    HTTP proxy) accepts it too, and nats-py then retried the connection for minutes, printing
    a traceback each time, before the scenario failed."""
    problem = url_problem(url)
    if problem:
        return problem
    try:
        with socket.create_connection(address(url), GREETING_S) as sock:
            problem = _greeting_problem(sock, peer_name(url))
    except OSError as exc:
        return str(exc) or type(exc).__name__
    if problem:
        return problem
    module = peer_name(url)
    try:
        __import__(module)
    except ImportError:
        return f"the Python client is missing: pip install 'homing[bench]' ({module})"
    return None


def _greeting_problem(sock: socket.socket, name: str) -> str | None:
    """Whether the server on `sock` speaks as peer `name` does: a NATS server's first line is
    its `INFO {...}`; Redis answers `PING` with `+PONG` (or an error reply, `-NOAUTH ...`)."""
    if name == "redis":
        sock.sendall(b"PING\r\n")
    first, silence = b"", f"it said nothing within {GREETING_S:g} s"
    try:
        while b"\n" not in first and len(first) < 512:
            chunk = sock.recv(512)
            if not chunk:
                silence = "it closed the connection"
                break
            first += chunk
    except TimeoutError:
        pass
    line = first.split(b"\n", 1)[0].strip()
    if line.startswith(b"INFO " if name == "nats" else (b"+", b"-")):
        return None
    return (f"a server answers there, but not as {name} does "
            f"({f'it said {line[:60]!r}' if line else silence})")


def clients(name: str) -> dict[str, str]:
    """How this machine's client for peer `name` would run: its event loop (`uvloop` or
    `asyncio`) and, for Redis, its reply parser (`hiredis` or `python`)."""
    found = {"event_loop": "uvloop" if _importable("uvloop") else "asyncio"}
    if name == "redis":
        found["parser"] = "hiredis" if _importable("hiredis") else "python"
    return found


def missing_speedups(name: str) -> list[str]:
    """The client speed-ups for peer `name` (`uvloop`; for Redis `hiredis` too) not installed."""
    wanted = ("uvloop", "hiredis") if name == "redis" else ("uvloop",)
    return [module for module in wanted if not _importable(module)]


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # None too when sys.modules says so


def run_async(main: Any) -> Any:
    """Run coroutine `main` to its end on uvloop's event loop where installed, else asyncio's."""
    if _importable("uvloop"):
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (from /proc), if we can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
    return None


# -- orchestration ----------------------------------------------------------------------------

def _jobs(opts: dict, messages: int, rate: float | None, tag: str) -> list[dict]:
    s, r, procs = opts["senders"], opts["receivers"], opts["procs"]
    counts = [messages // s + (1 if i < messages % s else 0) for i in range(s)]
    jobs = [{"senders": [], "receivers": []} for _ in range(procs)]
    expected = [0] * r
    for i, count in enumerate(counts):
        expected[i % r] += count
        jobs[i % procs]["senders"].append({"to": f"r{i % r}", "count": count,
                                           "rate": rate / s if rate else None,
                                           "phase_ns": int(i * 1e9 / rate) if rate else 0})
    for j in range(r):
        jobs[j % procs]["receivers"].append({"name": f"r{j}", "expected": expected[j]})
    return jobs


def _run(url: str, opts: dict, messages: int, rate: float | None, label: str, progress: Any,
         go: Any = None, timeout: float = 600) -> tuple[dict, dict]:
    from bench.scenarios import _cpu_summary, _merge

    scheme = peer_name(url)
    tag = f"b{os.getpid()}x{int(time.time() * 1000) % 10**8}"
    setup = _setup_redis(url, tag) if scheme == "redis" else _setup_nats(url, tag)
    target = f"bench.peers.{scheme}_clients"
    specs = [(target, {"url": url, "tag": tag, "pipeline": opts["pipeline"],
                       "body_bytes": 200, "stamped": rate is not None, **job})
             for job in _jobs(opts, messages, rate, tag)]
    pid = listening_pid(address(url)[1])
    cpus = server_cpus(opts)
    if cpus is not None and pid is None:
        raise RuntimeError(f"--pin: cannot see the process listening for {url}, so it cannot "
                           "be placed like homing (run the bench as its user, or without --pin)")
    place = pinned(pid, cpus) if cpus is not None else contextlib.nullcontext()
    try:
        with place, Workers(specs, progress, load_cpus(opts), load_sched(opts)) as workers:
            workers.gather("ready", 120, f"{label}: connecting")
            go_payload = go() if callable(go) else go
            results, cpu, wall = run_phase(workers, timeout=timeout, label=label, go=go_payload,
                                           pids={"broker": pid} if pid else {})
    finally:
        _teardown(url, tag)
    out = _cpu_summary(cpu, opts, wall)
    out["peer_pid_seen"] = pid is not None
    return {**_merge(results), **setup}, out


def throughput(url: str, opts: dict, progress: Any = None) -> dict:
    """The throughput scenario against the peer at `url`."""
    n = opts["messages"]
    m, cpu = _run(url, opts, n, None, f"throughput vs {peer_name(url)}", progress,
                  timeout=opts["timeout"])
    end_to_end = (m["last_delivery"] - m["first_send"]) / 1e9
    accepted = (m["last_result"] - m["first_send"]) / 1e9
    ok = m["sent"] - sum(m["errors"].values())
    return {"messages": n, "received": m["received"],
            "msgs_per_s": round(m["received"] / end_to_end),
            "sends_per_s": round(ok / accepted), "seconds": round(end_to_end, 3),
            "errors": m["errors"], "durability": m.get("durability"), "cpu": cpu}


def latency(url: str, opts: dict, rate: float, progress: Any = None) -> dict:
    """The open-loop latency scenario against the peer at `url`."""
    from bench.scenarios import _ms, achieved_per_s, fell_behind

    duration = opts["duration"]
    warmup = min(1.0, duration / 5)

    def go() -> dict:
        return {"t0_ns": time.monotonic_ns() + 300_000_000, "warmup_ns": int(warmup * 1e9)}

    m, cpu = _run(url, opts, int(rate * duration), rate, f"latency {rate:g}/s vs "
                  f"{peer_name(url)}", progress, go=go, timeout=duration * 4 + 60)
    h, a = m["latency"], m["ack_latency"]
    achieved = achieved_per_s(m["received"], m["first_delivery"], m["last_delivery"])
    return {"rate": rate, "received": m["received"], "achieved_per_s": achieved,
            "fell_behind": fell_behind(achieved, rate), "samples": h.count,
            "p50_ms": _ms(h.percentile(50)), "p90_ms": _ms(h.percentile(90)),
            "p99_ms": _ms(h.percentile(99)), "p999_ms": _ms(h.percentile(99.9)),
            "max_ms": _ms(h.max), "durable_ack_p50_ms": _ms(a.percentile(50)),
            "durable_ack_p99_ms": _ms(a.percentile(99)), "durable_ack_samples": a.count,
            "errors": m["errors"], "cpu": cpu}


def _setup_redis(url: str, tag: str) -> dict:
    import redis

    r = redis.Redis.from_url(url)
    notes = {}
    r.config_set("appendonly", "yes")
    r.config_set("appendfsync", "always")
    fresh = tempfile.mkdtemp(prefix="redis-bench-")
    try:
        r.config_set("dir", fresh)
        notes["dir"] = "fresh temporary dir"
    except redis.ResponseError as exc:  # `dir` is a protected config since Redis 7
        os.rmdir(fresh)  # unused: one was left in $TMPDIR by every run against Redis 7
        notes["dir"] = f"unchanged ({exc}); data in {r.config_get('dir').get('dir')}"
    cfg = r.config_get("append*")
    r.close()
    return {"durability": {"appendonly": cfg.get("appendonly"),
                           "appendfsync": cfg.get("appendfsync"), **notes}}


def _setup_nats(url: str, tag: str) -> dict:
    async def main() -> None:
        import nats
        from nats.js.api import StorageType

        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=tag.upper(), subjects=[f"{tag}.>"], storage=StorageType.FILE)
        await nc.close()

    asyncio.run(main())
    return {"durability": {"storage": "file", "publish": "PubAck awaited",
                           "consumer": "durable pull, explicit acks",
                           "fsync": "every sync_interval (2 min by default), not before PubAck"}}


def _teardown(url: str, tag: str) -> None:
    with contextlib.suppress(Exception):
        if peer_name(url) == "redis":
            import redis

            r = redis.Redis.from_url(url)
            keys = list(r.scan_iter(f"{tag}:*"))
            if keys:
                r.delete(*keys)
            r.close()
        else:
            async def main() -> None:
                import nats

                nc = await nats.connect(url)
                await nc.jetstream().delete_stream(tag.upper())
                await nc.close()

            asyncio.run(main())


# -- worker processes (asyncio: both Python clients are asyncio) -----------------------------

class _Stats:
    def __init__(self) -> None:
        self.sent = self.answered = self.received = self.acks = 0
        self.first_send = self.last_result = self.first_delivery = self.last_delivery = 0
        self.errors: dict[str, int] = {}
        self.latency, self.ack_latency = Histogram(), Histogram()

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def acked(self, at: int, now: int, cutoff: int) -> None:
        """Record the durable ack, at `now`, of a send scheduled at `at`, unless it was
        scheduled in the warm-up (before `cutoff`), as for the deliveries."""
        if at >= cutoff:
            self.ack_latency.record((now - at) // 1000)

    def delivered(self, bodies: list[bytes], now: int, cutoff: int, stamped: bool) -> None:
        self.received += len(bodies)
        if stamped:
            for body in bodies:
                at = int(body[:STAMP_DIGITS])
                if at >= cutoff:
                    self.latency.record((now - at) // 1000)
        if not self.first_delivery:
            self.first_delivery = now
        self.last_delivery = now


def _payload(stats: list[_Stats], connect_ns: int) -> dict:
    lat, ack = Histogram(), Histogram()
    errors: dict[str, int] = {}
    for st in stats:
        lat.merge(st.latency)
        ack.merge(st.ack_latency)
        for k, v in st.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {"sent": sum(s.sent for s in stats), "errors": errors,
            "first_send": min((s.first_send for s in stats if s.first_send), default=0),
            "last_result": max((s.last_result for s in stats), default=0),
            "received": sum(s.received for s in stats), "acks": sum(s.acks for s in stats),
            "connect": connect_ns,
            "first_delivery": min((s.first_delivery for s in stats if s.first_delivery),
                                  default=0),
            "last_delivery": max((s.last_delivery for s in stats), default=0),
            "latency": lat.to_dict(), "ack_latency": ack.to_dict()}


async def _schedule(job: dict, spec: dict, go: dict, st: _Stats, submit) -> None:
    """Call `submit(list of (index, sched_ns, body))` closed-loop-free at the job's rate, or
    in pipeline-sized batches as fast as `submit` allows (it must bound what is in flight)."""
    count, size, rate = job["count"], spec["body_bytes"], job.get("rate")
    if not rate:
        st.first_send = time.monotonic_ns()
        body = b"x" * size
        for base in range(0, count, 64):
            await submit([(i, 0, body) for i in range(base, min(count, base + 64))])
        return
    t0, period, sent = go["t0_ns"] + job.get("phase_ns", 0), int(1e9 / rate), 0
    st.first_send = t0
    while sent < count:
        now = time.monotonic_ns()
        due = min(count, (now - t0) // period + 1)
        if due > sent:
            await submit([(i, t0 + i * period, stamped_body(t0 + i * period, size).encode())
                          for i in range(sent, due)])
            sent = due
            continue
        await asyncio.sleep((t0 + sent * period - now) / 1e9)


def _worker(spec: dict, pipe: Any, connect, run) -> None:
    raise_nofile()

    async def main() -> None:
        ctx = await connect(spec)
        pipe.send(("ready", {"connections": len(spec["senders"]) + len(spec["receivers"])}))
        kind, go = await asyncio.to_thread(pipe.recv)
        if kind != "go":
            return
        connect_ns = time.monotonic_ns()
        stats = await run(spec, ctx, go or {})
        pipe.send(("done", _payload(stats, connect_ns)))
        with contextlib.suppress(Exception):
            await ctx["close"]()
        await asyncio.to_thread(pipe.recv)

    run_async(main())


# Redis Streams

def redis_clients(spec: dict, pipe: Any) -> None:
    _worker(spec, pipe, _redis_connect, _redis_run)


async def _redis_connect(spec: dict) -> dict:
    import redis.asyncio as aioredis

    tag = spec["tag"]
    conns = 1 + spec["pipeline"] // 64
    senders = [aioredis.Redis.from_url(spec["url"], max_connections=conns)
               for _ in spec["senders"]]
    receivers = [aioredis.Redis.from_url(spec["url"]) for _ in spec["receivers"]]
    for r, job in zip(receivers, spec["receivers"], strict=True):
        with contextlib.suppress(Exception):  # BUSYGROUP: another process made it
            await r.xgroup_create(f"{tag}:{job['name']}", "g", id="0", mkstream=True)
        await r.ping()
    for s in senders:
        await s.ping()

    async def close() -> None:
        for c in senders + receivers:
            await c.aclose()

    return {"senders": senders, "receivers": receivers, "close": close}


async def _redis_run(spec: dict, ctx: dict, go: dict) -> list[_Stats]:
    tag, stamped = spec["tag"], spec["stamped"]
    cutoff = go.get("t0_ns", 0) + go.get("warmup_ns", 0)
    stats: list[_Stats] = []

    async def sender(r, job: dict, st: _Stats) -> None:
        key = f"{tag}:{job['to']}"
        slots = asyncio.Semaphore(max(1, spec["pipeline"] // 64))
        tasks = set()

        async def flush(batch) -> None:
            try:
                p = r.pipeline(transaction=False)
                for _i, _at, body in batch:
                    p.xadd(key, {"b": body})
                await p.execute()
                now = time.monotonic_ns()
                st.answered += len(batch)
                st.last_result = now
                if stamped:
                    for _i, at, _ in batch:
                        st.acked(at, now, cutoff)
            except Exception as exc:
                st.error(exc)
            finally:
                slots.release()

        async def submit(batch) -> None:
            await slots.acquire()
            st.sent += len(batch)
            t = asyncio.create_task(flush(batch))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        await _schedule(job, spec, go, st, submit)
        while tasks:
            await asyncio.gather(*list(tasks))

    async def receiver(r, job: dict, st: _Stats) -> None:
        # A batch's XACK goes out with the next XREADGROUP, in one round trip: the receiver
        # reads on without waiting for the ack's reply (which `appendfsync always` holds back
        # until an fsync), as homing's receivers send their ack and read on.
        key = f"{tag}:{job['name']}"
        unacked: list[bytes] = []
        while st.received < job["expected"]:
            if unacked:
                p = r.pipeline(transaction=False)
                p.xack(key, "g", *unacked)
                p.xreadgroup("g", "c", {key: ">"}, count=FETCH, block=1000)
                _, got = await p.execute()
                unacked = []
                st.acks += 1
            else:
                got = await r.xreadgroup("g", "c", {key: ">"}, count=FETCH, block=1000)
            if not got:
                continue
            entries = got[0][1]
            now = time.monotonic_ns()
            st.delivered([fields[b"b"] for _id, fields in entries], now, cutoff, stamped)
            unacked = [eid for eid, _ in entries]
        if unacked:
            await r.xack(key, "g", *unacked)
            st.acks += 1

    tasks = []
    for r, job in zip(ctx["senders"], spec["senders"], strict=True):
        stats.append(_Stats())
        tasks.append(sender(r, job, stats[-1]))
    for r, job in zip(ctx["receivers"], spec["receivers"], strict=True):
        stats.append(_Stats())
        tasks.append(receiver(r, job, stats[-1]))
    await asyncio.gather(*tasks)
    return stats


# NATS JetStream

def nats_clients(spec: dict, pipe: Any) -> None:
    _worker(spec, pipe, _nats_connect, _nats_run)


async def _nats_connect(spec: dict) -> dict:
    import nats

    tag = spec["tag"]
    senders = [await nats.connect(spec["url"]) for _ in spec["senders"]]
    receivers = []
    for job in spec["receivers"]:
        nc = await nats.connect(spec["url"])
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{tag}.{job['name']}", durable=f"{tag}{job['name']}")
        receivers.append((nc, sub))

    async def close() -> None:
        for nc in senders + [nc for nc, _ in receivers]:
            await nc.close()

    return {"senders": senders, "receivers": receivers, "close": close}


async def _nats_run(spec: dict, ctx: dict, go: dict) -> list[_Stats]:
    import nats.errors

    tag, stamped = spec["tag"], spec["stamped"]
    cutoff = go.get("t0_ns", 0) + go.get("warmup_ns", 0)
    stats: list[_Stats] = []

    async def sender(nc, job: dict, st: _Stats) -> None:
        js = nc.jetstream(publish_async_max_pending=spec["pipeline"])
        subject = f"{tag}.{job['to']}"
        futures = set()

        def done(at: int, fut: asyncio.Future) -> None:
            futures.discard(fut)
            now = time.monotonic_ns()
            if fut.cancelled() or fut.exception() is not None:
                st.error(fut.exception() or asyncio.CancelledError())
            elif stamped:
                st.acked(at, now, cutoff)
            st.answered += 1
            st.last_result = now

        async def submit(batch) -> None:
            for _i, at, body in batch:
                fut = await js.publish_async(subject, body)
                st.sent += 1
                futures.add(fut)
                fut.add_done_callback(lambda f, at=at: done(at, f))

        await _schedule(job, spec, go, st, submit)
        while futures:
            await asyncio.wait(list(futures))

    async def receiver(nc, sub, job: dict, st: _Stats) -> None:
        while st.received < job["expected"]:
            try:
                msgs = await sub.fetch(FETCH, timeout=1)
            except nats.errors.TimeoutError:
                continue
            now = time.monotonic_ns()
            st.delivered([m.data for m in msgs], now, cutoff, stamped)
            for m in msgs:
                await m.ack()
            st.acks += len(msgs)

    tasks = []
    for nc, job in zip(ctx["senders"], spec["senders"], strict=True):
        stats.append(_Stats())
        tasks.append(sender(nc, job, stats[-1]))
    for (nc, sub), job in zip(ctx["receivers"], spec["receivers"], strict=True):
        stats.append(_Stats())
        tasks.append(receiver(nc, sub, job, stats[-1]))
    await asyncio.gather(*tasks)
    return stats
