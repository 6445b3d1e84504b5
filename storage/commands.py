"""Commands the broker submits to the store: what an authenticated actor asks for.

Every command carries the actor (`user`, `device`) and the `role` of the token it logged in
with: "user", "service" or "admin" (docs/DESIGN.md, "Commands and rules").

A command is an immutable `NamedTuple` (one is built for every message: a frozen dataclass costs
twice as much to build, 0.89 against 0.38 us for a `SendMessage`). As with the protocol's frames,
commands of different classes never compare equal, even with equal fields.
"""

from __future__ import annotations

from typing import NamedTuple


class SendMessage(NamedTuple):
    """Post `body` under client id `cid` to `conv`, or to the direct conversation with `to`."""

    user: str
    device: str
    role: str
    cid: str
    body: str | bytes
    conv: str | None = None
    to: str | None = None


class CreateConv(NamedTuple):
    """Create a group or channel owned by the actor, with `members` added as plain members.
    With a `cid`, a repeat of it by the same user creates nothing and answers the first
    conversation (`dup`)."""

    user: str
    device: str
    role: str
    kind: str
    name: str | None = None
    open: bool = False
    members: tuple[str, ...] = ()
    cid: str | None = None


class Invite(NamedTuple):
    """Add `target` to `conv` with `member_role` ("member" or "admin")."""

    user: str
    device: str
    role: str
    conv: str
    target: str
    member_role: str = "member"


class SetRole(NamedTuple):
    """Make `target`, a member of `conv`, a plain "member" or an "admin"."""

    user: str
    device: str
    role: str
    conv: str
    target: str
    member_role: str


class Join(NamedTuple):
    """Join (or subscribe to) an open group or channel."""

    user: str
    device: str
    role: str
    conv: str


class Leave(NamedTuple):
    """Leave a group or channel."""

    user: str
    device: str
    role: str
    conv: str


class Remove(NamedTuple):
    """Take `target` out of `conv`, a group or channel (as `Leave` would, but by a manager)."""

    user: str
    device: str
    role: str
    conv: str
    target: str


class Ack(NamedTuple):
    """Acknowledge delivery of the actor's inbox up to inbox seq `upto` on this device.

    `convs` is the highest conv seq of the message entries this ack covers, per conversation,
    when the broker knows them (it delivered every covered entry in this session, and no ack of
    the device was lost with a failed batch since); None makes the rules read them from the
    inbox.
    """

    user: str
    device: str
    role: str
    upto: int
    convs: tuple[tuple[str, int], ...] | None = None


class MarkRead(NamedTuple):
    """Mark `conv` read up to conv seq `upto`."""

    user: str
    device: str
    role: str
    conv: str
    upto: int


class SetMute(NamedTuple):
    """Mute or unmute `conv` for the actor."""

    user: str
    device: str
    role: str
    conv: str
    muted: bool


class RevokeTokens(NamedTuple):
    """Revoke every token of `target` issued before `before` (Unix seconds), an admin's command.
    The broker passes the cut-off it enforced as it read the request; None takes the rules'
    cut-off for the batch's time (`rules.revocation_cut_off`)."""

    user: str
    device: str
    role: str
    target: str
    before: int | None = None


Command = (SendMessage | CreateConv | Invite | SetRole | Join | Leave | Remove | Ack | MarkRead
           | SetMute | RevokeTokens)


def _same(a: tuple, b: object) -> bool:
    return type(a) is type(b) and tuple.__eq__(a, b)  # type: ignore[arg-type]


for _cls in (SendMessage, CreateConv, Invite, SetRole, Join, Leave, Remove, Ack, MarkRead,
             SetMute, RevokeTokens):
    _cls.__eq__ = _same  # type: ignore[method-assign]
    _cls.__ne__ = lambda a, b: not _same(a, b)  # type: ignore[method-assign]
    _cls.__hash__ = lambda a: hash((type(a).__name__, *a))  # type: ignore[method-assign]
