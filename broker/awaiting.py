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
read yet is not silence); of addresses holding as many, the one that came to hold that many
first, then the next if none of the first's has waited SILENT_S. So a flood from one address
no longer shuts out others, and costs its sender a connection a SILENT_S for each place it
keeps, not one a --handshake-timeout;
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
# The most connections looked at for one choice, of the addresses holding the most places,
# each address's oldest first, then the next address holding as many: those with bytes
# waiting are passed over, and a flood's connections are all silent.
LOOK_AT = 8


class Awaiting:
    """The connections waiting for their hello: their cancel scopes (`scopes`, cancelled by a
    stop or by `give_up_one`), and by address, each with when it began to wait."""

    def __init__(self) -> None:
        self.scopes: dict[Session, trio.CancelScope] = {}
        self._by_address: dict[str, dict[Session, float]] = {}
        # The addresses by how many places each holds, each count's in the order they came to
        # it, and the most any holds: `give_up_one` finds the address holding the most in a
        # step. A max over the addresses took one step an address, each call: up to
        # --max-handshakes of them (about 50 us at 1,000, 1 ms at 20,000: a flood from as many
        # IPv6 /64s made every connection that spoke cost that; the review of 2026-12-07).
        self._by_count: dict[int, dict[str, None]] = {}
        self._most = 0

    def add(self, session: Session, scope: trio.CancelScope, now: float) -> None:
        self.scopes[session] = scope
        waiting = self._by_address.setdefault(session.address, {})
        waiting[session] = now
        self._count(session.address, len(waiting) - 1, len(waiting))

    def remove(self, session: Session) -> None:
        if self.scopes.pop(session, None) is None:
            return  # given up already
        waiting = self._by_address[session.address]
        del waiting[session]
        self._count(session.address, len(waiting) + 1, len(waiting))
        if not waiting:
            del self._by_address[session.address]

    def _count(self, address: str, was: int, now: int) -> None:
        """`address` held `was` places and holds `now` (one more or one less)."""
        if was:
            held = self._by_count[was]
            del held[address]
            if not held:
                del self._by_count[was]
                if was == self._most and now < was:
                    self._most = now  # the address that held the most still holds the most
        if now:
            self._by_count.setdefault(now, {})[address] = None
            self._most = max(self._most, now)

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def __len__(self) -> int:
        return len(self.scopes)

    def give_up_one(self, now: float) -> Session | None:
        """Cancel the wait of a silent connection (see the module's docstring) and return its
        session, its place no longer counted; None if none of the LOOK_AT looked at is silent
        enough. Of the addresses holding the most places, in the order they came to hold as
        many, each one's connections oldest first; a few steps whatever the addresses."""
        looked = 0
        for address in self._by_count.get(self._most, ()):
            for session, since in self._by_address[address].items():
                if looked >= LOOK_AT:
                    return None
                looked += 1
                if now - since < SILENT_S:
                    break  # oldest first: its others have waited less
                if session.unread():
                    continue
                scope = self.scopes[session]
                self.remove(session)
                session.place_given_up = True
                scope.cancel()
                return session
        return None
