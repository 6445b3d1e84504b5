"""A soak of connections coming and going, against a running `homing serve`, sampling its memory.

What a broker up for weeks sees: phones connecting and leaving all day (a clean bye, an EOF, a
TCP reset, half a frame written, a hang-up before the hello), services reconnecting, groups
made and left, bots reading history. Each round connects one device of a user, says hello,
sends, sometimes makes, joins or leaves a group, reads history, receipts or its conversations,
acks and marks read, and leaves in one of those ways; `--concurrency` rounds run at a time, and
a service (`echo`) takes every delivery to it. Mixes (`--mix`):

* `new`: users mostly new (85 %, else one of 200 recurring), 3 devices each;
* `same`: 8 users on 4 devices each, reconnecting (and replacing each other's sessions);
* `odd`: the rarer ways: half a hello then silence, expired, foreign and revoked tokens, new
  devices started at the inbox head, creates repeated with their cid, one device connecting
  3 times at once, requests-only sessions sending bursts.

Every `--sample-every` rounds it prints one JSON line: the round, the broker's VmRSS and
RssAnon (KiB), its open descriptors and threads (from /proc/PID, so it runs on the broker's
host), and the refusals met so far by name. The broker's own `broker_stats` lines (`--stats-
interval`) go along with them. Tokens are signed with the data directory's secret, read here.

Run `python -m bench.soak --port 7891 --data DIR --pid PID --rounds 30000 --mix new`.
Figures of 2026-12-06 in docs/OPERATIONS.md, "Faults and attacks tried". This is not a test
(tests/broker/test_soak_review.py keeps the rough endings).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
from functools import partial
from pathlib import Path

import trio

import protocol as wire
from broker import tokens
from broker.client import ClientError, ConnectionLost, open_client

SOFT_ERRORS = (ClientError, ConnectionLost, trio.BrokenResourceError, trio.TooSlowError,
               wire.RemoteProtocolError, OSError)
ROUND_LIMIT_S = 20  # a round taking longer counts as a TooSlowError and the soak goes on


class Soak:
    """The rounds' shared state: the broker's address and secret, tokens, groups, refusals."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.server = f"127.0.0.1:{args.port}"
        self.secret = tokens.load_secret(Path(args.data), create=False)
        self.mix, self.pid = args.mix, args.pid
        self.rng = random.Random(args.seed)
        self.tokens: dict[tuple[str, str], str] = {}
        self.groups: list[str] = []  # open groups anyone may join
        self.errors: dict[str, int] = {}

    def token(self, user: str, role: str = "user") -> str:
        if (user, role) not in self.tokens:
            self.tokens[(user, role)] = tokens.issue(self.secret, user, role, 86400)
        return self.tokens[(user, role)]

    def count(self, exc: BaseException) -> None:
        name = getattr(exc, "name", None) or type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def sample(self, done: int) -> dict:
        status = Path(f"/proc/{self.pid}/status").read_text().splitlines()

        def field(key: str) -> int:
            return int(next(line for line in status if line.startswith(key)).split()[1])
        return {"round": done, "rss_kib": field("VmRSS"), "anon_kib": field("RssAnon"),
                "fds": len(list(Path(f"/proc/{self.pid}/fd").iterdir())),
                "threads": field("Threads"), "errors": dict(self.errors)}


class Raw:
    """A bare protocol client on one TCP stream, for the endings the SDK never makes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = wire.Connection(wire.Role.CLIENT)

    async def send(self, frame) -> None:
        await self.stream.send_all(self.conn.send(frame))

    async def next(self):
        """The next frame, or None at EOF (or a reset)."""
        while (event := self.conn.next_event()) is wire.NEED_DATA:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)
        return None if event is wire.CLOSED else event

    async def hello(self, token: str, device: str, **fields) -> bool:
        """Say hello; whether the broker answered `welcome`."""
        await self.send(wire.Hello(versions=(1,), token=token, device=device, id=0, **fields))
        welcome = await self.next()
        if isinstance(welcome, wire.Welcome):
            self.conn.max_frame_bytes = welcome.max_frame
            return True
        return False

    def reset(self) -> None:
        """Make the close a TCP reset (SO_LINGER 0), as a phone's radio dropping may look."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))


async def sdk_round(soak: Soak, r: int, user: str, device: str) -> None:
    """A device's session through the SDK: sends, groups, reads, acks; then its bye."""
    rng = soak.rng
    deliver = rng.random() < 0.85
    async with open_client(soak.server, soak.token(user), device, reconnect=False,
                           deliver=deliver) as c:
        peer = f"s{rng.randrange(8)}" if soak.mix == "same" else f"r{rng.randrange(200)}"
        res = await c.send(f"hi {r}", to=peer if peer != user else "echo", cid=f"c{r}")
        await c.send(f"again {r}", conv=res.conv)
        x = rng.random()
        if x < 0.15:
            group = await c.create_group(f"g{r}", [peer] if peer != user else [], open=True)
            soak.groups = [*soak.groups[-299:], group]
            await c.typing(group)
            await c.send("in the group", conv=group)
            if peer != user and rng.random() < 0.5:  # hand it over, and leave it
                await c.set_role(group, peer, "admin")
                await c.leave(group)
        elif x < 0.35 and soak.groups:
            group = rng.choice(soak.groups)
            await c.join(group)
            await c.send("joined", conv=group)
            await c.typing(group)
            if rng.random() < 0.7:
                await c.leave(group)
        elif x < 0.5:
            await c.history(res.conv, limit=20)
            await c.receipts(res.conv, res.seq)
            await c.conversations(limit=50)
        elif x < 0.55:
            await c.mute(res.conv, rng.random() < 0.5)
        if deliver:
            with trio.move_on_after(0.2):  # what came meanwhile, if anything
                async for d in c.deliveries():
                    if d.kind == "msg" and rng.random() < 0.5:
                        await c.read(d.conv, d.seq)
                    await c.ack(d.inbox_seq, durable=rng.random() < 0.3)


async def raw_round(soak: Soak, r: int, user: str, device: str, how: str) -> None:
    """A session over a bare stream that ends the way `how` says."""
    host, port = soak.server.rsplit(":", 1)
    c = Raw(await trio.open_tcp_stream(host, int(port)))
    try:
        if how == "before_hello":
            await c.stream.send_all(b"\x00\x00")  # half a length prefix
            return
        if how == "reset_before_hello":
            c.reset()
            return
        if not await c.hello(soak.token(user), device, deliver=soak.rng.random() < 0.8):
            return  # refused (replaced before its welcome, a revoked token)
        await c.send(wire.Send(id=1, to="echo", body=f"raw {r}", cid=f"raw{r}.{device}"))
        await c.send(wire.Ping(id=2))
        if how == "half_frame":
            frame = c.conn.send(wire.Send(id=3, to="echo", body="x" * 200, cid=f"h{r}"))
            await c.stream.send_all(frame[:len(frame) // 2])
        elif how == "reset":
            c.reset()
        elif how == "sit":  # until replaced, or a second
            with trio.move_on_after(1):
                while await c.next() is not None:
                    pass
        else:  # "eof": hang up once the ping is answered
            while not isinstance(await c.next(), wire.Pong | None):
                pass
    finally:
        await trio.aclose_forcefully(c.stream)


async def odd_round(soak: Soak, r: int) -> None:
    """One of the rarer ways (`--mix odd`)."""
    rng, server = soak.rng, soak.server
    user = f"o{rng.randrange(300)}" if rng.random() < 0.7 else f"on{r}"
    x = rng.random()
    if x < 0.1:  # half a hello, then silence until the broker's handshake timeout or 2 s
        host, port = server.rsplit(":", 1)
        c = Raw(await trio.open_tcp_stream(host, int(port)))
        try:
            hello = c.conn.send(wire.Hello(versions=(1,), token=soak.token(user), device="h"))
            await c.stream.send_all(hello[:7])
            with trio.move_on_after(rng.random() * 2):
                await c.next()
        finally:
            await trio.aclose_forcefully(c.stream)
    elif x < 0.2:  # an expired or a foreign token
        bad = tokens.issue(soak.secret, user, "user", -5) if rng.random() < 0.5 else "v1.x.y"
        async with open_client(server, bad, "d", reconnect=False):
            pass
    elif x < 0.3:  # an admin revokes a user, who comes back with the old token
        async with open_client(server, soak.token("admin", "admin"), "console",
                               reconnect=False, deliver=False) as admin:
            await admin.revoke_tokens(user)
        soak.tokens.pop((user, "user"), None)  # the next is minted anew
    elif x < 0.5:  # a new device at the head
        async with open_client(server, soak.token(user), f"head{r}", reconnect=False,
                               start="head") as c:
            await c.send(f"from a new device {r}", to="echo")
    elif x < 0.65:  # a create repeated with its cid, twice at once
        async with open_client(server, soak.token(user), "d", reconnect=False,
                               deliver=False) as c, trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(quietly, soak, partial(c.create_group, f"g{r}", ["echo"],
                                                          cid=f"cr{r % 50}"))
    elif x < 0.85:  # one device connecting 3 times at once: each replaces the one before
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(quietly, soak, raw_round, soak, r, user, "same",
                                   rng.choice(["eof", "reset", "sit"]))
    else:  # a requests-only session sending a burst
        async with open_client(server, soak.token(user), "ro", reconnect=False,
                               deliver=False) as c:
            for i in range(20):
                await c.send(f"burst {i}", to=f"o{rng.randrange(300)}")


async def quietly(soak: Soak, fn, *args) -> None:
    """`fn(*args)`, its refusal or drop counted, not raised."""
    try:
        await fn(*args)
    except SOFT_ERRORS as exc:
        soak.count(exc)


async def one_round(soak: Soak, r: int) -> None:
    rng = soak.rng
    if soak.mix == "odd":
        await odd_round(soak, r)
        return
    if soak.mix == "same":
        user, device = f"s{rng.randrange(8)}", f"d{rng.randrange(4)}"
    elif rng.random() < 0.85:
        user, device = f"n{r}", f"d{rng.randrange(3)}"
    else:
        user, device = f"r{rng.randrange(200)}", f"d{rng.randrange(3)}"
    how = rng.choices(["sdk", "eof", "reset", "half_frame", "before_hello",
                       "reset_before_hello"], [60, 10, 10, 10, 5, 5])[0]
    if how == "sdk":
        await sdk_round(soak, r, user, device)
    else:
        await raw_round(soak, r, user, device, how)


async def echo(soak: Soak) -> None:
    """A service that takes and acks every delivery to it, so that its inbox is drained."""
    async with open_client(soak.server, soak.token("echo", "service"), "bot") as c:
        async for d in c.deliveries():
            await c.ack(d.inbox_seq)


async def run(args: argparse.Namespace) -> None:
    soak = Soak(args)

    async def limited(r: int, room: trio.Semaphore) -> None:
        try:
            with trio.fail_after(ROUND_LIMIT_S):
                await quietly(soak, one_round, soak, r)
        except trio.TooSlowError as exc:
            soak.count(exc)
        finally:
            room.release()

    async with trio.open_nursery() as outer:
        outer.start_soon(echo, soak)
        print(json.dumps(soak.sample(0)), flush=True)
        room = trio.Semaphore(args.concurrency)
        async with trio.open_nursery() as nursery:
            for r in range(1, args.rounds + 1):
                await room.acquire()
                nursery.start_soon(limited, r, room)
                if r % args.sample_every == 0:
                    print(json.dumps(soak.sample(r)), flush=True)
        outer.cancel_scope.cancel()
    print(json.dumps(soak.sample(args.rounds) | {"final": True}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", required=True, help="the broker's data directory (its secret)")
    parser.add_argument("--pid", type=int, required=True, help="the broker's process id")
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--mix", choices=("new", "same", "odd"), default="new")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--sample-every", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
