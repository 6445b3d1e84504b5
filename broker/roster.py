"""Who is in each conversation, as fan-out asks it: a `Roster` per conversation, cached.

A receipt, a typing notice and a presence walk each ask for the members of a conversation;
`RosterCache` keeps the lists it read, bounded in conversations and in members, and each
membership commit updates the cached roster (`RosterCache.changed`, from broker/fanout.py)
rather than dropping it. A `Roster` is never changed: a change makes a new one, so a walk in
progress keeps the one it holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from storage.rules import MANAGERS

ROSTER_CACHE_MAX = 50_000  # conversations whose member lists the broker keeps in memory
# And the members in those lists, in all (full of groups of 1,000: 116 MiB of RSS), by default
# (`--roster-cache-members`). Uncounted until 2026-12-05: a presence walk keeps the list of every
# group of its user, so a service in 800 groups of 1,000 members that connected once left
# 800,000 of them held (173 MiB), for good.
ROSTER_CACHE_MEMBERS = 500_000


@dataclass(frozen=True, slots=True)
class Roster:
    """The members of one conversation, and the views of them that fan-out needs."""

    members: list[tuple[str, str]]
    users: list[str]
    posters: list[str]  # owners and admins
    user_set: frozenset[str]  # `users`, for membership tests in O(1) (a receipt each)

    @classmethod
    def of(cls, members: list[tuple[str, str]]) -> Roster:
        users = [u for u, _ in members]
        return cls(members, users, [u for u, role in members if role in MANAGERS],
                   frozenset(users))

    def changed(self, user: str, role: str | None) -> Roster:
        """This roster with `user`'s role `role` (None: not a member), as a new Roster: this
        one may be held by a walk in progress, and stays as it is. The lists a change leaves
        as they were are shared (none is ever changed)."""
        members = self.members
        at = bisect_left(members, user, key=_first)
        was = members[at][1] if at < len(members) and members[at][0] == user else None
        if was == role:
            return self
        members = members.copy()
        users, user_set = self.users, self.user_set
        if role is None:
            del members[at]
            users, user_set = [*users[:at], *users[at + 1:]], user_set - {user}
        elif was is None:
            members.insert(at, (user, role))
            users, user_set = [*users[:at], user, *users[at:]], user_set | {user}
        else:
            members[at] = (user, role)
        posters = self.posters
        if (was in MANAGERS) != (role in MANAGERS):
            i = bisect_left(posters, user)
            posters = ([*posters[:i], user, *posters[i:]] if role in MANAGERS else
                       [*posters[:i], *posters[i + 1:]])
        return Roster(members, users, posters, user_set)


_first = itemgetter(0)


class RosterCache:
    """The rosters of the conversations last asked for, read from the store on a miss."""

    def __init__(self, store: Any, max_members: int = ROSTER_CACHE_MEMBERS) -> None:
        self.store = store
        # Oldest first: an OrderedDict drops its first entry in O(1), where `next(iter(dict))`
        # walks past the slot of every entry deleted since the dict last grew (`_trim`).
        self.cached: OrderedDict[str, Roster] = OrderedDict()
        self.members = 0  # the members of the rosters in `cached`
        self.max_convs = ROSTER_CACHE_MAX
        self.max_members = max_members

    def get(self, conv: str) -> Roster:
        """Who is in `conv` (cached; each membership commit updates it, `changed`)."""
        cache = self.cached
        found = cache.get(conv)
        if found is None:
            found = Roster.of(self.store.members(conv))
            size = len(found.members)
            # An empty conversation is not cached, nor one past the bound of members alone.
            if 0 < size <= self.max_members:
                self._trim(1, size)
                cache[conv] = found
                self.members += size
        return found

    def _trim(self, convs: int, members: int) -> None:
        """Drop the oldest cached rosters until `convs` more conversations of `members` more
        members fit `max_convs` and `max_members` (bounded memory)."""
        cache = self.cached
        while cache and (len(cache) + convs > self.max_convs
                         or self.members + members > self.max_members):
            self.members -= len(cache.popitem(last=False)[1].members)

    def changed(self, conv: str, user: str, role: str | None) -> None:
        """A committed change of `user`'s role in `conv` (None: no longer a member): applied to
        the cached roster, as a new one. Dropping it made the next receipt, typing notice or
        presence walk read the whole member list again (a join in a group of 10,000: 8 ms of
        the event loop, with its fan-out). A roster read since the change committed holds it
        already: applied again, it changes nothing; one read after later batches committed
        too is set back by this batch's changes and brought forward again by theirs, whose
        fan-outs follow in order."""
        cache = self.cached
        was = cache.get(conv)
        if was is None:
            return
        found = was.changed(user, role)
        self.members += len(found.members) - len(was.members)
        if found.members:
            cache[conv] = found
            self._trim(0, 0)  # a join past the bound drops the oldest (this one, maybe)
        else:  # as `get`: an empty conversation is not cached
            del cache[conv]
