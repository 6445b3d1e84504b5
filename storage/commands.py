"""Commands the broker submits to the store: what an authenticated actor asks for.

Every command carries the actor (`user`, `device`) and the `role` of the token it logged in
with: "user", "service" or "admin" (docs/DESIGN.md, "Commands and rules").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Post `body` under client id `cid` to `conv`, or to the direct conversation with `to`."""

    user: str
    device: str
    role: str
    cid: str
    body: str | bytes
    conv: str | None = None
    to: str | None = None


@dataclass(frozen=True, slots=True)
class CreateConv:
    """Create a group or channel owned by the actor, with `members` added as plain members."""

    user: str
    device: str
    role: str
    kind: str
    name: str | None = None
    open: bool = False
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Invite:
    """Add `target` to `conv` with `member_role` ("member" or "admin")."""

    user: str
    device: str
    role: str
    conv: str
    target: str
    member_role: str = "member"


@dataclass(frozen=True, slots=True)
class Join:
    """Join (or subscribe to) an open group or channel."""

    user: str
    device: str
    role: str
    conv: str


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave a group or channel."""

    user: str
    device: str
    role: str
    conv: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge delivery of the actor's inbox up to inbox seq `upto` on this device.

    `convs` is the highest conv seq of the message entries this ack covers, per conversation,
    when the broker knows them (it delivered every covered entry in this session); None makes
    the rules read them from the inbox.
    """

    user: str
    device: str
    role: str
    upto: int
    convs: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class MarkRead:
    """Mark `conv` read up to conv seq `upto`."""

    user: str
    device: str
    role: str
    conv: str
    upto: int


@dataclass(frozen=True, slots=True)
class SetMute:
    """Mute or unmute `conv` for the actor."""

    user: str
    device: str
    role: str
    conv: str
    muted: bool


Command = SendMessage | CreateConv | Invite | Join | Leave | Ack | MarkRead | SetMute
