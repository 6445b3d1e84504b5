"""The connections waiting for their hello, by peer address, and the one that gives its
handshake place up to a connection that has spoken.

Each connection past accept holds one of --max-handshakes places until its hello is answered,
for up to --handshake-timeout. A peer that opens connections and says nothing held them all
from one address: until 2026-12-07 every other client's hello was refused `limit_exceeded`
until the silent ones timed out (a good hello welcomed 9.7 s after the flood began, at the
defaults). Now, with every place taken, a connection that has spoken (its hello whole with a
good token, on a plain TCP port; its first byte, on a TLS port) takes the place of a silent
one (`give_up_one`): of the address holding the most places, the one waiting longest, if it
has waited SILENT_S and nothing it sent waits unread in its socket (a hello the broker has not
read yet is not silence). So a flood from one address no longer shuts out others, and costs
its sender a connection a SILENT_S for each place it keeps, not one a --handshake-timeout;
while the places are not all taken, nothing changes (a crowd of devices reconnecting behind
one NAT address after a restart loses no place to this: its hellos come with their connects).

An address is what the failed-hello throttle counts (broker/hellos.py `address_key`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from broker.session import Session

# How long a connection waits for its hello before, with every handshake place taken, one
# that has spoken may take its place: a client sends its hello with its connect, and on TLS its
# handshake takes two round trips, so a second is a silent client, not a slow link.
SILENT_S = 1.0
# The most of the chosen address's connections looked at for one choice, oldest first: those
# with bytes waiting are passed over, and a flood's connections are all silent.
LOOK_AT = 8


class Awaiting:
    """The connections waiting for their hello: their cancel scopes (`scopes`, cancelled by a
    stop or by `give_up_one`), and by address, each with when it began to wait."""

    def __init__(self) -> None:
        self.scopes: dict[Session, trio.CancelScope] = {}
        self._by_address: dict[str, dict[Session, float]] = {}

    def add(self, session: Session, scope: trio.CancelScope, now: float) -> None:
        self.scopes[session] = scope
        self._by_address.setdefault(session.address, {})[session] = now

    def remove(self, session: Session) -> None:
        if self.scopes.pop(session, None) is None:
            return  # given up already
        waiting = self._by_address[session.address]
        del waiting[session]
        if not waiting:
            del self._by_address[session.address]

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def __len__(self) -> int:
        return len(self.scopes)

    def give_up_one(self, now: float) -> Session | None:
        """Cancel the wait of a silent connection (see the module's docstring) and return its
        session, its place no longer counted; None if no connection is silent enough."""
        if not self._by_address:
            return None
        waiting = max(self._by_address.values(), key=len)
        for looked, (session, since) in enumerate(waiting.items()):
            if looked >= LOOK_AT or now - since < SILENT_S:
                return None  # oldest first: the others have waited less
            if session.unread():
                continue
            scope = self.scopes[session]
            self.remove(session)
            session.place_given_up = True
            scope.cancel()
            return session
        return None

