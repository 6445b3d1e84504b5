"""Load generators for homing: one function per process kind, run by `bench.harness.Workers`.

Each speaks the wire protocol directly with the sans-IO `protocol.Connection`. Closed loop
(throughput, catchup), a trio task per connection: sends are pipelined (up to `pipeline`
requests in flight per connection, each answered by a durable `result`). Open loop (latency),
one synchronous epoll loop per process (`open_loop`): each send at its scheduled time. Either
way deliveries are acked cumulatively, one `ack` per received chunk. A
process connects everything, sends ("ready", info), waits for ("go", payload), runs, sends
("done", figures) and exits on ("exit", None).

Clocks: `time.monotonic_ns()` is CLOCK_MONOTONIC, one clock for every process on the machine,
so a time written into a body by one process can be subtracted in another.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import time
from collections.abc import Callable
from typing import Any

import trio

import protocol as wire
from bench.histogram import Histogram

RECV_BYTES = 1 << 18
STAMP_DIGITS = 20  # a body starts with its scheduled send time, monotonic ns, zero-padded


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def stamped_body(ns: int, size: int) -> str:
    """A body of `size` bytes that starts with the time `ns`."""
    stamp = f"{ns:0{STAMP_DIGITS}d}"
    return stamp + "x" * max(0, size - len(stamp))


class Link:
    """One device connection: a trio stream and its protocol state."""

    def __init__(self, stream: trio.SocketStream, conn: wire.Connection, welcome: wire.Welcome):
        self.stream, self.conn, self.welcome = stream, conn, welcome
        self.fd = stream.socket.fileno()
        self.closed_by: Any = None
        self._writing = trio.Lock()  # one writer at a time (a sender's sends and its pongs)

    @classmethod
    async def open(cls, server: str, token: str, device: str) -> Link:
        host, _, port = server.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        conn = wire.Connection(wire.Role.CLIENT)
        await stream.send_all(conn.send(wire.Hello(versions=(wire.PROTOCOL_VERSION,),
                                                   token=token, device=device)))
        while (event := conn.next_event()) is wire.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECV_BYTES))
        if not isinstance(event, wire.Welcome):
            await stream.aclose()
            raise RuntimeError(f"handshake refused: {event!r}")
        conn.max_frame_bytes = event.max_frame
        return cls(stream, conn, event)

    async def frames(self) -> list[Any] | None:
        """The frames buffered or in the next received chunk (pings answered); None at EOF."""
        conn = self.conn
        out: list[Any] = []
        while True:
            while (event := conn.next_event()) is not wire.NEED_DATA:
                if event is wire.CLOSED or isinstance(event, wire.Bye):
                    self.closed_by = event
                    return None
                if isinstance(event, wire.Error) and event.close:
                    self.closed_by = event
                    return None
                if isinstance(event, wire.Ping):
                    await self.write(conn.send(wire.Pong(id=event.id)))
                    continue
                out.append(event)
            if out:
                return out
            conn.receive_data(await self.receive())

    # Straight on the socket, as the broker's sessions read (broker/session.py, `_receive_raw`):
    # trio's SocketStream (a try, a wait, a retry and a checkpoint per call) and a cancel scope
    # per read held about a third of a load process's CPU at 5,000 messages/s. That CPU is
    # taken from the cores the broker shares, and a busy load process sends late and reads
    # late, which the latency figures count against the broker.

    async def receive(self) -> bytes:
        """The next chunk from the socket (b"" at EOF): wait until readable, then one read."""
        fd = self.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, RECV_BYTES)
            except BlockingIOError:
                continue

    async def write(self, data: bytes) -> None:
        """Send all of `data`: written at once, waiting for room only when the socket is full."""
        lock = self._writing
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            view = memoryview(data)
            while True:
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(self.fd, view):]
                if not view:
                    return
                await trio.lowlevel.wait_writable(self.fd)
        finally:
            lock.release()

    async def request(self, frame: Any) -> Any:
        """Send one request and return its reply (pushes before it are dropped)."""
        await self.write(self.conn.send(frame))
        while True:
            frames = await self.frames()
            if frames is None:
                raise RuntimeError("connection closed while waiting for a reply")
            for f in frames:
                if getattr(f, "id", None) == frame.id:
                    if isinstance(f, wire.Error):
                        raise RuntimeError(f"{f.name}: {f.message}")
                    return f

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.send_all(self.conn.send(wire.Bye(reason="bench done")))
        await trio.aclose_forcefully(self.stream)


async def wait_message(pipe: Any) -> tuple[str, Any]:
    """The next ("go"|"exit", payload) from the orchestrator, without blocking trio."""
    return await trio.to_thread.run_sync(pipe.recv, abandon_on_cancel=True)


# -- senders and receivers (throughput, latency, catchup) --------------------------------------

class SenderStats:
    def __init__(self) -> None:
        self.sent = self.answered = self.errors = 0
        self.first_send = self.last_result = 0
        self.error_names: dict[str, int] = {}
        self.ack_latency = Histogram()


def cid_of(prefix: str, i: int) -> str:
    """The cid of a connection's i-th send: zero-padded, so a sender's cids sort in send order,
    as the SDK's do (broker.client.new_cid), and the i-th sends of all senders sit together in
    the broker's idempotency index (keyed by cid, then sender)."""
    return f"{prefix}{i:010d}"


async def run_sender(link: Link, spec: dict, job: dict, stats: SenderStats) -> None:
    """Send `job["count"]` messages to `job["to"]`, closed loop: up to `pipeline` in flight."""
    count, pipeline = job["count"], spec["pipeline"]
    prefix = job["cid_prefix"]
    room = trio.Event()
    write, encode, Send, to = link.write, link.conn.send, wire.Send, job["to"]
    done = trio.Event()
    fixed_body = "x" * spec["body_bytes"]

    async def read_results() -> None:
        nonlocal room
        while stats.answered < count:
            frames = await link.frames()
            if frames is None:
                raise RuntimeError(f"broker closed a sender connection: {link.closed_by!r}")
            tally_results(stats, frames, time.monotonic_ns())
            room.set()
        done.set()

    async def write_closed_loop() -> None:
        nonlocal room
        sent = 0
        stats.first_send = time.monotonic_ns()
        while sent < count:
            n = min(pipeline - (sent - stats.answered), count - sent, 128)
            if n <= 0:
                await room.wait()
                room = trio.Event()
                continue
            data = b"".join([encode(Send(id=i, cid=cid_of(prefix, i), body=fixed_body, to=to,
                                         conv=None)) for i in range(sent + 1, sent + n + 1)])
            sent += n
            stats.sent = sent
            await write(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_results)
        await write_closed_loop()
        await done.wait()


def tally_results(stats: SenderStats, frames: list[Any], now: int,
                  sched: dict[int, int] | None = None, cutoff: int = 0) -> None:
    """Count the answers among one chunk's `frames`; with `sched` (request id -> scheduled send
    time), record the latency of each durable ack of a send scheduled at or after `cutoff` (the
    end of the warm-up, as for the deliveries: `tally_deliveries`)."""
    for f in frames:
        if isinstance(f, wire.Result | wire.Error):
            stats.answered += 1
            if isinstance(f, wire.Error):
                stats.errors += 1
                stats.error_names[f.name] = stats.error_names.get(f.name, 0) + 1
            elif sched is not None:
                at = sched.pop(f.id, now)
                if at >= cutoff:
                    stats.ack_latency.record((now - at) // 1000)
    stats.last_result = now


class ReceiverStats:
    def __init__(self) -> None:
        self.received = self.acks = self.ack_rejected = self.reacks = 0
        self.first_delivery = self.last_delivery = 0
        self.latency = Histogram()


async def run_receiver(link: Link, expected: int, stats: ReceiverStats) -> None:
    """Take `expected` message deliveries, acking each received chunk with one cumulative ack."""
    encode, write = link.conn.send, link.write
    acked = seen = 0
    while stats.received < expected:
        frames = await _frames_or_reack(link, stats, seen)
        now = time.monotonic_ns()
        seen = tally_deliveries(stats, frames, seen, now)
        if seen > acked:
            acked = seen
            stats.acks += 1
            await write(encode(wire.Ack(upto=seen)))


def tally_deliveries(stats: ReceiverStats, frames: list[Any], seen: int, now: int,
                     cutoff: int | None = None) -> int:
    """Count the new message deliveries among one chunk's `frames` (read at `now`) past inbox
    seq `seen`, and refused acks; return the new `seen`. With `cutoff`, record the latency of
    each delivery stamped at or after it (bodies start with their scheduled send time)."""
    for f in frames:
        if isinstance(f, wire.Deliver) and f.inbox_seq > seen:
            seen = f.inbox_seq
            if f.kind == "msg":
                stats.received += 1
                if cutoff is not None:
                    at = int(f.body[:STAMP_DIGITS])
                    if at >= cutoff:
                        stats.latency.record((now - at) // 1000)
        elif isinstance(f, wire.Error) and f.id is None:  # a refused ack: see _frames_or_reack
            stats.ack_rejected += 1
    if not stats.first_delivery and stats.received:
        stats.first_delivery = now
    stats.last_delivery = now
    return seen


REACK_AFTER_S = 0.02


async def _frames_or_reack(link: Link, stats: Any, seen: int) -> list[Any]:
    """The next chunk's frames; after a rejected ack, re-send the ack while nothing arrives.

    A guard against a broker race fixed in 3a34511 (docs/BENCHMARKS.md, "Broker defects found
    by the bench"): a session delivered inbox entries committed a moment before its own inbox
    head moved, then refused their ack with `invalid` "cannot ack N: the inbox ends at M", and
    with the window full the device stalled. Should it come back, the run still finishes and
    `ack_rejected` in the JSON shows it. Acks are cumulative, so repeating one is safe.
    """
    while True:
        frames: Any = ()
        if stats.ack_rejected > stats.reacks:
            with trio.move_on_after(REACK_AFTER_S):
                frames = await link.frames()
        else:  # no cancel scope on the common path (see `Link.receive`)
            frames = await link.frames()
        if frames is None:
            raise RuntimeError(f"broker closed a receiving connection: {link.closed_by!r}")
        if frames:
            return frames
        stats.reacks += 1
        await link.write(link.conn.send(wire.Ack(upto=seen)))


def clients(spec: dict, pipe: Any) -> None:
    """A process of senders and receivers (throughput, latency, catchup); see module doc."""
    raise_nofile()
    trio.run(_clients, spec, pipe)


async def _clients(spec: dict, pipe: Any) -> None:
    server = spec["server"]
    late = spec.get("receivers_connect_on_go", False)
    senders = [await Link.open(server, j["token"], "bench") for j in spec["senders"]]
    receivers = [] if late else [await Link.open(server, j["token"], "bench")
                                 for j in spec["receivers"]]
    pipe.send(("ready", {"connections": len(senders) + len(receivers)}))
    kind, go = await wait_message(pipe)
    if kind != "go":
        return
    go = go or {}
    s_stats = [SenderStats() for _ in senders]
    r_stats = [ReceiverStats() for _ in spec["receivers"]]
    connect_ns = time.monotonic_ns()
    if spec["stamped"]:  # the latency scenario, at a fixed rate: see `open_loop`
        if late:
            raise ValueError("the open loop's receivers connect before it starts")
        open_loop(senders, receivers, spec, s_stats, r_stats, go)
    else:
        await _closed_loop(senders, receivers, spec, s_stats, r_stats, late)
    latency, ack_latency = Histogram(), Histogram()
    for st in r_stats:
        latency.merge(st.latency)
    for st in s_stats:
        ack_latency.merge(st.ack_latency)
    errors: dict[str, int] = {}
    for st in s_stats:
        for name, n in st.error_names.items():
            errors[name] = errors.get(name, 0) + n
    pipe.send(("done", {
        "sent": sum(s.sent for s in s_stats), "errors": errors,
        "first_send": min((s.first_send for s in s_stats), default=0),
        "last_result": max((s.last_result for s in s_stats), default=0),
        "received": sum(r.received for r in r_stats), "acks": sum(r.acks for r in r_stats),
        "ack_rejected": sum(r.ack_rejected for r in r_stats),
        "connect": connect_ns,
        "first_delivery": min((r.first_delivery for r in r_stats if r.first_delivery),
                              default=0),
        "last_delivery": max((r.last_delivery for r in r_stats), default=0),
        "latency": latency.to_dict(), "ack_latency": ack_latency.to_dict(),
    }))
    for link in senders + receivers:
        await link.aclose()
    await wait_message(pipe)


async def _closed_loop(senders: list[Link], receivers: list[Link], spec: dict,
                       s_stats: list[SenderStats], r_stats: list[ReceiverStats],
                       late: bool) -> None:
    """A trio task per sender and per receiver (throughput, catchup); late receivers connect
    once the senders have started."""
    async with trio.open_nursery() as nursery:
        for link, job, st in zip(senders, spec["senders"], s_stats, strict=True):
            nursery.start_soon(run_sender, link, spec, job, st)
        if late:
            receivers[:] = [await Link.open(spec["server"], j["token"], "bench")
                            for j in spec["receivers"]]
        for link, job, st in zip(receivers, spec["receivers"], r_stats, strict=True):
            nursery.start_soon(run_receiver, link, job["expected"], st)


# -- the open loop (latency) ------------------------------------------------------------------

class _Out:
    """One socket's unsent bytes inside `open_loop` (the loop never blocks on a write)."""

    __slots__ = ("buf", "fd", "watching")

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray()
        self.watching = False  # registered for EPOLLOUT: bytes are waiting for room


class _OpenSender:
    __slots__ = ("count", "encode", "link", "out", "period", "prefix", "sched", "size",
                 "stats", "t0", "to")

    def __init__(self, link: Link, job: dict, spec: dict, stats: SenderStats, go: dict):
        self.link, self.stats, self.out = link, stats, _Out(link.fd)
        self.count, self.to, self.prefix = job["count"], job["to"], job["cid_prefix"]
        self.t0 = go["t0_ns"] + job.get("phase_ns", 0)
        self.period = int(1e9 / job["rate"])
        self.size, self.encode = spec["body_bytes"], link.conn.send
        self.sched: dict[int, int] = {}
        stats.first_send = self.t0

    def next_due(self) -> int | None:
        """When the next send is scheduled (monotonic ns); None when all are sent."""
        sent = self.stats.sent
        return None if sent >= self.count else self.t0 + sent * self.period


class _OpenReceiver:
    __slots__ = ("acked", "expected", "link", "out", "reack_at", "seen", "stats")

    def __init__(self, link: Link, expected: int, stats: ReceiverStats) -> None:
        self.link, self.expected, self.stats, self.out = link, expected, stats, _Out(link.fd)
        self.acked = self.seen = 0
        self.reack_at = 0  # monotonic ns at which to repeat a refused ack (0: none)


def open_loop(senders: list[Link], receivers: list[Link], spec: dict,
              s_stats: list[SenderStats], r_stats: list[ReceiverStats], go: dict) -> None:
    """The senders and receivers of one process at a fixed rate, in one synchronous epoll loop.

    Each send goes out at its scheduled time (or at once, if the loop is late) and is stamped
    with the scheduled time, so lateness counts against the result (no coordinated omission);
    a receiver's deliveries are timestamped when its socket is read, before anything is parsed.
    The frames and acks (one cumulative ack per received chunk) are those of the trio tasks of
    the closed loop, which ran this scenario before and paid a trio wake-up per send, result,
    delivery and ack: at 5,000 messages/s the load processes took 86 to 89 % of a 2-core
    machine that the broker shares, and this loop 53 to 54 % (docs/BENCHMARKS.md). It blocks
    trio, which has nothing else to do meanwhile (as `receive_posts`).
    """
    cutoff = go.get("t0_ns", 0) + go.get("warmup_ns", 0)
    ep = select.epoll()
    by_fd: dict[int, _OpenSender | _OpenReceiver] = {}
    open_s = [_OpenSender(link, job, spec, st, go)
              for link, job, st in zip(senders, spec["senders"], s_stats, strict=True)]
    open_r = [_OpenReceiver(link, job["expected"], st)
              for link, job, st in zip(receivers, spec["receivers"], r_stats, strict=True)]
    for end in (*open_s, *open_r):
        by_fd[end.out.fd] = end
        ep.register(end.out.fd, select.EPOLLIN)
    # The ends still waiting for results or deliveries.
    busy = {s for s in open_s if s.count} | {r for r in open_r if r.expected}

    def room(fd: int) -> None:
        _flush(ep, by_fd[fd].out)

    try:
        while busy:
            now = time.monotonic_ns()
            wake = [d for d in (s.next_due() for s in open_s) if d is not None]
            wake += [r.reack_at for r in open_r if r.reack_at]
            timeout = -1.0 if not wake else max(0.0, (min(wake) - now) / 1e9)
            for fd, at, data in read_ready(ep, timeout, room):
                end = by_fd[fd]
                if isinstance(end, _OpenSender):
                    _sender_chunk(ep, end, data, at, cutoff)
                    if end.stats.answered >= end.count:
                        busy.discard(end)
                else:
                    _receiver_chunk(ep, end, data, at, cutoff)
                    if end.stats.received >= end.expected:
                        busy.discard(end)
            now = time.monotonic_ns()
            for s in open_s:
                _send_due(ep, s, now)
            for r in open_r:
                if r.reack_at and r.reack_at <= now:
                    r.reack_at = 0
                    r.stats.reacks += 1
                    _write(ep, r.out, r.link.conn.send(wire.Ack(upto=r.seen)))
    finally:
        ep.close()


def _send_due(ep: Any, s: _OpenSender, now: int) -> None:
    """Send every message of `s` scheduled up to `now`, each stamped with its scheduled time."""
    st, period = s.stats, s.period
    due = min(s.count, (now - s.t0) // period + 1) if now >= s.t0 else 0
    if due <= st.sent:
        return
    frames = []
    for i in range(st.sent + 1, due + 1):
        at = s.t0 + (i - 1) * period
        s.sched[i] = at
        frames.append(s.encode(wire.Send(id=i, cid=cid_of(s.prefix, i),
                                         body=stamped_body(at, s.size), to=s.to, conv=None)))
    st.sent = due
    _write(ep, s.out, b"".join(frames))


def _frames(ep: Any, link: Link, out: _Out, data: bytes) -> list[Any]:
    """The frames of one received chunk, pings answered; raises if the broker closed it."""
    if not data:
        raise RuntimeError("broker closed a connection of the open loop")
    conn = link.conn
    conn.receive_data(data)
    frames = []
    while (f := conn.next_event()) is not wire.NEED_DATA:
        if f is wire.CLOSED or isinstance(f, wire.Bye) or (isinstance(f, wire.Error) and f.close):
            raise RuntimeError(f"broker closed a connection of the open loop: {f!r}")
        if isinstance(f, wire.Ping):
            _write(ep, out, conn.send(wire.Pong(id=f.id)))
        else:
            frames.append(f)
    return frames


def _sender_chunk(ep: Any, s: _OpenSender, data: bytes, now: int, cutoff: int) -> None:
    tally_results(s.stats, _frames(ep, s.link, s.out, data), now, s.sched, cutoff)


def _receiver_chunk(ep: Any, r: _OpenReceiver, data: bytes, now: int, cutoff: int) -> None:
    refused = r.stats.ack_rejected
    r.seen = tally_deliveries(r.stats, _frames(ep, r.link, r.out, data), r.seen, now, cutoff)
    if r.seen > r.acked:
        r.acked = r.seen
        r.stats.acks += 1
        _write(ep, r.out, r.link.conn.send(wire.Ack(upto=r.seen)))
        r.reack_at = 0  # this ack supersedes a refused one
    elif r.stats.ack_rejected > refused:  # see _frames_or_reack
        r.reack_at = now + int(REACK_AFTER_S * 1e9)


def _write(ep: Any, out: _Out, data: bytes) -> None:
    """Queue `data` on `out` and write what the socket takes now; the rest goes on EPOLLOUT."""
    out.buf += data
    if not out.watching:
        _flush(ep, out)


def _flush(ep: Any, out: _Out) -> None:
    """Write what the socket takes of `out`; watch for room only while bytes are left."""
    try:
        del out.buf[:os.write(out.fd, out.buf)]
    except BlockingIOError:
        pass
    if bool(out.buf) != out.watching:
        out.watching = bool(out.buf)
        ep.modify(out.fd, select.EPOLLIN | (select.EPOLLOUT if out.watching else 0))


# -- fan-out --------------------------------------------------------------------------------

def subscribers(spec: dict, pipe: Any) -> None:
    """Subscribers of one channel: per post, the latest delivery time in this process."""
    raise_nofile()
    trio.run(_subscribers, spec, pipe)


async def _subscribers(spec: dict, pipe: Any) -> None:
    server, conv, posts = spec["server"], spec["conv"], spec["posts"]
    links: list[Link] = []
    limit = trio.CapacityLimiter(64)

    async def join(user: str, token: str) -> None:
        async with limit:
            link = await Link.open(server, token, "bench")
            await link.request(wire.Subscribe(id=1, conv=conv))
            links.append(link)

    async with trio.open_nursery() as nursery:
        for user, token in spec["subs"]:
            nursery.start_soon(join, user, token)
    pipe.send(("ready", {"connections": len(links)}))
    kind, _ = await wait_message(pipe)
    if kind != "go":
        return
    last, count = receive_posts(links, posts)
    pipe.send(("done", {"last_ns": last, "deliveries": count}))
    for link in links:
        await link.aclose()
    await wait_message(pipe)


class _Subscriber:
    """One subscriber's socket and cursor inside `receive_posts`."""

    __slots__ = ("acked", "fd", "got", "link", "reack_at")

    def __init__(self, link: Link) -> None:
        self.link, self.fd = link, link.fd
        self.acked = self.got = 0
        self.reack_at = 0  # monotonic ns at which to repeat a rejected ack (0: none)


def receive_posts(links: list[Link], posts: int) -> tuple[dict[int, int], int]:
    """Read `links` until each had `posts` channel deliveries, acking each received chunk.

    Returns (post seq -> latest delivery latency in this process, ns; deliveries). A delivery's
    time is when its subscriber read it from its socket. All of this process's subscribers share
    one epoll loop, run synchronously (it blocks trio, which has nothing else to do): each
    wake-up first reads and timestamps every ready socket, then parses and acks. With a trio task
    per subscriber instead, the last subscriber of a wake-up was timestamped only after the
    other ready tasks had been scheduled, had parsed their frames and had sent their acks, so
    up to 250 subscribers' worth of the load process's own work counted as delivery time (and
    that loop took about 80 us of load-process CPU per delivery, this one about 30 us, which
    leaves the broker more of the 2 cores it shares with them).
    """
    ep = select.epoll()
    subs: dict[int, _Subscriber] = {}
    for link in links:
        sub = _Subscriber(link)
        subs[sub.fd] = sub
        ep.register(sub.fd, select.EPOLLIN)
    last: dict[int, int] = {}
    refused: dict[int, _Subscriber] = {}  # subscribers with a refused ack to repeat
    waiting, count = (len(subs) if posts > 0 else 0), 0
    try:
        while waiting:
            timeout = -1.0
            if refused:
                due = min(s.reack_at for s in refused.values())
                timeout = max(0.0, (due - time.monotonic_ns()) / 1e9)
            for fd, now, data in read_ready(ep, timeout):
                sub = subs[fd]
                got = _take_chunk(sub, data, now, last)
                count += got
                if got and sub.got == posts:
                    waiting -= 1
                if sub.reack_at:
                    refused[sub.fd] = sub
            if refused:
                _repeat_refused_acks(refused)
    finally:
        ep.close()
    return last, count


def read_ready(ep: Any, timeout: float,
               room: Callable[[int], None] | None = None) -> list[tuple[int, int, bytes]]:
    """Wait up to `timeout` s (-1: no limit) on `ep`; read every readable socket once and
    timestamp it as read, all before anything is parsed, so the last one read is not charged
    for the parsing of the others. Returns `(fd, monotonic ns, data)` each; calls `room(fd)`
    for each socket that has room to write again.

    A wait is done by `select` on the epoll descriptor, to the microsecond: `epoll.poll` counts
    whole milliseconds and rounds a wait up, so a send due in 0.2 ms left up to 1 ms late (0.6 ms
    at the median, the peers' clients on uvloop 0.14 ms), and the open loop charges a late send
    to the server."""
    if timeout > 0:
        with contextlib.suppress(ValueError):  # a descriptor beyond select's FD_SETSIZE
            select.select([ep.fileno()], [], [], timeout)
            timeout = 0
    reads = []
    for fd, events in ep.poll(timeout):
        if events & select.EPOLLOUT and room is not None:
            room(fd)
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = os.read(fd, RECV_BYTES)
            except BlockingIOError:
                continue
            reads.append((fd, time.monotonic_ns(), data))
    return reads


def _repeat_refused_acks(refused: dict[int, _Subscriber]) -> None:
    """Repeat the acks refused at least REACK_AFTER_S ago (see `_frames_or_reack`)."""
    now = time.monotonic_ns()
    for fd, sub in list(refused.items()):
        if sub.reack_at <= now:
            sub.reack_at = 0
            del refused[fd]
            _send_now(fd, sub.link.conn.send(wire.Ack(upto=sub.acked)))


def _take_chunk(sub: _Subscriber, data: bytes, now: int, last: dict[int, int]) -> int:
    """Feed one received chunk; record its deliveries' latencies and ack them. Returns how many
    new deliveries it held."""
    if not data:
        raise RuntimeError("broker closed a subscriber connection")
    conn, got, acked = sub.link.conn, 0, sub.acked
    conn.receive_data(data)
    while (f := conn.next_event()) is not wire.NEED_DATA:
        if isinstance(f, wire.Deliver):
            if f.kind == "msg" and f.inbox_seq > acked:
                got += 1
                acked = f.inbox_seq
                lat = now - int(f.body[:STAMP_DIGITS])
                if lat > last.get(f.seq, 0):
                    last[f.seq] = lat
        elif isinstance(f, wire.Ping):
            _send_now(sub.fd, conn.send(wire.Pong(id=f.id)))
        elif f is wire.CLOSED or isinstance(f, wire.Bye) or (isinstance(f, wire.Error)
                                                             and f.close):
            raise RuntimeError(f"broker closed a subscriber connection: {f!r}")
        elif isinstance(f, wire.Error) and f.id is None:  # an ack refused: see _frames_or_reack
            sub.reack_at = now + int(REACK_AFTER_S * 1e9)
    if acked > sub.acked:
        sub.acked = acked
        sub.got += got
        _send_now(sub.fd, conn.send(wire.Ack(upto=acked)))
    return got


def _send_now(fd: int, data: bytes) -> None:
    """Write all of `data` to the non-blocking socket `fd`, waiting for room if need be."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def poster(spec: dict, pipe: Any) -> None:
    """The channel owner: `posts` posts, one every `interval_s`, each stamped with its time."""
    trio.run(_poster, spec, pipe)


async def _poster(spec: dict, pipe: Any) -> None:
    link = await Link.open(spec["server"], spec["token"], "bench")
    pipe.send(("ready", {"connections": 1}))
    kind, _ = await wait_message(pipe)
    if kind != "go":
        return
    for i in range(1, spec["posts"] + 1):
        at = time.monotonic_ns()
        await link.request(wire.Send(id=i, cid=cid_of("p", i),
                                     body=stamped_body(at, spec["body_bytes"]), to=None,
                                     conv=spec["conv"]))
        await trio.sleep(max(0.0, spec["interval_s"] - (time.monotonic_ns() - at) / 1e9))
    pipe.send(("done", {"posts": spec["posts"]}))
    await link.aclose()
    await wait_message(pipe)


# -- idle connections -------------------------------------------------------------------------

def idle(spec: dict, pipe: Any) -> None:
    """Hold many authenticated idle connections (pinging each heartbeat) until told to exit."""
    limit = raise_nofile()
    trio.run(_idle, spec, pipe, limit)


async def _idle(spec: dict, pipe: Any, nofile: int) -> None:
    server = spec["server"]
    links: list[Link] = []
    failures: dict[str, int] = {}
    limiter = trio.CapacityLimiter(spec.get("concurrency", 100))
    started = time.monotonic()

    async def connect(token: str, device: str) -> None:
        async with limiter:
            try:
                links.append(await Link.open(server, token, device))
            except (OSError, RuntimeError, trio.BrokenResourceError) as exc:
                name = type(exc).__name__
                failures[name] = failures.get(name, 0) + 1

    async with trio.open_nursery() as nursery:
        for token, device in spec["conns"]:
            nursery.start_soon(connect, token, device)
    pipe.send(("ready", {"connected": len(links), "failures": failures, "nofile": nofile,
                         "connect_s": time.monotonic() - started}))

    held = len(links)

    async def keep(link: Link, every: float) -> None:
        """Read (and drop) whatever arrives; ping once every `every` seconds, as clients must.
        Returns when the connection closed (or failed): it is no longer held."""
        nonlocal held
        with contextlib.suppress(Exception):
            while True:
                with trio.move_on_after(every):
                    while await link.frames() is not None:
                        pass
                    break
                await link.write(link.conn.send(wire.Ping()))
        held -= 1

    async with trio.open_nursery() as nursery:
        for link in links:
            nursery.start_soon(keep, link, float(spec.get("ping_s", 10)))
        # ("count", None) asks how many are still held (bench.scenarios.connections asks after
        # each phase, so that no figure is reported for connections closed meanwhile); any
        # other message ("exit") ends the hold.
        while (await wait_message(pipe))[0] == "count":
            pipe.send(("held", {"held": held}))
        nursery.cancel_scope.cancel()
    for link in links:
        await trio.aclose_forcefully(link.stream)
