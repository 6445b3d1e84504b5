"""Who is connected, and the wake-ups that drive delivery and live pushes.

A device's delivering session is kept by user and device, one each; its requests-only sessions
(`hello.deliver: false`, docs/PROTOCOL.md §9) are kept apart, any number of them: they count as
connections, and are looked at when every session of a user must be (a revocation, a stop), but
they are not online, and are sent no wake-ups and no pushes.

The hub holds no messages. A committed batch tells it which users' inboxes grew; it sets the new
inbox head on each of that user's sessions and wakes their writers, which then read the inbox
from disk at their own pace. Pushes (receipts, presence, typing) are small and ephemeral: they go
into each target session's bounded push queue; a session whose queue overflows is closed as a
slow consumer, which loses nothing (its deliveries are on disk, the pushes are derivable).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import Connection, Deliver, PreparedDeliver, encode_frame
from protocol.frames import to_wire
from storage.errors import StorageError
from storage.queries import body_bytes

if TYPE_CHECKING:
    from broker.roster import Roster
    from broker.session import Session

_new = tuple.__new__
assert Deliver._fields == ("inbox_seq", "kind", "conv", "seq", "sender", "body", "cid", "ts",
                           "muted")

# Conversation ids of a user `Hub.peers` reads at a time: 0.3 ms for 1,000, where one read of
# a user's 20,000 took 12 to 23 ms of the event loop.
PEERS_PAGE = 1000


@dataclass(slots=True)
class Fresh:
    """A message just committed, as each member's newest inbox entry: enough to deliver it to
    a device that is caught up without reading the store."""

    lsn: int
    conv: str
    seq: int
    sender: str
    device: str
    body: Any
    cid: str
    ts_us: int
    _prepared: PreparedDeliver | None = field(default=None, repr=False, compare=False)
    _sent_once: bool = field(default=False, repr=False, compare=False)
    _size: int = field(default=-1, repr=False, compare=False)

    def body_size(self) -> int:
        """Its body's bytes on the wire (`body_bytes`), worked out once for all its recipients:
        a text of 60 KB that is not ASCII takes 19 us to measure, for each of a channel's
        devices."""
        size = self._size
        if size < 0:
            size = self._size = body_bytes(self.body)
        return size

    def deliver_bytes(self, conn: Connection, inbox_seq: int, muted: bool) -> bytes:
        """Its ``deliver`` frame for one recipient's connection.

        The first recipient's is encoded in full; from the second on, the shared fields are
        checked and packed once (`PreparedDeliver`) and only inbox_seq and muted are joined in,
        so a channel post to 1,000 devices is not 1,000 frame encodings, and a direct message
        (one recipient) costs no more than before.
        """
        prepared = self._prepared
        if prepared is None:
            if not self._sent_once:
                self._sent_once = True
                # Built as protocol.frames decodes it, every field in order: 0.5 us less than
                # the named tuple's own __new__ with keywords (`timeit`), once per message.
                return conn.send(_new(Deliver, (inbox_seq, "msg", self.conv, self.seq,
                                                self.sender, self.body, self.cid, self.ts_us,
                                                muted)))
            prepared = self._prepared = PreparedDeliver(
                "msg", self.conv, self.seq, self.sender, self.body, self.cid, self.ts_us,
                conn.out_body_bytes)
        return conn.send_prepared(prepared, inbox_seq, muted)


def encode_push(frame: Any) -> bytes:
    """The bytes of a push frame, encoded once for all its recipients."""
    return encode_frame(to_wire(frame))


class Hub:
    """Sessions by user and device, with presence and fan-out of wake-ups."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._by_user: dict[str, dict[str, Session]] = {}
        # The requests-only sessions by user (a dict as an ordered set).
        self._requesting: dict[str, dict[Session, None]] = {}
        self.count = 0  # every session attached, requests-only ones too
        self.requests_only = 0  # of them, the requests-only sessions

    def sessions(self, user: str) -> Iterable[Session]:
        """The live delivering sessions of `user`, one per device (a snapshot)."""
        return list(self._by_user.get(user, {}).values())

    def every_session(self, user: str) -> list[Session]:
        """The live sessions of `user`, requests-only ones too (a snapshot)."""
        return [*self._by_user.get(user, {}).values(), *self._requesting.get(user, ())]

    def all_sessions(self) -> list[Session]:
        """Every live session, requests-only ones too (a snapshot)."""
        return [*(s for devices in self._by_user.values() for s in devices.values()),
                *(s for sessions in self._requesting.values() for s in sessions)]

    def delivering_devices(self) -> list[dict[str, Session]]:
        """Each online user's live delivering sessions by device (not requests-only ones): a
        snapshot of the users, one list copy. Each user's map is the live one: read it whole
        between two checkpoints; a user gone since the snapshot has an empty one."""
        return list(self._by_user.values())

    def online(self, user: str) -> bool:
        """Whether `user` has at least one live delivering session."""
        return bool(self._by_user.get(user))

    def online_among(self, roster: Roster) -> set[str]:
        """The members of `roster` who have a live delivering session (online: requests-only
        ones do not count), walking the smaller of the two (`Roster.online`), so that a push to
        a group of 10,000 members of whom 100 are online looks at those 100
        (`fanout.push_receipt`). (`dict.keys() & frozenset` walked the frozenset whatever its
        size: 0.5 ms for 100 online users and 10,000 members, 92 ms for 1,000,000.)"""
        return roster.online(self._by_user)

    def user_count(self, user: str) -> int:
        """How many sessions `user` has, requests-only ones too."""
        return len(self._by_user.get(user, ())) + len(self._requesting.get(user, ()))

    def attach(self, session: Session) -> Session | None:
        """Register `session`; return the session it replaces (same user and device), if any:
        a requests-only session replaces none, and is replaced by none."""
        if not session.delivers:
            self._requesting.setdefault(session.user, {})[session] = None
            self.count += 1
            self.requests_only += 1
            return None
        devices = self._by_user.setdefault(session.user, {})
        old = devices.get(session.device)
        devices[session.device] = session
        if old is None:
            self.count += 1
        return old

    def holds(self, session: Session) -> bool:
        """Whether `session` is attached as its device's session (not replaced since)."""
        devices = self._by_user.get(session.user)
        return devices is not None and devices.get(session.device) is session

    def detach(self, session: Session) -> bool:
        """Forget `session`; True when that was the user's last delivering session (the last
        that made them online)."""
        if not session.delivers:
            requesting = self._requesting.get(session.user)
            if requesting is not None and requesting.pop(session, False) is None:
                self.count -= 1
                self.requests_only -= 1
                if not requesting:
                    del self._requesting[session.user]
            return False
        devices = self._by_user.get(session.user)
        if not devices or devices.get(session.device) is not session:
            return False
        del devices[session.device]
        self.count -= 1
        if devices:
            return False
        del self._by_user[session.user]
        return True

    def inbox_advanced(self, heads: dict[str, int], fresh: Fresh | None = None) -> None:
        """Tell the sessions of users whose inbox head moved; `fresh` is the message that made
        each of those heads (one entry per inbox), when there is one."""
        by_user = self._by_user
        if fresh is not None and len(heads) > 2:
            self._learn_muted(fresh.conv, heads)
        for user, head in heads.items():
            devices = by_user.get(user)
            if devices:
                for session in devices.values():
                    session.inbox_moved(head, fresh)

    def _learn_muted(self, conv: str, users: Iterable[str]) -> None:
        """Tell the sessions of `users` that do not know yet whether their user muted `conv`,
        from one read of the store: a post to a group or channel would otherwise cost each
        of them a read transaction of its own when it is delivered. The first post of a
        channel to 1,000 subscribers took 13 ms less CPU in its fan-out with this (medians of 3
        alternating runs each on the 2-core VM, docs/BENCHMARKS-JOURNAL.md)."""
        by_user = self._by_user
        unknown = [s for user in users if (devices := by_user.get(user))
                   for s in devices.values() if not s.knows_muted(conv)]
        if len(unknown) > 1:
            try:
                muted = self._store.muted_among(conv, {s.user for s in unknown})
            except StorageError:  # each session asks when it delivers (and meets it there)
                return
            for session in unknown:
                session.learn_muted(conv, session.user in muted)

    def push(self, users: Iterable[str], data: bytes, *, skip: Session | None = None) -> None:
        """Queue one encoded push frame for every session of `users` (except `skip`)."""
        by_user = self._by_user
        for user in users:
            devices = by_user.get(user)
            if devices:
                for session in list(devices.values()):
                    if session is not skip:
                        session.push_nowait(data)

    def peers(self, user: str, roster: Callable[[str], Any]) -> Generator[None, None, set[str]]:
        """Online users who share a direct conversation or group with `user` (presence audience).

        A generator: each step looks at one conversation of the user, and its return value
        (`StopIteration.value`) is the audience, so that its caller can let the other
        connections run between steps (`broker.presence` steps it 2 ms at a time). Every
        conversation of the user is looked at, their ids read PEERS_PAGE at a time: for a
        service in 20,000 groups about 200 ms of work with the member lists read from the store,
        25 ms with them cached, which until 2026-12-05 held the event loop in one piece (another
        client's ping waited 175 ms and 25 ms; docs/OPERATIONS.md, "Limits").
        `roster(conv)` gives the conversation's members (`RosterCache.get`, cached), whose set is
        met with the online users (`online_among`: the smaller of the two is walked): for a
        user in 10 groups of 999 members, 500 of them online, 0.29 ms with the rosters cached,
        where reading and walking every member list each time took 4.9 ms (medians of 200
        calls, 2026-12-05). A roster not cached yet costs its read, in one step (as long as a
        `members` query of the conversation).
        Channels are left out: a store joining a 1,000-member channel would otherwise announce
        itself to every other subscriber. Channel owners ask with a presence query instead.
        """
        out: set[str] = set()
        after = None
        while True:
            convs = self._store.user_convs(user, after=after, limit=PEERS_PAGE)
            for conv in convs:
                if not conv.startswith("chn:"):
                    out |= self.online_among(roster(conv))
                yield
            if len(convs) < PEERS_PAGE:
                break
            after = convs[-1]
        out.discard(user)
        return out
