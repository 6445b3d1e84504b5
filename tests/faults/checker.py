"""A total-queue checker in the spirit of Jepsen's: what clients saw against what the store holds.

Clients record into a `History`: every send attempted (sender, cid, body, the users who should
receive it), every send they saw accepted (its `result`), and every delivery each device saw
(grouped by session: one SDK client object, or one raw connection). After the faults, with the
broker stopped (or quiet), `check(history, store)` asserts:

1. every accepted send appears exactly once in each recipient's inbox in the store, and was
   delivered to each recipient at least once (unless `require_delivery=False`);
2. nothing was stored or delivered that was never attempted, and bodies are what was sent;
3. results agree with the store: one (conv, seq) per (sender, cid), no two cids on one seq;
4. per conversation: seqs in the store are gapless 1..last_seq; within one session a device sees
   conv seqs strictly increasing per conversation and inbox_seqs strictly increasing;
5. the log verifies (digest chain, LSN continuity) and the projections equal a fresh replay.

It returns a `Report` of counts so tests can record what they covered.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]  # (sender, cid)


@dataclass
class Attempt:
    sender: str
    cid: str
    body: Any
    recipients: tuple[str, ...]


@dataclass
class Seen:
    """One delivery as a device saw it."""

    user: str
    device: str
    session: Any
    inbox_seq: int
    conv: str
    seq: int
    sender: str
    cid: str | None
    body: Any
    kind: str = "msg"


@dataclass
class History:
    attempts: dict[Key, Attempt] = field(default_factory=dict)
    accepted: dict[Key, tuple[str, int]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def attempt(self, sender: str, cid: str, body: Any, recipients) -> None:
        self.attempts[(sender, cid)] = Attempt(sender, cid, body, tuple(recipients))

    def accept(self, sender: str, cid: str, conv: str, seq: int) -> None:
        key = (sender, cid)
        before = self.accepted.get(key)
        if before is not None and before != (conv, seq):
            raise CheckFailed(f"{key} accepted twice with different places {before} {(conv, seq)}")
        self.accepted[key] = (conv, seq)

    def deliver(self, user: str, device: str, session: Any, d: Any) -> None:
        """Record a `protocol.Deliver` frame seen by `user`/`device` in `session`."""
        self.seen.append(Seen(user, device, session, d.inbox_seq, d.conv, d.seq, d.sender, d.cid,
                              d.body, d.kind))

    def delivered_to(self, user: str) -> set[Key]:
        return {(s.sender, s.cid) for s in self.seen if s.user == user and s.kind == "msg"}

    def missing(self) -> dict[str, int]:
        """Per recipient, how many accepted sends it has not seen delivered yet."""
        out = {}
        users = {u for a in self.attempts.values() for u in a.recipients}
        for user in users:
            got = self.delivered_to(user)
            want = {k for k in self.accepted if user in self.attempts[k].recipients}
            out[user] = len(want - got)
        return out


class CheckFailed(AssertionError):
    """The history and the store disagree."""


@dataclass
class Report:
    attempted: int
    accepted: int
    deliveries: int
    redeliveries: int
    records: int


def _fail(problems: list[str]) -> None:
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckFailed("\n".join(problems[:20]) + more)


def inbox(store, user: str) -> list[Any]:
    """Every inbox entry of `user`, in order."""
    out, after = [], 0
    while True:
        items = store.inbox_after(user, after, 1000)
        if not items:
            return out
        out.extend(items)
        after = items[-1].inbox_seq


def conv_messages(store, conv: str) -> list[dict]:
    out, after = [], 0
    while True:
        page, more = store.history(conv, after=after, limit=1000, newest_first=False)
        out.extend(page)
        if not more or not page:
            return out
        after = page[-1]["seq"]


def check(history: History, store, *, require_delivery: bool = True) -> Report:
    """Assert the properties in the module docstring; raise CheckFailed with every problem."""
    problems: list[str] = []
    attempts, accepted = history.attempts, history.accepted
    recipients = sorted({u for a in attempts.values() for u in a.recipients})

    # 1 and 2, store side: each recipient's inbox.
    for user in recipients:
        counts: Counter[Key] = Counter()
        for it in inbox(store, user):
            if it.kind != "msg":
                continue
            key = (it.sender, it.cid)
            counts[key] += 1
            a = attempts.get(key)
            if a is None:
                problems.append(f"{user}'s inbox holds {key} (conv {it.conv} seq {it.seq}), "
                                "which nobody attempted")
            elif a.body != it.body:
                problems.append(f"{user}'s inbox has {key} with body {it.body!r}, sent {a.body!r}")
            elif key in accepted and accepted[key] != (it.conv, it.seq):
                problems.append(f"{key} accepted as {accepted[key]} but stored as "
                                f"{(it.conv, it.seq)}")
        for key, n in counts.items():
            if n > 1:
                problems.append(f"{key} is in {user}'s inbox {n} times")
        for key in accepted:
            if user in attempts[key].recipients and counts[key] != 1:
                problems.append(f"accepted {key} is in {user}'s inbox {counts[key]} times")

    # 1 and 2, client side: deliveries.
    seen_by_user: dict[str, set[Key]] = defaultdict(set)
    for s in history.seen:
        if s.kind != "msg":
            continue
        key = (s.sender, s.cid)
        seen_by_user[s.user].add(key)
        a = attempts.get(key)
        if a is None:
            problems.append(f"{s.user}/{s.device} was delivered {key}, never attempted")
        elif a.body != s.body:
            problems.append(f"{s.user}/{s.device} got {key} with body {s.body!r}")
    if require_delivery:
        for key in accepted:
            for user in attempts[key].recipients:
                if key not in seen_by_user[user]:
                    problems.append(f"accepted {key} never delivered to {user}")

    # 3: results against each other.
    places: dict[tuple[str, int], Key] = {}
    for key, place in accepted.items():
        other = places.setdefault(place, key)
        if other != key:
            problems.append(f"{other} and {key} were both accepted as {place}")

    # 4: order within sessions, gapless conversations.
    by_session: dict[Any, list[Seen]] = defaultdict(list)
    for s in history.seen:
        by_session[(s.user, s.device, id(s.session))].append(s)
    redeliveries = 0
    for (user, device, _), items in by_session.items():
        last_inbox, last_seq = 0, {}
        for s in items:
            if s.inbox_seq <= last_inbox:
                problems.append(f"{user}/{device}: inbox_seq {s.inbox_seq} after {last_inbox} "
                                "in one session")
            last_inbox = max(last_inbox, s.inbox_seq)
            if s.kind == "msg":
                if s.seq <= last_seq.get(s.conv, 0):
                    problems.append(f"{user}/{device}: {s.conv} seq {s.seq} after "
                                    f"{last_seq[s.conv]} in one session")
                last_seq[s.conv] = max(last_seq.get(s.conv, 0), s.seq)
    per_device = Counter((s.user, s.device, s.inbox_seq) for s in history.seen)
    redeliveries = sum(n - 1 for n in per_device.values())
    for conv in sorted({place[0] for place in accepted.values()}):
        seqs = [m["seq"] for m in conv_messages(store, conv)]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{conv} seqs are not gapless: {seqs[:10]}...")
        info = store.conv_info(conv)
        if info is not None and info["last_seq"] != len(seqs):
            problems.append(f"{conv} last_seq {info['last_seq']} but {len(seqs)} messages")

    # 5: the log and the projections.
    # A quiet broker may still commit (acks, session ends): read the last LSN first, so a commit
    # landing between the two reads makes `records` larger, never smaller.
    last = store.last_lsn()
    records = store.verify_log()
    if records < last:
        problems.append(f"verify_log checked {records} records, last lsn {last}")
    diff = store.check_projections()
    if diff is not None:
        problems.append(f"projections differ from a replay: {diff!r}")
    _fail(problems)
    return Report(len(attempts), len(accepted), len(history.seen), redeliveries, records)


async def stop_and_check(broker_process, history: History, **kw: Any) -> Report:
    """SIGTERM the broker (it must exit 0), then check `history` against its data directory."""
    assert await broker_process.aterminate() == 0
    store = broker_process.open_store(readonly=True)
    try:
        return check(history, store, **kw)
    finally:
        store.close()
