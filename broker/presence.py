"""Presence pushes: a user's `status` to the online users who share a direct conversation or a
group with them, when their first device connects and when their last one disconnects.

Finding that audience looks at every conversation of the user (`Hub.peers`). For a service in
20,000 groups it held the event loop, and with it every other connection (pings, deliveries):
another client's ping waited 175 ms (median of 9 runs) as the service connected with the member
lists read from the store, 25 ms with them cached. Since 2026-12-05 it is walked in slices of
SLICE_S: the first at once, where a user in a few hundred conversations is done (pushed as
before, before anything else runs), the rest in a task of its own, the other connections served
between slices (that ping: 13.6 and 7.5 ms; docs/OPERATIONS.md, "Limits").

A user's announcements keep their order: one walk at a time per user, and what comes meanwhile
waits for it. Of the states that waited only the latest is announced, and none if it is the
one just announced: a user who went offline and came back while their peers were being told
that they came online is not announced offline and online again (the peers' view is right
either way, and a service reconnecting in a loop costs one walk at a time, not a queue of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

import trio

import protocol as wire
from broker.hub import Hub, encode_push
from storage.errors import StorageError

# The longest one user's presence walk holds the event loop before the others get a turn (one
# step, one conversation, may take longer: a member list not cached is read in one go, as a
# `members` query reads it).
SLICE_S = 0.002

Walk = Generator[None, None, set[str]]


def walk_for(walk: Walk, seconds: float) -> set[str] | None:
    """Step `walk` for `seconds` at most (at least one step): its result, or None if unfinished."""
    ends = time.monotonic() + seconds
    try:
        while True:
            next(walk)
            if time.monotonic() >= ends:
                return None
    except StopIteration as done:
        return done.value


class Presence:
    """Announces users online and offline to their peers; `start` it with a nursery to walk
    long audiences in tasks (without one, each is walked to its end at once)."""

    def __init__(self, hub: Hub, roster: Callable[[str], Any], log: Any) -> None:
        self._hub = hub
        self._roster = roster
        self._log = log
        self._nursery: trio.Nursery | None = None
        # Users whose walk is under way, with the state that came since (None: none).
        self._walking: dict[str, bool | None] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Walk the audiences that take longer than a slice in tasks of `nursery`."""
        self._nursery = nursery

    def announce(self, user: str, online: bool) -> None:
        """Tell `user`'s peers that they came online (True) or went offline (False)."""
        if user in self._walking:  # after the walk under way, in order
            self._walking[user] = online
            return
        walk = self._hub.peers(user, self._roster)
        try:
            peers = walk_for(walk, SLICE_S if self._nursery is not None else float("inf"))
        except StorageError as exc:
            self._dropped(user, exc)
            return
        if peers is not None:
            self._push(user, online, peers)
            return
        self._walking[user] = None
        self._nursery.start_soon(self._walk_on, user, online, walk)

    async def _walk_on(self, user: str, online: bool, walk: Walk) -> None:
        try:
            while True:
                try:
                    while (peers := walk_for(walk, SLICE_S)) is None:
                        await trio.lowlevel.checkpoint()
                except StorageError as exc:
                    self._dropped(user, exc)
                else:
                    self._push(user, online, peers)
                later = self._walking[user]
                if later is None or later == online:
                    return
                self._walking[user] = None
                online, walk = later, self._hub.peers(user, self._roster)
        finally:
            del self._walking[user]

    def _push(self, user: str, online: bool, peers: set[str]) -> None:
        if peers:
            self._hub.push(peers, encode_push(wire.Status(user=user, online=online)))

    def _dropped(self, user: str, exc: StorageError) -> None:
        # Pushes are ephemeral: this one is dropped, and said why.
        self._log.error("push_dropped", user=user, push="status", reason=str(exc))
