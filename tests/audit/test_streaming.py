"""`audit inbox` and `audit trace` read the log without holding it: same answers as before.

Since 2026-12-05 `inbox` replays only the user's rows and `trace` tracks only the message's
conversation (docs/OPERATIONS.md, "Auditing", Cost). Their answers must be those of the whole
replay and of the event-by-event scan they replaced, kept here as the reference, on random logs
written by the real rules (the command mix of tests/storage/test_model.py).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from storage import audit
from storage import records as r
from storage.commands import (
    Ack,
    CreateConv,
    Invite,
    Leave,
    MarkRead,
    Remove,
    RevokeTokens,
    SendMessage,
    SetMute,
    SetRole,
)
from storage.records import Event
from storage.store import Store

USERS = ("ann", "bob", "cat", "dan", "eve", "fay")
SEEDS = range(8)


def whole_inbox(store: Store, user: str, to_lsn: int | None) -> dict:
    """`audit inbox` as it was answered before: from a replay of every row."""
    tables, lsn, ts = audit.replay(store, to_lsn)
    return audit.inbox_of(store, user, tables, lsn, ts)


def reference_trace(store: Store, first: Event) -> dict:
    """`audit trace` of message `first` as it was answered before: every event decoded, the
    members of every conversation tracked, then every later event looked at."""
    counts: Counter[str] = Counter()
    members: dict[str, set[str]] = {}
    for ev in audit.iter_events(store):
        if ev.type == r.MEMBER_ADDED:
            members.setdefault(ev.data["conv"], set()).add(ev.data["user"])
        elif ev.type == r.MEMBER_REMOVED:
            members.get(ev.data["conv"], set()).discard(ev.data["user"])
        elif ev.type == r.MESSAGE_ACCEPTED:
            counts[ev.data["conv"]] += 1
            if ev.lsn == first.lsn:
                break
    conv, seq = first.data["conv"], counts[first.data["conv"]]
    recipients = sorted(members.get(conv, set()) - {first.user})
    inbox_seq = {u: audit._inbox_seq_of(store, u, first.lsn) for u in recipients}
    devices: dict[str, dict[str, int]] = {u: {} for u in recipients}
    read: dict[str, int] = {}
    now = set(members.get(conv, set()))
    for ev in audit.iter_events(store, audit.EventFilter(from_lsn=first.lsn + 1)):
        if ev.type in (r.MEMBER_ADDED, r.MEMBER_REMOVED) and ev.data["conv"] == conv:
            (now.add if ev.type == r.MEMBER_ADDED else now.discard)(ev.data["user"])
        if ev.user not in devices:
            continue
        if ev.type == r.DELIVERY_ACKED:
            want = inbox_seq[ev.user]
            if want is not None and ev.data["upto"] >= want:
                devices[ev.user].setdefault(ev.device, ev.ts_us)
        elif (ev.type == r.READ_MARKED and ev.user not in read and ev.data["conv"] == conv
              and ev.data["upto"] >= seq):
            read[ev.user] = ev.ts_us
        elif (ev.type == r.MESSAGE_ACCEPTED and ev.user not in read and ev.data["conv"] == conv
              and ev.user in now):
            read[ev.user] = ev.ts_us  # a post moves its sender's marks (since 2026-12-06)
    marks = {u: [*devices[u].values(), *([read[u]] if u in read else [])] for u in recipients}
    out = {u: {"delivered": audit.ts_iso(min(marks[u])) if marks[u] else None,
               "devices": {d: audit.ts_iso(t) for d, t in sorted(devices[u].items())},
               "read": audit.ts_iso(read[u]) if u in read else None} for u in recipients}
    return {"conv": conv, "seq": seq, "from": first.user, "lsn": first.lsn,
            "ts": audit.ts_iso(first.ts_us), "recipients": out}


def random_store(seed: int, path: str, commands: int = 600) -> Store:
    """A store whose log the rules wrote from `commands` random commands, in batches of 1 to 8:
    groups and direct messages, joins and leaves, acks of two devices (up to the inbox head or
    short of it), read marks, mutes, roles, revocations; some of them refused."""
    rnd = random.Random(seed)
    store = Store.open(path, map_size=1 << 22)
    groups: list[str] = []
    for _ in range(0, commands, 4):
        batch = []
        for _ in range(rnd.randint(1, 8)):
            u, v = rnd.choice(USERS), rnd.choice(USERS)
            g = rnd.choice(groups) if groups else "grp:0000000000000000"
            x = rnd.random()
            if x < 0.05 or not groups:
                batch.append(CreateConv(u, "d1", "user", "group", "g", False,
                                        tuple(rnd.sample(USERS, rnd.randint(0, 4)))))
            elif x < 0.35:
                batch.append(SendMessage(u, rnd.choice(("d1", "d2")), "user",
                                         f"c{rnd.randrange(10**6)}", "hi", conv=g))
            elif x < 0.5:
                batch.append(SendMessage(u, "d1", "user", f"c{rnd.randrange(10**6)}",
                                         b"\x00bin", to=v))
            elif x < 0.68:
                head = store.inbox_head(u)
                batch.append(Ack(u, rnd.choice(("d1", "d2")), "user",
                                 rnd.choice((head, rnd.randint(0, head)))))
            elif x < 0.78:
                batch.append(MarkRead(u, "d1", "user", g, rnd.randint(0, 40)))
            elif x < 0.85:
                batch.append(Invite(u, "d1", "user", g, v, rnd.choice(("member", "admin"))))
            elif x < 0.89:
                batch.append(Leave(u, "d1", "user", g))
            elif x < 0.92:
                batch.append(Remove(u, "d1", rnd.choice(("user", "admin")), g, v))
            elif x < 0.95:
                batch.append(SetRole(u, "d1", "admin", g, v, rnd.choice(("member", "admin"))))
            elif x < 0.98:
                batch.append(SetMute(u, "d1", "user", g, rnd.random() < 0.7))
            else:
                batch.append(RevokeTokens("eve", "d1", "admin", v))
        for out in store.execute(batch):
            conv = (out.reply or {}).get("conv")
            if conv and conv.startswith("grp:") and conv not in groups:
                groups.append(conv)
    return store


@pytest.mark.parametrize("seed", SEEDS)
def test_inbox_of_one_user_equals_the_whole_replay(tmp_path, seed):
    """Every user's inbox, unread counts, mutes and device cursors, at the end and at points
    along the log, are those a replay of every row gives."""
    store = random_store(seed, str(tmp_path / "data"))
    try:
        last = store.last_lsn()
        assert sum(len(audit.inbox_at(store, u)["inbox"]) for u in USERS) > 100
        for to_lsn in (0, 1, last // 3, last // 2, last - 1, None):
            for user in (*USERS, "nobody"):
                assert audit.inbox_at(store, user, to_lsn) == whole_inbox(store, user, to_lsn), (
                    user, to_lsn)
    finally:
        store.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_of_every_message_equals_the_event_by_event_scan(tmp_path, seed):
    """`trace --conv C --seq N` and `trace --cid ID --from U` of every logged message answer what
    the scan of every event answered."""
    store = random_store(seed, str(tmp_path / "data"))
    try:
        seqs: Counter[str] = Counter()
        acked = 0
        for ev in audit.iter_events(store, audit.EventFilter(types=(r.MESSAGE_ACCEPTED,))):
            seqs[ev.data["conv"]] += 1
            want = reference_trace(store, ev)
            acked += sum(len(one["devices"]) for one in want["recipients"].values())
            assert audit.trace(store, ev.data["conv"], seqs[ev.data["conv"]]) == want
            assert audit.trace_cid(store, ev.user, ev.data["cid"]) == want
        assert acked > 20
    finally:
        store.close()


def test_inbox_of_one_user_with_acks_from_before_they_carried_convs(tmp_path):
    """An ack logged before acks carried `convs` makes the replay read the acking user's inbox
    (`projections.acked_convs`): the user's own rows, which a replay for that user keeps."""
    store = Store.open(str(tmp_path / "data"))
    try:
        dm, grp = {"conv": "dm:alice:bob"}, {"conv": "grp:1"}
        store.log.append([
            (1, "conv.created", "alice", "p", dm | {"kind": "direct", "name": None,
                                                    "open": False}),
            (1, "member.added", "alice", "p", dm | {"user": "alice", "role": "member"}),
            (1, "member.added", "alice", "p", dm | {"user": "bob", "role": "member"}),
            (1, "conv.created", "carol", "p", grp | {"kind": "group", "name": "g",
                                                     "open": False}),
            (1, "member.added", "carol", "p", grp | {"user": "carol", "role": "owner"}),
            (1, "member.added", "carol", "p", grp | {"user": "bob", "role": "member"}),
            (2, "message.accepted", "alice", "p", dm | {"cid": "c1", "body": "hi"}),
            (2, "message.accepted", "carol", "p", grp | {"cid": "c2", "body": "all"}),
            (3, "delivery.acked", "bob", "b", {"upto": 2}),
            (3, "delivery.acked", "bob", "t", {"upto": 3}),
            (4, "message.accepted", "bob", "b", grp | {"cid": "c3", "body": "re"}),
            (5, "delivery.acked", "carol", "p", {"upto": 1}),
            (5, "read.marked", "carol", "p", grp | {"upto": 2}),
        ])
        store.rebuild()
        for user in ("alice", "bob", "carol", "nobody"):
            for to_lsn in (None, 9, 10, 12):
                assert audit.inbox_at(store, user, to_lsn) == whole_inbox(store, user, to_lsn)
        assert audit.inbox_at(store, "bob", None)["delivered"] == {"b": 2, "t": 3}
    finally:
        store.close()
