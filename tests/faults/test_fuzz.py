"""Bad input over the wire: mutated protocol frames and plain garbage against a live broker.

The broker (a `homing serve` child, so its RSS can be read from /proc) must stay up, answer
only with typed errors (never `internal`), keep serving a well-behaved pair of clients at the
same time, and keep its memory bounded.
"""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import trio

import protocol as wire
from protocol.frames import to_wire
from tests.faults.checker import History, stop_and_check
from tests.faults.conftest import raw_bytes_exchange, scaled
from tests.procs import rss_kib

MiB = 1024

SAMPLES = [
    wire.Hello(versions=(1,), token="t", device="fz", id=1),
    wire.Send(id=2, cid="fz-1", body="hello", to="fz-target"),
    wire.Send(id=3, cid="fz-2", body=b"\x00bin", conv="grp:0123456789abcdef"),
    wire.Ack(upto=1),
    wire.Ack(upto=5, id=4),
    wire.Read(conv="dm:a:b", upto=1, id=5),
    wire.History(id=6, conv="dm:fz:fz-target", limit=10),
    wire.Create(id=7, kind="group", name="fz", members=("a", "b")),
    wire.Invite(id=8, conv="grp:0123456789abcdef", user="fz"),
    wire.Join(id=9, conv="grp:0123456789abcdef"),
    wire.Leave(id=10, conv="grp:0123456789abcdef"),
    wire.Subscribe(id=11, conv="chn:0123456789abcdef"),
    wire.Receipts(id=12, conv="dm:a:b", seq=1),
    wire.Presence(id=13, conv="dm:a:b"),
    wire.Members(id=18, conv="grp:0123456789abcdef"),
    wire.SetRole(id=19, conv="grp:0123456789abcdef", user="fz", role="admin"),
    wire.Convs(id=20, after="dm:a:b", limit=2),
    wire.Remove(id=21, conv="grp:0123456789abcdef", user="fz"),
    wire.Typing(conv="dm:a:b"),
    wire.Mute(id=14, conv="dm:a:b", muted=True),
    wire.Revoke(id=22, user="fz-target"),
    wire.Stats(id=23, user="fz-target", device="d1"),
    wire.Ping(id=15),
    wire.Pong(id=16),
    wire.Deliver(inbox_seq=1, kind="msg", conv="dm:a:b", seq=1, sender="a", body="x",
                 cid="c", ts=1),
    wire.Result(id=17, conv="dm:a:b", seq=1, lsn=1, cid="c", dup=False),
    wire.Error(code=7, name="invalid", message="m", id=1, close=False),
]
# Every client frame type but bye (which just ends the connection), and some server frames.
assert {type(s) for s in SAMPLES} >= set(wire.CLIENT_FRAMES.values()) - {wire.Bye}
assert {type(s) for s in SAMPLES} <= set(wire.ALL_FRAMES)

WEIRD = [None, True, -1, 2**64 - 1, 2**63, 1.5, "", "x" * 5000, b"\xff" * 10, [], [1, [2, [3]]],
         {}, {"t": "send"}, "dm:", "grp:zz", "\x00", "é" * 200]


def mutate(rng: random.Random, frame) -> bytes:
    """One mutated frame's bytes, built from a real frame."""
    d = dict(to_wire(frame))
    how = rng.randrange(9)
    if how == 0:  # a field of the wrong type or value
        d[rng.choice(list(d))] = rng.choice(WEIRD)
    elif how == 1:  # a required field missing
        d.pop(rng.choice([k for k in d if k != "t"] or ["t"]), None)
    elif how == 2:  # unknown keys, unknown type
        d[rng.choice(["zz", "t"])] = rng.choice(["zap", "x" * 70, "SEND", "send "])
    elif how == 3:  # non-str keys
        d[rng.choice([1, b"k", None])] = 1
    body = msgpack.packb(d, use_bin_type=True)
    data = struct.pack(">I", len(body)) + body
    if how == 4:  # flipped bytes
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        data = bytes(buf)
    elif how == 5:  # a huge or lying length
        data = struct.pack(">I", rng.choice([0, 2**32 - 1, 2**31, 1 << 21, len(body) + 9])) + body
    elif how == 6:  # truncated
        data = data[: rng.randrange(len(data))]
    elif how == 7:  # not a map
        data = wire.encode_frame({"t": "ping"})[:4] + msgpack.packb(
            rng.choice([[1, 2], 7, "send", None]))
        data = struct.pack(">I", len(data) - 4) + data[4:]
    return data


def error_names(data: bytes) -> list[str]:
    """The error names in a server's byte stream (best effort: stops at what it cannot parse)."""
    conn = wire.Connection(wire.Role.CLIENT)
    conn.receive_data(data)
    names = []
    try:
        conn.send(wire.Hello(versions=(1,), token="t", device="d"))
        while True:
            ev = conn.next_event()
            if ev is wire.NEED_DATA or ev is wire.CLOSED:
                break
            if isinstance(ev, wire.Error):
                names.append(ev.name)
    except wire.ProtocolError:
        pass
    return names


async def _steady_pair(bp, history, stop, sent):
    """alice sends to bob every few ms while the attack runs; bob receives and acks."""
    async with bp.client("alice") as alice, bp.client("bob") as bob:
        async def listen():
            async for d in bob.deliveries():
                if d.sender == "alice":
                    history.deliver("bob", "d1", bob, d)
                await bob.ack(d.inbox_seq)

        async with trio.open_nursery() as n:
            n.start_soon(listen)
            i = 0
            while not stop.is_set():
                i += 1
                history.attempt("alice", f"p{i}", f"steady {i}", ("bob",))
                r = await alice.send(f"steady {i}", to="bob", cid=f"p{i}")
                history.accept("alice", f"p{i}", r.conv, r.seq)
                sent.append(trio.current_time())
                await trio.sleep(0.01)
            with trio.fail_after(10):
                while any(history.missing().values()):
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()


async def run_fuzz(bp, tally, connections: int, seed: int) -> None:
    rng = random.Random(seed)
    history, stop, sent = History(), trio.Event(), []
    seen_errors: set[str] = set()
    limit = trio.Semaphore(32)
    rss0 = rss_kib(bp.pid)

    async def one(k: int) -> None:
        async with limit:
            frames = []
            if rng.random() < 0.6:
                frames.append(wire.encode_frame(to_wire(wire.Hello(
                    versions=(1,), token=bp.token(f"fz{k % 8}"), device=f"d{k}", id=1))))
            for _ in range(rng.randint(1, 12)):
                frames.append(mutate(rng, rng.choice(SAMPLES)))
            out = await raw_bytes_exchange(bp.server, b"".join(frames), read_s=0.5)
            seen_errors.update(error_names(out))
            tally.add("fuzzer: mutated frames sent", len(frames))

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(_steady_pair, bp, history, stop, sent)
            async with trio.open_nursery() as attackers:
                for k in range(connections):
                    attackers.start_soon(one, k)
            tally.add("fuzzer: connections", connections)
            stop.set()
    assert bp.alive()
    growth = rss_kib(bp.pid) - rss0
    assert growth < 64 * MiB, f"RSS grew by {growth} KiB"
    assert "internal" not in seen_errors, seen_errors
    assert len(sent) > 10
    await stop_and_check(bp, history)


async def test_fuzzed_frames_leave_the_broker_serving(broker_process, tally):
    """Mutated protocol frames on many connections: typed errors, others unaffected."""
    await run_fuzz(broker_process(), tally, connections=300, seed=1)


@pytest.mark.long
async def test_fuzzed_frames_long(broker_process, tally):
    """The fuzzer over HOMING_LONG_SCALE x 5,000 connections."""
    await run_fuzz(broker_process(), tally, connections=scaled(5000, 300), seed=2)


def garbage(rng: random.Random, k: int, token: str) -> tuple[str, bytes]:
    kind = k % 8
    if kind == 0:
        return "random bytes", rng.randbytes(rng.randint(1, 4096))
    if kind == 1:
        return "4 GiB length prefix", b"\xff\xff\xff\xff" + rng.randbytes(64)
    if kind == 2:
        return "invalid msgpack", struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    if kind == 3:
        body = msgpack.packb(rng.choice([[1, 2, 3], 42, "hello", None, b"\x00"]))
        return "non-map frame", struct.pack(">I", len(body)) + body
    if kind == 4:
        return "frame before hello", wire.encode_frame({"t": "send", "id": 1, "cid": "x",
                                                        "body": "x", "to": "bob"})
    if kind == 5:
        return "unknown type before hello", wire.encode_frame({"t": "zap", "id": 1})
    if kind == 6:
        hello = wire.encode_frame(to_wire(wire.Hello(versions=(1,), token=token, device="g")))
        return "unknown type after hello", hello + wire.encode_frame({"t": "zap", "id": 2}) * 5
    return "zero-length frame", b"\x00\x00\x00\x00"


async def test_garbage_on_the_port(broker_process, tally):
    """300 connections of garbage: broker alive, RSS growth < 100 MiB, a real client works."""
    bp = broker_process()
    rng = random.Random(3)
    rss0 = rss_kib(bp.pid)
    answers: dict[str, set[str]] = {}
    limit = trio.Semaphore(50)

    async def one(k: int) -> None:
        async with limit:
            name, data = garbage(rng, k, bp.token("gg"))
            out = await raw_bytes_exchange(bp.server, data, read_s=1.0)
            answers.setdefault(name, set()).update(error_names(out) or ["(closed)"])
            tally.add(f"garbage: {name}")

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for k in range(300):
                n.start_soon(one, k)
        assert bp.alive()
        growth = rss_kib(bp.pid) - rss0
        assert growth < 100 * MiB, f"RSS grew by {growth} KiB"
        async with bp.client("alice") as alice, bp.client("bob") as bob:
            r = await alice.send("still here", to="bob")
            d = await bob.deliveries().receive()
            assert (d.conv, d.seq, d.body) == (r.conv, r.seq, "still here")
    assert answers["4 GiB length prefix"] == {"too_large"}
    assert answers["invalid msgpack"] == {"bad_frame"}
    assert answers["non-map frame"] == {"bad_frame"}
    assert answers["frame before hello"] == {"bad_frame"}
    assert "internal" not in set().union(*answers.values())
