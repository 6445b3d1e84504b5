"""The hex exchange in docs/PROTOCOL.md §11 decodes to the frames the text says."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import Ack, Connection, Deliver, Hello, Result, Role, Send, Welcome

from .helpers import drain

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_documented_hex_is_what_the_codec_produces():
    """Every hex block of the example exchange equals the real codec's bytes, in order."""
    text = DOC.read_text(encoding="utf-8").split("## 11. Example exchange", 1)[1]
    blocks = [bytes.fromhex(b.replace("\n", " ")) for b in re.findall(r"```\n(.*?)\n```", text,
                                                                      re.S)]
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    expected = [
        (client, Hello(versions=(1,), token="tok-alice", device="phone", id=1)),
        (server, Welcome(1, "s-7f3a", "alice", 1_700_000_000_000, 1 << 20, 15, 0, 0, (), id=1)),
        (client, Send(id=2, cid="m1", body="hi", to="bob")),
        (server, Result(2, "dm:alice:bob", 1, 42, "m1", False)),
        (server, Deliver(2, "msg", "dm:alice:bob", 2, "bob", "yo", "b1", 1_700_000_000_000_123)),
        (client, Ack(upto=2)),
    ]
    assert len(blocks) == len(expected)
    for raw, (conn, frame) in zip(blocks, expected, strict=True):
        out = conn.send(frame)
        assert out == raw
        peer = server if conn is client else client
        peer.receive_data(out)
        assert drain(peer) == [frame]
