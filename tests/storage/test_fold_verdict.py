"""The replay refuses every record `audit verify` refuses, in verify's words: a property over
generated logs of records near homing's own (each field of its kind or of another, text of
bytes no UTF-8 holds, keys twice, a bin key beside a str key of one name, five to seven
fields), folded by the Python replay and, where storage/_fold.c is built, the compiled one.
The hand-picked cases are in tests/storage/test_fold_compiled.py (VERIFY_FAILS); these found a
message of seven fields, which both replays applied while verify failed it (until 2026-12-07).
"""

from __future__ import annotations

import hypothesis.strategies as st
import msgpack
from hypothesis import HealthCheck, given, settings

from storage.errors import CorruptLog
from storage.fold import fold
from storage.log import record_fault
from storage.memory_tables import MemoryTables
from storage.projections import key2
from storage.records import EVENT_TYPES, MAX_TS_US

# Text packed as bytes no UTF-8 holds (a byte none starts with, a character cut at its end, a
# surrogate), where it stands in any text.
UNREADABLE = {"BAD": b"\xff\xfe\x01", "CUT": b"ab\xc3", "SUR": b"\xed\xa0\x80"}
CONVS = ["grp:a", "grp:" + "x" * 12 + "\u00e9", "dm:ann:bob"]

odd = st.sampled_from([None, 5, -1, 1.5, True, False, b"grp:a", [1], {"k": "BAD"}, "BAD",
                       "0123456789CUT", "c-SUR", -(1 << 63), ""])
texts = st.sampled_from(["ann", "bob", "d1", "\u00e4nn", "0123456789abcdef\U0001f600"])
good = {
    "conv": st.sampled_from(CONVS), "cid": st.sampled_from(["c1", "c2", "c\u00e9"]),
    "body": st.sampled_from(["hi", b"\xff\x00", "h\u00ef" * 5, ""]),
    "kind": st.sampled_from(["group", "channel", "dm"]), "user": texts,
    "role": st.sampled_from(["member", "admin"]), "upto": st.integers(0, 3),
    "muted": st.booleans(), "before": st.integers(0, 2000), "name": texts,
    "open": st.booleans(), "to": st.lists(texts, max_size=2),
}
NEEDS = {"message.accepted": ["conv", "cid", "body"], "conv.created": ["conv", "kind"],
         "member.added": ["conv", "user", "role"], "member.removed": ["conv", "user"],
         "member.role_set": ["conv", "user", "role"], "delivery.acked": ["upto"],
         "read.marked": ["conv", "upto"], "mute.set": ["conv", "muted"],
         "tokens.revoked": ["user", "before"]}
extra_key = st.sampled_from([*sorted(good), b"conv", b"cid", b"body", "BAD"])


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def data_map(draw, type_: object) -> bytes:
    """The data of an event of `type_`: its fields, one now and then left out, of another kind
    or twice (the last winning), and other keys; packed pair by pair, so a key may repeat."""
    names = list(NEEDS.get(type_, ["conv"]) if type(type_) is str else ["conv"])
    if names and draw(st.integers(0, 9)) == 0:
        del names[draw(st.integers(0, len(names) - 1))]
    names += draw(st.lists(extra_key, max_size=2 if draw(st.integers(0, 3)) == 0 else 0))
    pairs = []
    for name in names:
        kind = good.get(name, odd)
        value = draw(odd) if draw(st.integers(0, 12)) == 0 else draw(kind)
        pairs.append(_pack(name) + _pack(value))
    return bytes([0x80 | len(pairs)]) + b"".join(draw(st.permutations(pairs)))


@st.composite
def record(draw, lsn: int) -> bytes:
    """The body of a record at `lsn`: most fields of their kind, some of another."""
    def field(kind):
        return draw(odd) if draw(st.integers(0, 15)) == 0 else draw(kind)

    type_ = field(st.sampled_from(["message.accepted"] * 4 + sorted(EVENT_TYPES)))
    ts = field(st.sampled_from([0, 1001, MAX_TS_US]))
    head = [_pack(v) for v in (lsn, ts, type_, field(texts), field(texts))]
    count = draw(st.sampled_from([6] * 12 + [5, 7]))
    fields = [*head, draw(data_map(type_)), _pack(0)][:count]
    body = bytes([0x90 | count]) + b"".join(fields)
    for text, raw in UNREADABLE.items():
        body = body.replace(text.encode(), raw)
    return body


@st.composite
def log(draw) -> list[bytes]:
    return [draw(record(lsn)) for lsn in range(1, draw(st.integers(1, 4)) + 1)]


def _folded(bodies: list[bytes], compiled: bool) -> tuple:
    """How a fold of `bodies` (onto tables where ann and bob are members of every conv) ends:
    its result and rows, or the LSN and words it refused them with."""
    tables = MemoryTables()
    for conv in CONVS:
        for user in ("ann", "bob"):
            tables.member[key2(conv, user)] = b"member"
            tables.user_conv[key2(user, conv)] = b""
    try:
        return "applied", fold(tables, [(0, bytes(32) + b) for b in bodies],
                               compiled=compiled), tables.items()
    except CorruptLog as exc:
        return "refused", exc.lsn, exc.reason


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log())
def test_every_record_verify_fails_is_refused_in_its_words(bodies):
    """A fold applies no record verify fails: it refuses the first at the latest, in verify's
    words (one it refuses before, verify passed: data naming a conv no one made, say); the
    compiled replay (where built, else the Python one again) ends as the Python one does."""
    python = _folded(bodies, compiled=False)
    assert _folded(bodies, compiled=True) == python
    faults = [record_fault(lsn, body) for lsn, body in enumerate(bodies, 1)]
    first = next((f for f in faults if f is not None), None)
    if first is None:
        return
    assert python[0] == "refused" and python[1] <= first.lsn, (python, first)
    if python[1] == first.lsn:
        assert python[2] == first.reason
