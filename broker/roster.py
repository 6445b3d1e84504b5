"""Who is in each conversation, as fan-out asks it: a `Roster` per conversation, cached.

A receipt, a typing notice and a presence walk each ask for the members of a conversation;
`RosterCache` keeps the lists it read, bounded in conversations and in members, and each
membership commit updates the cached roster (`RosterCache.changed`, from broker/fanout.py)
rather than dropping it. A `Roster` is never changed: a change makes a new one, so a walk in
progress keeps the one it holds. The new one shares the old one's table of members and carries
the changes made since beside it, folded into a new table once they are more than about the
square root of the members (`Roster.changed`): a change costs that many, not every member. Until
2026-12-06 each change copied the roster's three lists of every member (an invite into a group
of 100,000: 4.5 to 4.8 ms of the event loop, 0.014 ms since; docs/OPERATIONS.md).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from math import isqrt
from typing import Any

from storage.rules import MANAGERS

ROSTER_CACHE_MAX = 50_000  # conversations whose member lists the broker keeps in memory
# And the members in those lists, in all (full of groups of 1,000: 116 MiB of RSS until 2026-12-06,
# about half since: 500 lists of 1,000 read grew the RSS by 78 MiB, 37 MiB since), by default
# (`--roster-cache-members`). Uncounted until 2026-12-05: a presence walk keeps the list of every
# group of its user, so a service in 800 groups of 1,000 members that connected once left
# 800,000 of them held (173 MiB), for good.
ROSTER_CACHE_MEMBERS = 500_000
# A roster's changes are folded into a new table of its members once they are more than this
# plus the square root of its members (`Roster.changed`): a change copies the changes (at most
# 348 in a group of 100,000), and a fold every member, once per that many changes.
FOLD_AFTER = 32

_ABSENT = object()


class Roster:
    """The members of one conversation, and the views of them that fan-out needs.

    `_roles` (user -> role) and `_changes` (user -> role since, None: no longer a member) are
    never changed once made, as `posters` (owners and admins, by user id) is not: a change makes
    a new Roster (`changed`), sharing what it leaves as it was."""

    __slots__ = ("_changes", "_roles", "posters", "size")

    def __init__(self, roles: dict[str, str], changes: dict[str, str | None], size: int,
                 posters: list[str]) -> None:
        self._roles = roles
        self._changes = changes
        self.size = size  # the members
        self.posters = posters

    @classmethod
    def of(cls, members: list[tuple[str, str]]) -> Roster:
        """The roster of `members`, (user, role) by user id (as `Store.members` lists them)."""
        roles = dict(members)
        return cls(roles, {}, len(roles), [u for u, role in members if role in MANAGERS])

    def role(self, user: str) -> str | None:
        """`user`'s role (None: not a member)."""
        role = self._changes.get(user, _ABSENT)
        return self._roles.get(user) if role is _ABSENT else role  # type: ignore[return-value]

    def __contains__(self, user: object) -> bool:
        return self.role(user) is not None  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.size

    def online(self, sessions: dict[str, Any]) -> set[str]:
        """The members among the keys of `sessions` (the users online), walking the smaller of
        the two in C (`dict.keys() & dict.keys()`): a push to a group of 10,000 members of whom
        100 are online looks at those 100, then at the changes."""
        found = sessions.keys() & self._roles.keys()
        for user, role in self._changes.items():
            if role is None:
                found.discard(user)
            elif user in sessions:
                found.add(user)
        return found

    @property
    def members(self) -> list[tuple[str, str]]:
        """(user, role) of every member, by user id (for a look; no push asks it)."""
        return sorted(self._folded().items())

    @property
    def users(self) -> list[str]:
        """The members' ids, in order."""
        return [user for user, _ in self.members]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Roster):
            return NotImplemented
        return self.members == other.members and self.posters == other.posters

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Roster({self.size} members, {len(self._changes)} changes, {self.posters!r})"

    def _folded(self, changes: dict[str, str | None] | None = None) -> dict[str, str]:
        """The table of members with `changes` (this roster's if None) applied, new if any."""
        changes = self._changes if changes is None else changes
        if not changes:
            return self._roles
        roles = self._roles.copy()
        for user, role in changes.items():
            if role is None:
                roles.pop(user, None)
            else:
                roles[user] = role
        return roles

    def changed(self, user: str, role: str | None) -> Roster:
        """This roster with `user`'s role `role` (None: not a member), as a new Roster: this
        one may be held by a walk in progress, and stays as it is. It shares this one's table
        and posters where the change leaves them as they were; past FOLD_AFTER plus the square
        root of the members, its changes are folded into a new table."""
        was = self.role(user)
        if was == role:
            return self
        roles = self._roles
        changes = {**self._changes, user: role}
        if roles.get(user) == role:  # back to what the table says
            del changes[user]
        posters = self.posters
        if (was in MANAGERS) != (role in MANAGERS):
            i = bisect_left(posters, user)
            posters = ([*posters[:i], user, *posters[i:]] if role in MANAGERS else
                       [*posters[:i], *posters[i + 1:]])
        size = self.size + (role is not None) - (was is not None)
        if len(changes) > FOLD_AFTER + isqrt(len(roles)):
            roles, changes = self._folded(changes), {}
        return Roster(roles, changes, size, posters)


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
            size = found.size
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
            self.members -= cache.popitem(last=False)[1].size

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
        self.members += found.size - was.size
        if found.size:
            cache[conv] = found
            self._trim(0, 0)  # a join past the bound drops the oldest (this one, maybe)
        else:  # as `get`: an empty conversation is not cached
            del cache[conv]
