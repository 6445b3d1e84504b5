"""Every request type with fields of the wrong type or odd values, as raw frames, against a live
broker (a `homing serve` child): each is answered with a typed error or its reply, never
`internal`, and nothing reaches a rule it was not checked for (no `command_internal_error`).

The rules no longer turn a TypeError or ValueError into `invalid` (since 2026-12-05): a field
the protocol layer lets through with a value a rule was not written for would now be a
`command_internal_error` answered `internal`. Hypothesis draws each field from values a rule
may take (real conversations of the sender's, other users) and values it may not (wrong types,
out of range, nil, lone surrogates), for every request type.
"""

from __future__ import annotations

import socket
import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as wire
from protocol.frames import CLIENT_FRAMES, to_wire

FIELDS_ODD = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
              1.5, float("nan"), "", "x" * 300, "\x00", "a\x00b", "é" * 200, "\ud800",
              "ok\udcff", b"", b"\xff\xfe", [], ["bob"], ["bob", "bob"], ["fz"], [1], [None],
              ["\ud800"], [["bob"]], ["u"] * 1001, {}, {"a": 1}, "member", "admin", "owner",
              "group", "channel", "direct", "newest", "oldest", "dm:", "grp:", "dm:fz:fz",
              "dm:bob:fz", "dm:fz:bob", "grp:zz", "chn:zz", "grp:" + "a" * 200, "bob", "fz",
              "BOB", "carol", "nobody", "a" * 64, "a" * 65]


def _raw(d: dict) -> bytes:
    body = msgpack.packb(d, use_bin_type=True, unicode_errors="surrogatepass")
    return struct.pack(">I", len(body)) + body


class Wire:
    """A blocking raw client: frames out, frames back until the pong of a ping."""

    def __init__(self, server: str, token: str, device: str) -> None:
        host, port = server.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = wire.Connection(wire.Role.CLIENT)
        self.sock.sendall(self.conn.send(wire.Hello(versions=(1,), token=token, device=device,
                                                    id=0)))
        welcome = self.next()
        assert isinstance(welcome, wire.Welcome), welcome
        self.conn.max_frame_bytes = welcome.max_frame

    def next(self):
        while True:
            event = self.conn.next_event()
            if event is wire.CLOSED:
                return None
            if event is not wire.NEED_DATA:
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def exchange(self, data: bytes, request_id: object = None, ping_id: int = 2**40) -> list:
        """Send `data`, then a ping; every frame until its pong and, if `request_id` is a
        request's id, until the frame answering it (an error without an id answers a request
        whose id was bad), or the close."""
        self.sock.sendall(data + _raw({"t": "ping", "id": ping_id}))
        frames, ponged = [], False
        answered = not (type(request_id) is int and 0 <= request_id < 2**63)
        while (frame := self.next()) is not None:
            if isinstance(frame, wire.Pong) and frame.id == ping_id:
                ponged = True
            else:
                frames.append(frame)
                if getattr(frame, "id", None) == request_id or isinstance(frame, wire.Error):
                    answered = True
                if isinstance(frame, wire.Error) and frame.close:
                    break
            if ponged and answered:
                break
        return frames

    def close(self) -> None:
        self.sock.close()


def _request(t: str, fields: dict, conv: str | None) -> dict:
    """A frame of type `t`: each field the fuzzer drew, `conv` for any it left out that names
    one (so that the rules get past their membership checks and look at the rest)."""
    d = {"t": t, "id": 1}
    for name in CLIENT_FRAMES[t]._fields:
        if name in fields:
            if fields[name] is not _OMIT:
                d[name] = fields[name]
        elif name in ("conv", "after") and conv is not None:
            d[name] = conv
    if t == "revoke" and d.get("user") == "fz":  # (the admin would cut the fuzzer off)
        d["user"] = "carol"
    return d


_OMIT = object()
_TYPES = sorted(set(CLIENT_FRAMES) - {"hello", "bye"})


@st.composite
def requests(draw, convs: list[str]) -> tuple[str, dict]:
    t = draw(st.sampled_from(_TYPES))
    names = list(CLIENT_FRAMES[t]._fields)
    pool = st.sampled_from(FIELDS_ODD + convs + [_OMIT])
    fields = draw(st.dictionaries(st.sampled_from(names), pool, max_size=len(names)))
    conv = draw(st.sampled_from([*convs, None]))
    role = draw(st.sampled_from(["user", "user", "admin"]))
    return role, _request(t, fields, conv)


def _setup(bp) -> list[str]:
    """fz's conversations: a group and a channel it owns (bob and carol in them), a direct one."""
    c = Wire(bp.server, bp.token("fz"), "setup")
    convs = []
    for i, kind in enumerate(("group", "channel")):
        create = wire.Create(id=i + 1, kind=kind, name=kind, members=("bob", "carol"), open=True)
        [created] = c.exchange(_raw(to_wire(create)), i + 1)
        convs.append(created.conv)
    [sent] = c.exchange(_raw(to_wire(wire.Send(id=3, cid="s", body="hi", to="bob"))), 3)
    convs.append(sent.conv)
    c.close()
    return convs


def test_no_field_of_any_request_reaches_internal(broker_process, tally):
    bp = broker_process()
    convs = _setup(bp)
    clients: dict[str, Wire] = {}
    seen: set[str] = set()
    count = [0]

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(requests(convs))
    def check(drawn) -> None:
        role, frame = drawn
        c = clients.get(role)
        if c is None:
            c = clients[role] = Wire(bp.server, bp.token("fz", role), f"fz-{role}")
        # (typing, pong and an ack without an id get no reply)
        answered = frame["t"] not in ("typing", "ack", "pong") or (
            frame["t"] == "ack" and "id" in frame)
        frames = c.exchange(_raw(frame), frame.get("id") if answered else None)
        if frames and isinstance(frames[-1], wire.Error) and frames[-1].close:
            clients.pop(role).close()  # (a frame the protocol refuses closes the connection)
        errors = [f.name for f in frames if isinstance(f, wire.Error)]
        seen.update(errors)
        count[0] += 1
        assert "internal" not in errors, (frame, frames)

    try:
        check()
    finally:
        for c in clients.values():
            c.close()
    assert bp.alive()
    bugs = [e for e in bp.log_events() if e.get("event") in (
        "command_internal_error", "batch_internal_error", "command_failed")]
    assert not bugs, bugs
    assert "invalid" in seen and "forbidden" in seen, seen  # the rules were reached
    tally.add("field fuzzer: requests", count[0])
