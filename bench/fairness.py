"""What a quiet service sees while noisy ones flood the broker: `python -m bench.fairness`.

One `homing serve` child at its default limits (`--send-rate`, `--user-send-rate`, ...), and
load processes of their own (multiprocessing, spawn), so the client side is not what is timed:
- noisy: each of `--noisy-users` users opens `--noisy-conns` connections, each pipelining sends
  as fast as the limits allow (`--pipeline` in flight, the broker's `--max-inflight-requests`),
  to one peer of its own (a direct message to oneself is refused), to `--many` other users in
  turn, or into one channel of `--many` subscribers (`--target`); its deliveries are acked.
  `--request` floods with another request instead: a `read` of a conversation it is not in
  (refused `forbidden` by the commit's rules) or at its own mark (`ok`, nothing logged), the
  resend of a message of its accepted before (a dup, past the send rates), a user token's
  `revoke`, `history` pages, or `typing` where it is not a member (not answered);
- quiet: one user sends one message every `--every-ms` to another quiet user, timing send ->
  durable `result` and send -> `deliver`; another connection of it asks `history` and `convs`
  in turn, and a new connection is opened (hello -> welcome) and closed, each every 0.25 s.

The quiet figures are taken twice, on an idle broker and under the flood, and printed as
p50/p99 in ms, with the noisy requests sent and answered per second, those refused by the
rates, and the broker's CPU (one core of Python at most: 100 %). A figure to read, never a
test's assertion (docs/OPERATIONS.md, "One noisy service beside quiet ones").
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from typing import Any

import trio

import protocol as wire
from bench.harness import BrokerProcess, cpu_seconds
from bench.loadgen import Link, raise_nofile, stamped_body

QUERY_EVERY_S = 0.25
REQUESTS = ("send", "resend", "read-forbidden", "read-stale", "revoke", "history", "typing")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- noisy -------------------------------------------------------------------------------------

def noisy(spec: dict, pipe: Any) -> None:
    """A load process: its users' connections flood until told to stop."""
    raise_nofile()
    trio.run(_noisy, spec, pipe)


async def _noisy(spec: dict, pipe: Any) -> None:
    links = []
    for user, token in spec["users"]:
        for c in range(spec["conns"]):
            links.append((user, await Link.open(spec["server"], token, f"n{c}")))
    pipe.send("ready")
    await trio.to_thread.run_sync(pipe.recv)
    counts = {"results": 0, "refused": 0, "other_errors": 0, "sent": 0}
    deadline = trio.current_time() + spec["seconds"]
    async with trio.open_nursery() as nursery:
        for i, (_user, link) in enumerate(links):
            nursery.start_soon(_flood, link, spec, i, counts, deadline)
    pipe.send(counts)
    for _user, link in links:
        await link.aclose()


def _request(spec: dict, index: int, i: int, body: str) -> Any:
    """The `i`th request of a noisy connection (`--request`)."""
    kind = spec["request"]
    if kind == "send":
        conv = spec["conv"]
        targets = spec["targets"]
        return wire.Send(id=i, cid=f"n{index}-{i:010d}", body=body,
                         to=None if conv else targets[i % len(targets)], conv=conv)
    if kind == "read-forbidden":  # a conversation it is not in: refused `forbidden`
        return wire.Read(id=i, conv=spec["foreign_conv"], upto=1)
    if kind == "read-stale":  # its own, at or below its mark: `ok`, nothing logged
        return wire.Read(id=i, conv=spec["own_conv"], upto=1)
    if kind == "resend":  # its message accepted before, with its cid: a dup, past the rates
        return wire.Send(id=i, cid="setup", body="hi", to=spec["peer"])
    if kind == "revoke":  # a user token's: refused `forbidden`
        return wire.Revoke(id=i, user="quiet-b")
    if kind == "history":
        return wire.History(id=i, conv=spec["own_conv"], limit=50)
    return wire.Typing(conv=spec["foreign_conv"])  # typing: no answer


async def _flood(link: Link, spec: dict, index: int, counts: dict, deadline: float) -> None:
    """Keep `pipeline` requests in flight on `link` until `deadline` (a `typing` flood, which
    is not answered: as fast as the socket takes them); ack what is delivered."""
    pipeline = spec["pipeline"] if spec["request"] != "typing" else math.inf
    encode, room = link.conn.send, trio.Event()
    state = {"sent": 0, "answered": 0}
    body = "n" * spec["body_bytes"]

    async def read() -> None:
        nonlocal room
        while True:
            frames = await link.frames()
            if frames is None:
                return
            last = 0
            for f in frames:
                if isinstance(f, wire.Deliver):
                    last = f.inbox_seq
                elif isinstance(f, wire.Error) and f.id is not None:
                    state["answered"] += 1
                    key = "refused" if f.name == "rate_limited" else "other_errors"
                    counts[key] += 1
                elif getattr(f, "id", None) is not None:
                    counts["results"] += 1
                    state["answered"] += 1
            if last:
                await link.write(encode(wire.Ack(upto=last)))
            room.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        while trio.current_time() < deadline:
            n = min(pipeline - (state["sent"] - state["answered"]), 128)
            if n <= 0:
                with trio.move_on_at(deadline):
                    await room.wait()
                room = trio.Event()
                continue
            frames = [encode(_request(spec, index, i, body))
                      for i in range(state["sent"] + 1, state["sent"] + n + 1)]
            state["sent"] += n
            await link.write(b"".join(frames))
        counts["sent"] += state["sent"]
        nursery.cancel_scope.cancel()


# -- quiet -------------------------------------------------------------------------------------

def quiet(spec: dict, pipe: Any) -> None:
    """The quiet service: timed sends, deliveries, queries and handshakes."""
    trio.run(_quiet, spec, pipe)


async def _quiet(spec: dict, pipe: Any) -> None:
    server = spec["server"]
    sender = await Link.open(server, spec["token_a"], "qa")
    receiver = await Link.open(server, spec["token_b"], "qb")
    asker = await Link.open(server, spec["token_a"], "qq")
    pipe.send("ready")
    await trio.to_thread.run_sync(pipe.recv)
    out: dict[str, list[float]] = {"result": [], "deliver": [], "history": [], "convs": [],
                                   "hello": []}
    deadline = trio.current_time() + spec["seconds"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_timed_sends, sender, spec, out, deadline)
        nursery.start_soon(_deliveries, receiver, out)
        nursery.start_soon(_queries, asker, spec, out, deadline)
        await trio.sleep_until(deadline + 0.5)
        nursery.cancel_scope.cancel()
    pipe.send(out)
    for link in (sender, receiver, asker):
        await link.aclose()


async def _timed_sends(link: Link, spec: dict, out: dict, deadline: float) -> None:
    every = spec["every_ms"] / 1000
    sent_at: dict[int, int] = {}

    async def read() -> None:
        while True:
            frames = await link.frames()
            if frames is None:
                return
            now = time.monotonic_ns()
            for f in frames:
                if isinstance(f, wire.Result | wire.Error) and f.id in sent_at:
                    out["result"].append((now - sent_at.pop(f.id)) / 1e6)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        i, due = 0, trio.current_time()
        while due < deadline:
            await trio.sleep_until(due)
            i += 1
            now = time.monotonic_ns()
            sent_at[i] = now
            await link.write(link.conn.send(wire.Send(
                id=i, cid=f"q{spec['run']}-{i:08d}", body=stamped_body(now, 40),
                to=spec["user_b"])))
            due += every
        await trio.sleep(2)
        nursery.cancel_scope.cancel()


async def _deliveries(link: Link, out: dict) -> None:
    while True:
        frames = await link.frames()
        if frames is None:
            return
        now, last = time.monotonic_ns(), 0
        for f in frames:
            if isinstance(f, wire.Deliver):
                last = f.inbox_seq
                if isinstance(f.body, str) and f.body[:20].isdigit():
                    out["deliver"].append((now - int(f.body[:20])) / 1e6)
        if last:
            await link.write(link.conn.send(wire.Ack(upto=last)))


async def _queries(link: Link, spec: dict, out: dict, deadline: float) -> None:
    i = 0
    while trio.current_time() < deadline:
        for kind in ("history", "convs", "hello"):
            i += 1
            start = time.monotonic_ns()
            if kind == "history":
                await link.request(wire.History(id=i, conv=spec["conv_ab"], limit=50))
            elif kind == "convs":
                await link.request(wire.Convs(id=i))
            else:
                fresh = await Link.open(spec["server"], spec["token_a"], f"h{i}")
                out[kind].append((time.monotonic_ns() - start) / 1e6)
                await fresh.aclose()
                await trio.sleep(QUERY_EVERY_S)
                continue
            out[kind].append((time.monotonic_ns() - start) / 1e6)
            await trio.sleep(QUERY_EVERY_S)


# -- orchestration -----------------------------------------------------------------------------

async def _prepare(broker: BrokerProcess, args: argparse.Namespace
                   ) -> tuple[str, str | None, dict[str, str]]:
    """The quiet pair's conversation, the noisy channel if the target is one, and each noisy
    user's direct conversation with its peer, one message in it, for the other requests."""
    a = await Link.open(broker.server, broker.token("quiet-a"), "setup")
    await Link.open(broker.server, broker.token("quiet-b"), "setup")  # exists, has a device
    r = await a.request(wire.Send(id=1, cid="setup-1", body="hello", to="quiet-b"))
    conv_ab, channel, own = r.conv, None, {}
    if args.request in ("resend", "read-stale", "history"):
        for u in range(args.noisy_users):
            user = f"noisy-{u}"
            link = await Link.open(broker.server, broker.token(user), "setup")
            sent = await link.request(wire.Send(id=1, cid="setup", body="hi", to=f"{user}-peer"))
            own[user] = sent.conv  # (its send marked it read up to its message)
            await link.aclose()
    if args.target == "channel":
        owner = await Link.open(broker.server, broker.token("noisy-0"), "setup")
        members = tuple(f"sub-{i}" for i in range(args.many))
        members += tuple(f"noisy-{u}" for u in range(1, args.noisy_users))
        created = await owner.request(wire.Create(id=1, kind="channel", name="big",
                                                  members=members))
        channel = created.conv
        for u in range(1, args.noisy_users):  # the others post too: admins
            await owner.request(wire.SetRole(id=1 + u, conv=channel, user=f"noisy-{u}",
                                             role="admin"))
    return conv_ab, channel, own


def run_phase(broker: BrokerProcess, args: argparse.Namespace, flood: bool, run: int,
              conv_ab: str, channel: str | None, own: dict[str, str]) -> dict:
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    base = {"server": broker.server, "seconds": args.seconds}
    quiet_spec = dict(base, token_a=broker.token("quiet-a"), token_b=broker.token("quiet-b"),
                      user_b="quiet-b", conv_ab=conv_ab, every_ms=args.every_ms, run=run)
    jobs = [(quiet, quiet_spec)]
    if flood:
        targets = [f"sub-{i}" for i in range(args.many)]
        for u in range(args.noisy_users):
            user = f"noisy-{u}"
            noisy_spec = dict(base, users=[(user, broker.token(user))], conns=args.noisy_conns,
                              pipeline=args.pipeline, body_bytes=args.body_bytes,
                              targets=[f"{user}-peer"] if args.target == "one" else targets,
                              conv=channel, request=args.request, foreign_conv=conv_ab,
                              own_conv=own.get(user), peer=f"{user}-peer")
            jobs.append((noisy, noisy_spec))
    for target, spec in jobs:
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=target, args=(spec, theirs), daemon=True)
        p.start()
        procs.append(p)
        pipes.append(ours)
    for pipe in pipes:
        if pipe.recv() != "ready":
            raise RuntimeError("a load process failed to connect")
    cpu0, t0 = cpu_seconds(broker.pid), time.monotonic()
    for pipe in pipes:
        pipe.send("go")
    results = [pipe.recv() for pipe in pipes]
    cpu = (cpu_seconds(broker.pid) - cpu0) / (time.monotonic() - t0)
    for p in procs:
        p.join(10)
    figures = {"quiet": results[0], "broker_cpu": cpu}
    noisy_counts = results[1:]
    figures["noisy_results_per_s"] = sum(c["results"] for c in noisy_counts) / args.seconds
    figures["noisy_refused_per_s"] = sum(c["refused"] for c in noisy_counts) / args.seconds
    figures["noisy_other_errors"] = sum(c["other_errors"] for c in noisy_counts)
    figures["noisy_sent_per_s"] = sum(c["sent"] for c in noisy_counts) / args.seconds
    return figures


def report(label: str, figures: dict) -> None:
    q = figures["quiet"]
    parts = [f"{label:6}"]
    for key in ("result", "deliver", "history", "convs", "hello"):
        v = q[key]
        parts.append(f"{key} p50 {_pct(v, 0.5):7.1f} p99 {_pct(v, 0.99):7.1f} ms (n={len(v)})")
    print("  ".join(parts[:3]))
    print("        " + "  ".join(parts[3:]))
    print(f"        broker CPU {figures['broker_cpu'] * 100:.0f} %, noisy requests sent "
          f"{figures.get('noisy_sent_per_s', 0):.0f}/s, answered "
          f"{figures['noisy_results_per_s']:.0f}/s, "
          f"refused by the rates {figures['noisy_refused_per_s']:.0f}/s, other errors "
          f"{figures['noisy_other_errors']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--noisy-users", type=int, default=4)
    ap.add_argument("--noisy-conns", type=int, default=3, help="connections per noisy user")
    ap.add_argument("--pipeline", type=int, default=1024, help="sends in flight per connection")
    ap.add_argument("--target", choices=("one", "many", "channel"), default="one")
    ap.add_argument("--request", choices=REQUESTS, default="send",
                    help="what the noisy connections flood with: sends (to --target), the "
                         "resend of an accepted message, reads of a conversation they are not "
                         "in or at their mark, a user token's revoke, history pages, typing in "
                         "a conversation they are not in")
    ap.add_argument("--many", type=int, default=300, help="users sent to, or subscribers")
    ap.add_argument("--body-bytes", type=int, default=100)
    ap.add_argument("--every-ms", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=1, help="idle then flood, this many times")
    ap.add_argument("--extra", default="", help="more `homing serve` flags, space-separated")
    args = ap.parse_args(argv)
    # The bench harness lifts the rates; put back the defaults (the last flag given wins).
    extra = ["--send-rate", "5000", "--user-send-rate", "20000", *args.extra.split()]
    with BrokerProcess(extra=extra) as broker:
        conv_ab, channel, own = trio.run(_prepare, broker, args)
        print(f"noisy: {args.noisy_users} users x {args.noisy_conns} connections, "
              f"{args.pipeline} in flight each, {args.request} (target {args.target}); "
              f"quiet: one send every {args.every_ms:g} ms; {args.seconds:g} s a phase", flush=True)
        for run in range(args.runs):
            report("idle", run_phase(broker, args, False, 2 * run, conv_ab, channel, own))
            report("flood", run_phase(broker, args, True, 2 * run + 1, conv_ab, channel, own))


if __name__ == "__main__":
    main()
