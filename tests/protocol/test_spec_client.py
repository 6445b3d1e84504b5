"""A client written from docs/PROTOCOL.md alone, against a real broker.

Nothing here imports the project's `protocol/` package or its SDK (broker/client.py): frames are
built and read with `msgpack` and a 4-byte big-endian length, as the spec says, so a place where
the spec is not enough to talk to the broker shows up here as a failing test. Each test names
the section it checks. The first tests drive an in-process broker with trio; the `test_wire_*`
ones, at the end, are a third party's blocking client (`socket` and `msgpack` alone) against
`homing serve` run as a child process, with tokens from `homing token` (docs/CLI.md).
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import time
from contextlib import asynccontextmanager, suppress

import msgpack
import pytest
import trio

from tests.harness import running_broker
from tests.procs import free_port, homing_cmd

UINT_MAX = (1 << 63) - 1
PREFIX = struct.Struct(">I")  # §2.1: uint32, big-endian


def _cut(buffer: bytearray, n: int) -> bytes | None:
    """The first `n` bytes of `buffer`, taken out of it, or None while fewer have come."""
    if len(buffer) < n:
        return None
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


def _more(buffer: bytearray, data: bytes) -> None:
    """Add what the socket gave to `buffer`; nothing means the peer's EOF."""
    if not data:
        raise EOFError(bytes(buffer))
    buffer += data


class SpecClient:
    """One TCP connection speaking §2's framing: no validation but the spec's own."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.aside: list[dict] = []  # frames read while waiting for another

    @classmethod
    async def connect(cls, h) -> SpecClient:
        host, port = h.server.rsplit(":", 1)
        client = cls(await trio.open_tcp_stream(host, int(port)))
        h.spec_clients.append(client)
        return client

    async def send(self, **frame) -> None:
        body = msgpack.packb(frame, use_bin_type=True)
        await self.send_raw(PREFIX.pack(len(body)) + body)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _take(self, n: int) -> bytes:
        while (out := _cut(self.buffer, n)) is None:
            _more(self.buffer, await self.stream.receive_some(65536))
        return out

    async def recv(self, timeout: float = 3.0) -> dict:
        with trio.fail_after(timeout):
            (n,) = PREFIX.unpack(await self._take(4))
            frame = msgpack.unpackb(await self._take(n), raw=False)
        assert isinstance(frame, dict) and isinstance(frame["t"], str), frame
        return frame

    async def take(self, match, timeout: float = 3.0) -> dict:
        """The first frame, set aside or still to come, that `match`es; the others are set
        aside for later (§5.1: replies and pushes interleave, replies in any order)."""
        with trio.fail_after(timeout):
            while True:
                for i, frame in enumerate(self.aside):
                    if match(frame):
                        return self.aside.pop(i)
                self.aside.append(await self.recv())

    async def recv_t(self, t: str) -> dict:
        return await self.take(lambda f: f["t"] == t)

    async def reply(self, rid: int) -> dict:
        """The reply to request `rid` (pushes carry no `id`)."""
        return await self.take(lambda f: f.get("id") == rid)

    async def until(self, want: dict) -> dict:
        return await self.take(lambda f: f == want)

    async def deliveries(self, n: int) -> list[int]:
        """The inbox_seqs of the next `n` deliveries, checking that no more come at once (the
        window)."""
        got = [(await self.recv_t("deliver"))["inbox_seq"] for _ in range(n)]
        await self.quiet(0.1)
        assert [f for f in self.aside if f["t"] == "deliver"] == []
        return got

    async def quiet(self, seconds: float = 0.2) -> list[dict]:
        """Whatever arrives within `seconds`, set aside."""
        with trio.move_on_after(seconds):
            while True:
                self.aside.append(await self.recv())
        return self.aside

    async def closing_error(self) -> dict:
        """The connection's last frame, a closing `error`, followed by EOF (§6)."""
        frame = await self.recv()
        assert frame["t"] == "error" and frame["close"] is True, frame
        with pytest.raises(EOFError):
            await self.recv()
        return frame

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def broker(tmp_path, **overrides):
    """`running_broker`, whose connections the test opened are closed before it stops (a
    stopping broker waits a while for its clients to close)."""
    async with running_broker(tmp_path, **overrides) as h:
        h.spec_clients = []
        try:
            yield h
        finally:
            for client in h.spec_clients:
                await client.aclose()


async def hello(h, user: str, device: str = "d1", **fields) -> tuple[SpecClient, dict]:
    c = await SpecClient.connect(h)
    await c.send(t="hello", versions=[1], token=h.token(user), device=device, **fields)
    return c, await c.recv()


def is_uint(v) -> bool:
    return type(v) is int and 0 <= v <= UINT_MAX


def check_error(frame: dict, name: str, code: int) -> None:
    """§5.3's `error` row and §7's registry."""
    assert frame["t"] == "error" and frame["name"] == name and frame["code"] == code, frame
    assert isinstance(frame["message"], str) and len(frame["message"]) <= 1024


async def test_handshake_and_welcome_fields(tmp_path):
    """§2.1 framing by hand, §3.1 version negotiation, §3.2 max_frame, §5.3 welcome."""
    async with broker(tmp_path) as h:
        c = await SpecClient.connect(h)
        body = msgpack.packb({"t": "hello", "versions": [7, 1, 2], "token": h.token("alice"),
                              "device": "phone", "id": 1, "caps": ["x-future"],
                              "max_frame": 1 << 40}, use_bin_type=True)
        await c.send_raw(len(body).to_bytes(4, "big") + body)
        prefix = await c._take(4)
        w = msgpack.unpackb(await c._take(int.from_bytes(prefix, "big")), raw=False)
        assert w["t"] == "welcome" and w["id"] == 1 and w["version"] == 1
        assert isinstance(w["session"], str) and 1 <= len(w["session"]) <= 128
        assert w["user"] == "alice" and w["role"] == "user"
        assert abs(w["time"] - time.time() * 1000) < 60_000  # milliseconds
        assert w["max_frame"] == h.config.max_frame_bytes  # min(offer, server limit)
        assert w["heartbeat"] == h.config.heartbeat_s and w["acked"] == 0 and w["head"] == 0
        assert w["caps"] == ["create_cid", "start_head", "requests_only", "receipts_paged",
                             "members_paged"]
        assert w["max_body"] == h.config.max_body_bytes
        assert w["receipt_audience"] == h.config.receipt_audience_max
        assert all(is_uint(w[k]) for k in ("version", "time", "max_frame", "heartbeat", "acked",
                                           "head", "max_body", "receipt_audience"))

        small, w = await hello(h, "alice", "tablet", max_frame=10)  # no id: none echoed
        assert w["t"] == "welcome" and "id" not in w and w["max_frame"] == 1024
        # From the frame after welcome on, the agreed 1024 holds: the broker refuses a longer
        # frame from its prefix alone, without waiting for a body that never comes.
        await small.send_raw(PREFIX.pack(1025))
        check_error(await small.closing_error(), "too_large", 2)


async def test_handshake_failures_close(tmp_path):
    """§3: every error in place of welcome closes; §3.2: 64 KiB before welcome; §3 timeouts."""
    async with broker(tmp_path, handshake_timeout_s=0.3, max_handshakes=2) as h:
        c = await SpecClient.connect(h)
        await c.send(t="hello", versions=[2, 3], token=h.token("u"), device="d", id=5)
        err = await c.closing_error()
        check_error(err, "unsupported_version", 3)
        assert err["id"] == 5

        c = await SpecClient.connect(h)
        await c.send(t="hello", versions=[1], token="not-a-token", device="d", id=6)
        check_error(await c.closing_error(), "unauthorized", 4)

        c = await SpecClient.connect(h)
        await c.send(t="hello", versions=[], token=h.token("u"), device="d", id=7)
        check_error(await c.closing_error(), "invalid", 7)

        for first in ("ping", "no-such-type"):  # before welcome, not unknown_type: closing
            c = await SpecClient.connect(h)
            await c.send(t=first, id=8)
            check_error(await c.closing_error(), "bad_frame", 1)

        c = await SpecClient.connect(h)
        await c.send_raw(PREFIX.pack(64 * 1024 + 1))
        check_error(await c.closing_error(), "too_large", 2)

        silent = await SpecClient.connect(h)
        await silent.send_raw(PREFIX.pack(64 * 1024) + b"\x81")  # 64 KiB is allowed: it waits
        other = await SpecClient.connect(h)
        third = await SpecClient.connect(h)  # past --max-handshakes: refused at once
        check_error(await third.closing_error(), "limit_exceeded", 15)
        check_error(await silent.closing_error(), "timeout", 14)
        check_error(await other.closing_error(), "timeout", 14)


def framed(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


@pytest.mark.parametrize("raw", [
    PREFIX.pack(0),  # N = 0
    framed(b"\x90"),  # not a map
    framed(b"\x80\x80"),  # two values
    framed(b"\x81\xa2id\x01"),  # no "t"
    framed(b"\x82\xa1t\xa4ping\x01\x02"),  # an int key
    framed(b"\x82\xa1t\xa4ping\xa1x\xa2\xff\xfe"),  # a str value that is not UTF-8
], ids=["empty", "array", "two-values", "no-t", "int-key", "bad-utf8"])
async def test_malformed_frames_close(tmp_path, raw):
    """§2.3: each is a closing bad_frame, once OPEN too."""
    async with broker(tmp_path) as h:
        c, _ = await hello(h, "alice")
        await c.send_raw(raw)
        check_error(await c.closing_error(), "bad_frame", 1)


async def test_frame_values_and_eof_mid_frame(tmp_path):
    """§2.2's value count (the frame's own map not counted) and §2.3's EOF inside a frame."""
    async with broker(tmp_path) as h:
        c, _ = await hello(h, "alice")
        limit = h.config.max_frame_values
        await c.send(t="ping", id=1, pad=[0] * (limit - 6))  # 3 keys, 3 values, the items
        assert await c.recv() == {"t": "pong", "id": 1}
        await c.send(t="ping", id=2, pad=[0] * (limit - 5))
        check_error(await c.closing_error(), "bad_frame", 1)

        c, _ = await hello(h, "alice")
        await c.send_raw(PREFIX.pack(100) + b"\x82")
        await c.stream.send_eof()
        check_error(await c.closing_error(), "bad_frame", 1)


async def test_send_results_dups_and_errors(tmp_path):
    """§5.2 send, §5.3 result, §9 idempotent send and create, §6 errors that keep it open."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        await a.send(t="send", id=1, cid="m1", body="hi", to="bob")
        r = await a.reply(1)
        assert r == {"t": "result", "id": 1, "conv": "dm:alice:bob", "seq": 1, "lsn": r["lsn"],
                     "cid": "m1", "dup": False} and is_uint(r["lsn"])
        await a.send(t="send", id=2, cid="m1", body="other", to="bob")
        assert await a.reply(2) == {**r, "id": 2, "dup": True}

        await a.send(t="create", id=3, kind="group", name="g", members=["bob"], cid="c1")
        created = await a.reply(3)
        assert created["t"] == "created" and created["conv"].startswith("grp:")
        assert not created.get("dup", False)  # optional, false by default
        group = created["conv"]
        await a.send(t="create", id=4, kind="group", name="again", cid="c1")
        assert await a.reply(4) == {"t": "created", "id": 4, "conv": group, "dup": True}
        await a.send(t="send", id=5, cid="g1", body=b"\x00\xffbin", conv=group)
        assert (await a.reply(5))["seq"] == 1

        cases = [
            ({"cid": "g1", "body": "x", "to": "bob"}, "conflict", 8),  # a cid names one message
            ({"cid": "z", "body": "x", "to": "bob", "conv": group}, "invalid", 7),
            ({"cid": "z", "body": "x"}, "invalid", 7),
            ({"cid": "z", "body": "x", "to": "alice"}, "invalid", 7),  # to oneself
            ({"cid": "z", "body": "x" * (h.config.max_body_bytes + 1), "to": "bob"}, "invalid", 7),
            ({"cid": "z", "body": "x", "conv": "grp:0000000000000000"}, "forbidden", 5),
        ]
        for rid, (fields, name, code) in enumerate(cases, 10):
            await a.send(t="send", id=rid, **fields)
            err = await a.reply(rid)
            check_error(err, name, code)
            assert not err.get("close", False)

        await a.send(t="frob", id=30)
        check_error(await a.reply(30), "unknown_type", 12)
        await a.send(t="send", id="x", cid="z", body="x", to="bob")  # no valid id: none echoed
        err = await a.recv_t("error")
        check_error(err, "invalid", 7)
        assert "id" not in err and not err.get("close", False)
        # Still open; unknown keys are ignored, floats and ext types in them too (§2.1, §3.3).
        await a.send(t="ping", id=31, x=1.5, y=msgpack.ExtType(5, b"e"), z={"n": [None]})
        assert await a.recv_t("pong") == {"t": "pong", "id": 31}


async def test_deliver_ack_window_and_redelivery(tmp_path):
    """§9: window, cumulative acks, own sends skipped, redelivery from welcome.acked."""
    async with broker(tmp_path, window=2) as h:
        b, _ = await hello(h, "bob")
        await b.send(t="send", id=1, cid="b1", body="first", to="alice")  # bob's inbox entry 1
        await b.reply(1)
        a, _ = await hello(h, "alice")
        for i in range(3):
            await a.send(t="send", id=i, cid=f"a{i}", body=f"m{i}", to="bob")
            await a.reply(i)
        d = await b.recv_t("deliver")  # bob's own entry 1 is skipped
        assert d == {"t": "deliver", "inbox_seq": 2, "kind": "msg", "conv": "dm:alice:bob",
                     "seq": 2, "from": "alice", "body": "m0", "cid": "a0", "ts": d["ts"]}
        assert is_uint(d["ts"]) and await b.deliveries(1) == [3]  # at most window unacked
        await b.send(t="ack", upto=2, id=5)
        await b.until({"t": "ok", "id": 5})
        assert await b.deliveries(1) == [4]
        await b.send(t="ack", upto=99)  # past the head, no id: an error without id, still open
        err = await b.recv_t("error")
        check_error(err, "invalid", 7)
        assert "id" not in err and not err.get("close", False)
        await b.aclose()

        b, w = await hello(h, "bob")
        assert (w["acked"], w["head"]) == (2, 4)
        assert await b.deliveries(2) == [3, 4]
        await b.send(t="ack", upto=4)
        other, w = await hello(h, "bob", "laptop")  # another device has its own cursor
        assert w["acked"] == 0
        assert await other.deliveries(2) == [1, 2]

        again, _ = await hello(h, "bob", "laptop")  # one device, one session
        assert (await other.recv_t("bye"))["reason"]
        with pytest.raises(EOFError):
            await other.recv()
        # The client's bye: the broker closes without answering it. The deliveries it sent the
        # new session before reading the bye were in flight (§6); a client stops reading.
        await again.send(t="bye")
        with pytest.raises(EOFError):
            while True:
                assert (await again.recv())["t"] == "deliver"


async def test_read_marks_and_receipts(tmp_path):
    """§9 receipts: marks are conversation seqs (not inbox_seqs); a read reaches every device
    of the reader, the one that read included; §5.2 receipts."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        b, _ = await hello(h, "bob")
        b2, _ = await hello(h, "bob", "d2")
        await a.send(t="send", id=1, cid="dm", body="x", to="bob")  # bob's inbox entry 1
        await a.reply(1)
        await a.send(t="create", id=2, kind="group", name="g", members=["bob"])
        group = (await a.reply(2))["conv"]  # bob's entry 2: added
        for i in range(2):
            await a.send(t="send", id=3 + i, cid=f"g{i}", body="x", conv=group)  # entries 3, 4
            await a.reply(3 + i)
        await b.send(t="ack", upto=4)
        await a.until({"t": "receipt", "conv": group, "user": "bob", "delivered": 2})

        await b.send(t="read", id=6, conv=group, upto=99)  # kept as the conversation's last
        await b.until({"t": "ok", "id": 6, "conv": group})
        mine = {"t": "receipt", "conv": group, "user": "bob", "read": 2}
        for c in (b, b2, a):
            await c.until(mine)

        await a.send(t="receipts", id=7, conv=group, seq=2)
        assert await a.reply(7) == {"t": "receipt_list", "id": 7, "conv": group, "seq": 2,
                                    "delivered": ["bob"], "read": ["bob"], "unread": []}
        await a.send(t="receipts", id=8, conv=group, seq=9)
        check_error(await a.reply(8), "not_found", 6)
        await b.send(t="presence", id=9, conv=group)  # §5.3: the asker too, sorted by id
        assert await b.reply(9) == {"t": "presence_list", "id": 9, "conv": group,
                                    "online": ["alice", "bob"]}


async def test_history_paging(tmp_path):
    """§5.2 history: before/after, limit, order, more."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        for i in range(5):
            await a.send(t="send", id=i, cid=f"m{i}", body=f"b{i}", to="bob")
            await a.reply(i)
        seqs, before, pages = [], None, 0
        while True:
            query = {"before": before} if before else {}
            await a.send(t="history", id=10 + pages, conv="dm:alice:bob", limit=2, **query)
            page = await a.reply(10 + pages)
            assert page["t"] == "page" and page["conv"] == "dm:alice:bob"
            m = page["messages"][0]
            assert set(m) == {"seq", "from", "body", "cid", "ts", "lsn"} and m["from"] == "alice"
            seqs += [m["seq"] for m in page["messages"]]
            pages += 1
            if not page["more"]:
                break
            before = page["messages"][-1]["seq"]
        assert seqs == [5, 4, 3, 2, 1] and pages == 3
        await a.send(t="history", id=20, conv="dm:alice:bob", after=1, before=5, order="oldest")
        page = await a.reply(20)
        assert [m["seq"] for m in page["messages"]] == [2, 3, 4] and page["more"] is False
        # Newest first above a bound: the next page keeps `after` and sets `before`.
        await a.send(t="history", id=22, conv="dm:alice:bob", after=1, limit=2)
        page = await a.reply(22)
        assert [m["seq"] for m in page["messages"]] == [5, 4] and page["more"] is True
        await a.send(t="history", id=23, conv="dm:alice:bob", after=1, before=4, limit=2)
        page = await a.reply(23)
        assert [m["seq"] for m in page["messages"]] == [3, 2] and page["more"] is False
        await a.send(t="history", id=21, conv="dm:alice:bob", limit=201)
        check_error(await a.reply(21), "invalid", 7)


async def test_ping_pong_and_idle_timeout(tmp_path):
    """§8: pong echoes the id; no whole frame for the idle timeout closes with timeout, bytes
    of an unfinished frame not counting."""
    async with broker(tmp_path, heartbeat_s=1, idle_timeout_s=1.0) as h:
        a, w = await hello(h, "alice")
        assert w["heartbeat"] == 1
        await a.send(t="ping", id=3)
        assert await a.recv() == {"t": "pong", "id": 3}
        await a.send(t="ping")
        assert await a.recv() == {"t": "pong"}
        await a.send(t="pong", id=4)  # an unasked pong is ignored
        start = trio.current_time()
        await a.send_raw(PREFIX.pack(10_000) + b"\x81")

        async def dribble() -> None:  # a byte of the unfinished frame every 0.2 s
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await trio.sleep(0.2)
                    await a.send_raw(b"\xa0")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            with trio.fail_after(20):  # bytes counted as frames would keep it open for 50 s
                check_error(await a.closing_error(), "timeout", 14)
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start >= 0.9  # not before the timeout


async def test_delivery_over_agreed_max_frame(tmp_path):
    """§3.2: an entry whose deliver would not fit the agreed max_frame closes with too_large
    and stays undelivered."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        await a.send(t="send", id=1, cid="big", body="x" * 2000, to="bob")
        await a.reply(1)
        b, w = await hello(h, "bob", max_frame=1024)
        assert w["max_frame"] == 1024 and w["head"] == 1
        check_error(await b.closing_error(), "too_large", 2)
        b, w = await hello(h, "bob")
        assert w["acked"] == 0
        assert (await b.recv_t("deliver"))["body"] == "x" * 2000


async def test_history_pages_fit_max_frame_and_admin_reads(tmp_path):
    """§5.2: a page holds only the messages that fit the agreed max_frame (`more` true), and a
    reply that cannot fit at all is a `limit_exceeded` that leaves the connection open; §10:
    an admin token reads `history` and `members` of a conversation it is not in."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        for i in range(5):
            await a.send(t="send", id=i, cid=f"m{i}", body="y" * 300, to="bob")
            await a.reply(i)
        await a.send(t="send", id=9, cid="big", body="x" * 2000, to="bob")
        await a.reply(9)
        op = await SpecClient.connect(h)
        await op.send(t="hello", versions=[1], token=h.token("op", "admin"), device="ops",
                      max_frame=1024)
        w = await op.recv()
        assert (w["role"], w["max_frame"]) == ("admin", 1024)
        await op.send(t="history", id=1, conv="dm:alice:bob", before=6, limit=10)
        page = await op.reply(1)
        assert [m["seq"] for m in page["messages"]] == [5, 4] and page["more"] is True
        await op.send(t="history", id=2, conv="dm:alice:bob", limit=10)
        err = await op.reply(2)
        check_error(err, "limit_exceeded", 15)
        assert not err.get("close", False)
        await op.send(t="members", id=3, conv="dm:alice:bob")
        assert await op.reply(3) == {"t": "member_list", "id": 3, "conv": "dm:alice:bob",
                                     "kind": "direct", "owners": [], "admins": [],
                                     "members": ["alice", "bob"]}


async def test_stopping_broker_closes_with_shutting_down(tmp_path):
    """§6: a stopping broker sends a closing `shutting_down` without an `id`, to a connection
    before its hello too (not `bye`, which only a replaced session gets)."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        waiting = await SpecClient.connect(h)
        await a.send(t="ping", id=1)
        assert await a.recv() == {"t": "pong", "id": 1}
        h.broker.shutdown()
        for c in (a, waiting):
            err = await c.closing_error()
            check_error(err, "shutting_down", 17)
            assert "id" not in err


async def test_pipelined_requests_each_answered_once(tmp_path):
    """§5.1: requests written in one go are each answered once, matched by `id`, whatever the
    order of the replies (a pong or a page may overtake the results of sends written before
    it); the sends take effect in the order written, their seqs rising with it."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        # The conversation exists first: a history asked of it with the send that makes it
        # would be answered before that send's commit, `forbidden` (no such conversation).
        await a.send(t="send", id=99, cid="p0", body="b0", to="bob")
        await a.reply(99)
        frames = [{"t": "send", "id": i, "cid": f"p{i}", "body": f"b{i}", "to": "bob"}
                  for i in range(1, 6)]
        frames += [{"t": "history", "id": 6, "conv": "dm:alice:bob"}, {"t": "ping", "id": 7},
                   {"t": "frob", "id": 8}, {"t": "send", "id": 9, "cid": "x", "body": 5,
                                            "to": "bob"}]
        await a.send_raw(b"".join(framed(msgpack.packb(f, use_bin_type=True)) for f in frames))
        replies: dict[int, dict] = {}
        with trio.fail_after(5):
            while len(replies) < len(frames):
                f = await a.recv()
                if "id" in f:  # pushes carry none
                    assert f["id"] not in replies, (f, replies)
                    replies[f["id"]] = f
        assert [replies[i]["t"] for i in range(1, 6)] == ["result"] * 5
        assert [replies[i]["seq"] for i in range(1, 6)] == [2, 3, 4, 5, 6]
        assert replies[6]["t"] == "page" and replies[7] == {"t": "pong", "id": 7}
        check_error(replies[8], "unknown_type", 12)
        check_error(replies[9], "invalid", 7)
        await a.send(t="ping", id=10)  # no second reply to any of them comes before this one
        assert (await a.take(lambda f: "id" in f)) == {"t": "pong", "id": 10}


async def test_device_that_only_sends_resumes_past_its_own_sends(tmp_path):
    """§9: a device that never acked, having only sent (and had its results), resumes at the
    head: its cursor passed its own sends; the user's other device is sent them."""
    async with broker(tmp_path) as h:
        bot, _ = await hello(h, "alice", "bot")
        await bot.send(t="send", id=1, cid="m1", body="one", to="bob")  # alice's entry 1
        await bot.send(t="create", id=2, kind="group", name="g", members=["bob"])  # none
        await bot.reply(1)
        group = (await bot.reply(2))["conv"]
        await bot.send(t="send", id=3, cid="g1", body="two", conv=group)  # entry 2
        assert (await bot.reply(3))["seq"] == 1
        await bot.send(t="bye")
        with pytest.raises(EOFError):  # §6: the broker answers a bye with its close alone
            await bot.recv()
        bot, w = await hello(h, "alice", "bot")
        assert (w["acked"], w["head"]) == (2, 2)
        phone, w = await hello(h, "alice", "phone")
        assert (w["acked"], w["head"]) == (0, 2)
        assert await phone.deliveries(2) == [1, 2]


async def test_bye_leaves_replies_unwritten_but_commands_done(tmp_path):
    """§6: the replies not written when the broker reads a client's bye are never sent, and the
    commands it read before the bye are carried out: the send, sent again, is a dup."""
    async with broker(tmp_path) as h:
        a, _ = await hello(h, "alice")
        await a.send_raw(b"".join(framed(msgpack.packb(f, use_bin_type=True)) for f in (
            {"t": "send", "id": 1, "cid": "last", "body": "last words", "to": "bob"},
            {"t": "ping", "id": 2}, {"t": "bye"})))
        with pytest.raises(EOFError):
            while True:  # a pong, maybe a result (should its commit beat the bye): no bye
                f = await a.recv()
                assert f in ({"t": "pong", "id": 2}, {**f, "t": "result", "id": 1}), f
        a, _ = await hello(h, "alice")
        await a.send(t="send", id=1, cid="last", body="last words", to="bob")
        r = await a.reply(1)
        assert (r["t"], r["seq"], r["dup"]) == ("result", 1, True)


# --- A third party's client: a blocking socket and msgpack, against `homing serve` ----------
#
# What a shop's own service does: it starts the broker as docs/CLI.md says (`homing serve`,
# tokens from `homing token`), and speaks docs/PROTOCOL.md over a plain socket. Nothing of this
# repository's Python runs in the client.


class WireClient:
    """One blocking TCP connection speaking §2's framing, with §5.1's matching by `id`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = bytearray()
        self.aside: list[dict] = []
        self.max_frame = 64 * 1024  # §3.2: before welcome

    def send(self, **frame) -> None:
        body = msgpack.packb(frame, use_bin_type=True)
        self.sock.sendall(PREFIX.pack(len(body)) + body)

    def _take(self, n: int) -> bytes:
        while (out := _cut(self.buffer, n)) is None:
            _more(self.buffer, self.sock.recv(65536))
        return out

    def recv(self) -> dict:
        (n,) = PREFIX.unpack(self._take(4))
        assert 0 < n <= self.max_frame, n  # §2.2: a receiver checks N first
        frame = msgpack.unpackb(self._take(n), raw=False)
        assert isinstance(frame, dict) and isinstance(frame.get("t"), str), frame
        return frame

    def take(self, match) -> dict:
        """The first frame, set aside or new, that `match`es; the rest are set aside."""
        for i, frame in enumerate(self.aside):
            if match(frame):
                return self.aside.pop(i)
        while True:
            frame = self.recv()
            if match(frame):
                return frame
            self.aside.append(frame)

    def reply(self, rid: int) -> dict:
        return self.take(lambda f: f.get("id") == rid)

    def push(self, t: str, **fields) -> dict:
        return self.take(lambda f: f["t"] == t and "id" not in f
                         and all(f.get(k) == v for k, v in fields.items()))

    def hello(self, token: str, device: str, **fields) -> dict:
        self.send(t="hello", versions=[1], token=token, device=device, id=0, **fields)
        welcome = self.recv()
        assert welcome["t"] == "welcome", welcome
        self.max_frame = welcome["max_frame"]
        return welcome

    def closing_error(self) -> dict:
        """The last frame, a closing `error`, then EOF (§6)."""
        frame = self.take(lambda f: f["t"] == "error")
        assert frame.get("close") is True, frame
        with pytest.raises(EOFError):
            self.recv()
        return frame

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`homing serve` on a temp data dir, and `homing token` tokens for its users (docs/CLI.md,
    "Running and tokens")."""
    data = tmp_path_factory.mktemp("spec-client") / "data"
    users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "op"]
    minted = subprocess.run([*homing_cmd(), "token", *users, "--data", str(data)],
                            capture_output=True, text=True, timeout=30, check=True)
    tokens = dict(zip(users, minted.stdout.split(), strict=True))
    port = free_port()
    opened: list[WireClient] = []

    def connect(user: str, device: str = "d1", **fields) -> tuple[WireClient, dict]:
        c = WireClient(port)
        opened.append(c)
        return c, c.hello(tokens[user], device, **fields)

    with open(data.parent / "serve.log", "wb") as log:
        serve = subprocess.Popen([*homing_cmd(), "serve", "--data", str(data), "--port",
                                  str(port), "--window", "4", "--heartbeat", "5"],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_listening(serve, port)
            yield connect
        finally:
            for c in opened:
                c.close()
            serve.send_signal(signal.SIGTERM)
            try:
                assert serve.wait(20) == 0  # a clean stop (docs/CLI.md)
            finally:
                serve.kill()  # no-op once it exited


def _wait_listening(serve: subprocess.Popen, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert serve.poll() is None and time.monotonic() < deadline, "broker did not start"
            time.sleep(0.05)


def test_wire_direct_message_delivery_ack_and_receipts(served):
    """§5.2 send, §5.3 result and deliver, §9 ack and receipts, over a socket to `homing serve`."""
    alice, w = served("alice", "phone")
    assert (w["version"], w["user"], w["acked"], w["head"]) == (1, "alice", 0, 0)
    bob, _ = served("bob", "phone")
    bob_tablet, _ = served("bob", "tablet")

    alice.send(t="send", id=1, cid="m1", body="hi", to="bob")
    r = alice.reply(1)
    assert r == {"t": "result", "id": 1, "conv": "dm:alice:bob", "seq": 1, "lsn": r["lsn"],
                 "cid": "m1", "dup": False} and is_uint(r["lsn"])
    alice.send(t="send", id=2, cid="m2", body=b"\x00\xff", to="bob")  # §4.1: bin stays bin
    r2 = alice.reply(2)
    assert r2["seq"] == 2 and r2["lsn"] > r["lsn"]  # §5.3: lsn, the log's position
    alice.send(t="send", id=20, cid="m1", body="hi", to="bob")  # a dup: the first's fields
    assert alice.reply(20) == {**r, "id": 20, "dup": True}

    for device in (bob, bob_tablet):
        d1, d2 = device.push("deliver"), device.push("deliver")
        assert d1 == {"t": "deliver", "inbox_seq": 1, "kind": "msg", "conv": "dm:alice:bob",
                      "seq": 1, "from": "alice", "body": "hi", "cid": "m1", "ts": d1["ts"]}
        assert (d2["inbox_seq"], d2["seq"], d2["body"], d2["cid"]) == (2, 2, b"\x00\xff", "m2")
        assert is_uint(d1["ts"]) and d1["ts"] <= d2["ts"]

    bob.send(t="ack", upto=2, id=3)
    assert bob.reply(3) == {"t": "ok", "id": 3}  # an ack's ok names no conv
    # The delivered mark moved: a receipt push in conversation seqs, to the sender.
    assert alice.push("receipt", user="bob", delivered=2)["conv"] == "dm:alice:bob"

    bob.send(t="read", id=4, conv="dm:alice:bob", upto=1)
    assert bob.reply(4) == {"t": "ok", "id": 4, "conv": "dm:alice:bob"}
    mark = {"conv": "dm:alice:bob", "user": "bob", "read": 1}
    for c in (alice, bob, bob_tablet):  # the reader's own devices too
        assert c.push("receipt", **mark) == {"t": "receipt", **mark}

    alice.send(t="receipts", id=5, conv="dm:alice:bob", seq=2)
    assert alice.reply(5) == {"t": "receipt_list", "id": 5, "conv": "dm:alice:bob", "seq": 2,
                              "delivered": ["bob"], "read": [], "unread": ["bob"]}
    alice.send(t="history", id=6, conv="dm:alice:bob", order="oldest")
    page = alice.reply(6)
    assert [(m["seq"], m["body"], m["lsn"]) for m in page["messages"]] == [
        (1, "hi", r["lsn"]), (2, b"\x00\xff", r2["lsn"])]

    bob.send(t="ack", upto=1, id=7)  # §5.2: below the last ack, nothing changes: ok
    assert bob.reply(7) == {"t": "ok", "id": 7}
    # §9: a read ahead of the delivered mark moves both, two pushes, delivered first; the
    # tablet's ack of what the phone acked already moves nothing (marks are per user).
    alice.send(t="send", id=8, cid="m3", body="three", to="bob")
    # §5.3: bob's ack and read that moved his marks are events logged between m2 and m3.
    assert alice.reply(8)["lsn"] >= r2["lsn"] + 3
    bob_tablet.send(t="ack", upto=2, id=9)
    bob_tablet.reply(9)
    bob.send(t="read", id=10, conv="dm:alice:bob", upto=3)
    bob.reply(10)
    alice.send(t="ping", id=11)
    alice.reply(11)
    moved = [f for f in alice.aside if f["t"] == "receipt"]
    assert moved == [{"t": "receipt", "conv": "dm:alice:bob", "user": "bob", "delivered": 3},
                     {"t": "receipt", "conv": "dm:alice:bob", "user": "bob", "read": 3}]


def test_wire_group_create_invite_post_fan_out(served):
    """§5.2 create and invite, §9 `added` entries and fan-out to every member's device."""
    carol, _ = served("carol")
    dave, _ = served("dave")
    carol.send(t="create", id=1, kind="group", name="order 7", members=["dave"], cid="o7")
    created = carol.reply(1)
    group = created["conv"]
    assert created == {"t": "created", "id": 1, "conv": group}  # dup absent: false
    assert group.startswith("grp:") and len(group) == 20
    carol.send(t="invite", id=2, conv=group, user="erin")  # §9: never connected yet
    assert carol.reply(2) == {"t": "ok", "id": 2, "conv": group}
    erin, w = served("erin")
    assert (w["acked"], w["head"]) == (0, 1)
    for member in (dave, erin):
        added = member.push("deliver", conv=group)
        assert added == {"t": "deliver", "inbox_seq": added["inbox_seq"], "kind": "added",
                         "conv": group, "seq": 0, "from": "carol", "body": None, "cid": None,
                         "ts": added["ts"]}

    carol.send(t="send", id=3, cid="p1", body="courier at the shop", conv=group)
    r = carol.reply(3)
    assert (r["conv"], r["seq"], r["dup"]) == (group, 1, False)
    for member in (dave, erin):
        d = member.push("deliver", conv=group, kind="msg")
        assert (d["seq"], d["from"], d["body"], d["cid"]) == (1, "carol", "courier at the shop",
                                                               "p1")
    dave.send(t="read", id=9, conv=group, upto=1)  # no ack first: delivered, then read
    dave.reply(9)
    assert carol.push("receipt") == {"t": "receipt", "conv": group, "user": "dave",
                                     "delivered": 1}
    assert carol.push("receipt") == {"t": "receipt", "conv": group, "user": "dave", "read": 1}
    carol.send(t="members", id=4, conv=group)
    assert carol.reply(4) == {"t": "member_list", "id": 4, "conv": group, "kind": "group",
                              "owners": ["carol"], "admins": [], "members": ["dave", "erin"],
                              "name": "order 7"}
    carol.send(t="ping", id=5)
    carol.reply(5)
    assert [f for f in carol.aside if f["t"] == "deliver"] == []  # not its own post


def test_wire_errors_keep_the_connection_but_too_large_closes_it(served):
    """§6: a bad request is a typed error with its id and the connection goes on; §2.2: a
    frame over max_frame is a closing too_large, the body sent or not."""
    frank, w = served("frank", max_frame=4096)
    assert w["max_frame"] == 4096
    frank.send(t="send", id=1, body="no cid", to="bob")
    err = frank.reply(1)
    check_error(err, "invalid", 7)
    assert not err.get("close", False) and "cid" in err["message"]
    frank.send(t="history", id=2, conv="grp:0123456789abcdef")
    check_error(frank.reply(2), "forbidden", 5)
    frank.send(t="frob", id=3)
    check_error(frank.reply(3), "unknown_type", 12)
    frank.send(t="ack", upto=99)  # no id: an error without one
    err = frank.push("error")
    check_error(err, "invalid", 7)
    frank.send(t="ping", id=4)
    assert frank.reply(4) == {"t": "pong", "id": 4}
    # A uint in any msgpack int form (a Go encoder's int64, say) is a uint (§4.1).
    frank.sock.sendall(framed(b"\x82\xa1t\xa4ping\xa2id\xd3" + (41).to_bytes(8, "big")))
    assert frank.reply(41) == {"t": "pong", "id": 41}

    body = msgpack.packb({"t": "send", "id": 5, "cid": "big", "body": "x" * 5000, "to": "bob"},
                         use_bin_type=True)
    with suppress(OSError):  # the broker may close before it has read the body
        frank.sock.sendall(PREFIX.pack(len(body)) + body)
    err = frank.closing_error()
    check_error(err, "too_large", 2)
    assert "id" not in err

    # §6: a body far past what the server reads and drops after its error (1 MiB): the write
    # fails, and the closing error is read all the same.
    c, _ = served("frank", "uploader", max_frame=4096)
    with pytest.raises(OSError):
        c.sock.sendall(PREFIX.pack(16 << 20) + bytes(16 << 20))
    check_error(c.closing_error(), "too_large", 2)


def test_wire_resume_after_reconnect_from_the_acked_position(served):
    """§9: unacked deliveries come again on the next session, same inbox_seqs, in order,
    right after welcome.acked; at most `window` unacked at a time."""
    grace, _ = served("grace")
    for i in range(6):
        grace.send(t="send", id=i, cid=f"r{i}", body=f"m{i}", to="op")
    assert [grace.reply(i)["seq"] for i in range(6)] == [1, 2, 3, 4, 5, 6]

    def session(expect_acked: int, count: int) -> tuple[WireClient, list[tuple]]:
        c, w = served("op", "worker")
        assert (w["acked"], w["head"]) == (expect_acked, 6)
        got = [c.push("deliver") for _ in range(count)]
        c.send(t="ping", id=99)  # the window is full: nothing more before the pong
        c.reply(99)
        assert [f for f in c.aside if f["t"] == "deliver"] == []
        return c, [(d["inbox_seq"], d["seq"], d["body"]) for d in got]

    first, got = session(0, 4)  # --window 4
    assert got == [(i, i, f"m{i - 1}") for i in range(1, 5)]
    first.close()  # no ack
    again, got_again = session(0, 4)
    assert got_again == got
    again.send(t="ack", upto=2, id=1)
    again.reply(1)
    assert [again.push("deliver")["inbox_seq"] for _ in range(2)] == [5, 6]
    again.close()
    _, got = session(2, 4)
    assert got == [(i, i, f"m{i - 1}") for i in range(3, 7)]
