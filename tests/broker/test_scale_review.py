"""Review findings on costs that grew with a group's size: each test failed before its fix.

Costs are counted (the hub's lookups of users), never timed.
"""

from __future__ import annotations

from broker.config import Config
from broker.fanout import push_receipt
from broker.roster import Roster
from broker.server import Broker
from storage.commands import CreateConv
from storage.rules import Limits
from storage.store import Store

MEMBERS = 2000


class _Session:
    """What the hub and a push need of a session: its user, its device, whether it takes
    deliveries (a requests-only one does not), its pushes."""

    def __init__(self, user: str) -> None:
        self.user, self.device = user, "d1"
        self.delivers = True
        self.pushes: list[bytes] = []

    def push_nowait(self, data: bytes) -> None:
        self.pushes.append(data)


class _CountingUsers(dict):
    """The hub's sessions by user, counting the lookups of a user."""

    lookups = 0

    def get(self, key, default=None):
        _CountingUsers.lookups += 1
        return dict.get(self, key, default)

    def __contains__(self, key) -> bool:
        _CountingUsers.lookups += 1
        return dict.__contains__(self, key)


def test_a_receipt_in_a_big_group_looks_at_the_members_online_only(tmp_path):
    """A receipt in a group walked its every member to find their sessions: 0.56 ms of the
    event loop per receipt in a group of 10,000 with 100 online (0.028 ms now), and a message
    read by all of them is 10,000 receipts. The audience is now the members online."""
    store = Store.open(str(tmp_path / "data"), limits=Limits(max_members=MEMBERS))
    try:
        members = tuple(f"m{i:05d}" for i in range(MEMBERS - 1))
        (out,) = store.execute([CreateConv("own", "d1", "user", "group", "big", False, members)])
        conv = out.reply["conv"]
        # Every member hears of the marks (above --receipt-audience-max, only the owner would).
        broker = Broker(Config(data_dir=tmp_path / "data", port=0,
                               receipt_audience_max=MEMBERS), store)
        hub = broker.hub
        hub._by_user = _CountingUsers()
        online = {user: _Session(user) for user in ("own", "m00007", "m01500")}
        for session in online.values():
            hub.attach(session)
        hub.attach(_Session("stranger"))  # online, in no group of theirs
        broker.roster(conv)  # cached, as after the group's first post

        _CountingUsers.lookups = 0
        push_receipt(broker, conv, "m00007", "delivered", 1)
        assert _CountingUsers.lookups <= 2 * len(online) + 2  # not one per member
        assert [len(s.pushes) for s in online.values()] == [1, 0, 1]  # not to its own user

        _CountingUsers.lookups = 0
        push_receipt(broker, conv, "m00007", "read", 1)
        assert _CountingUsers.lookups <= 2 * len(online) + 2
        assert [len(s.pushes) for s in online.values()] == [2, 1, 2]  # its own devices too
        assert hub.online_among(Roster.of([(m, "member") for m in members])) == {
            "m00007", "m01500"}
        assert hub.online_among(Roster.of([("nobody", "member"), ("own", "owner")])) == {"own"}
    finally:
        store.close()
