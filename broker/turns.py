"""Turns of the event loop shared out among the sessions catching up: those whose writer reads
deliveries from the store.

Trio runs every task that is ready once per turn of its event loop, so anything that needs a
few turns (a monitor's `homing health`: its hello, its welcome, its `stats`) waits for every
busy task at each of them. After a restart thousands of devices catch up at once, and each
read and encoded up to a window of deliveries (256) in every turn: a turn of 3 s was seen,
and a monitor's check went unanswered for 10 s. With `Turns`, at most --catch-up-per-turn
sessions read theirs in one turn; the others wait, in the order they asked, so a turn stays
short whatever the crowd, and the crowd's deliveries come no slower (docs/OPERATIONS.md, "A
restart with thousands of devices online").
"""

from __future__ import annotations

import trio


class Turns:
    """At most `places` tasks a turn of the event loop pass `wait_turn`."""

    def __init__(self, places: int) -> None:
        self._places = trio.Semaphore(places)

    async def wait_turn(self) -> None:
        """Return at the start of a turn in which this task may do its heavy work, which must
        not await: the place is given back as that turn begins, so a task that then waits (on
        a socket that does not drain, say) holds none. A place is held across one boundary
        between turns, so no more than `places` tasks come out of this in one turn; one is
        taken without waiting while any is free, and the waiting take theirs in order."""
        places = self._places
        try:
            places.acquire_nowait()
        except trio.WouldBlock:
            await places.acquire()
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            places.release()
