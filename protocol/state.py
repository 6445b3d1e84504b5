"""The connection state machine: the one place that decides which frame is legal when.

There is one state per connection, shared by both directions (PROTOCOL.md §6):

    HANDSHAKE ──client hello──▶ AWAIT_WELCOME ──server welcome──▶ OPEN ──bye (either)──▶ CLOSED
        │                            │                             └──server error close──▶ CLOSED
        └─server error──▶ CLOSED ◀───┴─server error
    any state ──fatal protocol error──▶ ERROR

Rule 1: before the handshake the client may send ``hello`` and nothing else; after it, nothing
until the server has answered. The server answers ``welcome`` (the session is OPEN) or ``error``
(the connection is CLOSED, whatever the error's close flag says). Before ``hello`` the server may
only send an ``error`` (say TIMEOUT, or SHUTTING_DOWN), which also closes.

Rule 2: in OPEN each side sends the frames of its direction (frames.CLIENT_FRAMES /
frames.SERVER_FRAMES). ``bye`` from either side, or an ``error`` with close=true from the server,
moves to CLOSED; after that nothing more may be sent or received.

Rule 3: a fatal protocol error (ours or the peer's) moves to ERROR, which refuses further use,
except that the server may still send ``error`` frames to tell the client why it is being
dropped (as h11 lets a server answer 400 after a RemoteProtocolError).

Anything not in `TRANSITIONS` is illegal.
"""

from __future__ import annotations

from enum import Enum

from .frames import CLIENT_FRAMES, SERVER_FRAMES, Error


class Role(Enum):
    """Which end of the connection a `Connection` plays."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Where a connection is in its life (see the module docstring)."""

    HANDSHAKE = "handshake"  # connected, no hello yet
    AWAIT_WELCOME = "await_welcome"  # hello sent, no answer yet
    OPEN = "open"  # welcome sent: requests, replies and pushes flow
    CLOSED = "closed"  # bye or a closing error passed: nothing more
    ERROR = "error"  # a fatal protocol error: refuses further use


CLIENT, SERVER = Role.CLIENT, Role.SERVER
HANDSHAKE, AWAIT_WELCOME, OPEN, CLOSED, ERROR = (
    State.HANDSHAKE,
    State.AWAIT_WELCOME,
    State.OPEN,
    State.CLOSED,
    State.ERROR,
)

ERROR_CLOSE = "error+close"
"""The event key of an ``error`` frame with close=true (plain ``error`` keeps the session)."""


def _build() -> dict[tuple[State, Role, str], State]:
    table: dict[tuple[State, Role, str], State] = {
        (HANDSHAKE, CLIENT, "hello"): AWAIT_WELCOME,
        (HANDSHAKE, SERVER, "error"): CLOSED,
        (HANDSHAKE, SERVER, ERROR_CLOSE): CLOSED,
        (AWAIT_WELCOME, SERVER, "welcome"): OPEN,
        (AWAIT_WELCOME, SERVER, "error"): CLOSED,
        (AWAIT_WELCOME, SERVER, ERROR_CLOSE): CLOSED,
        (OPEN, SERVER, ERROR_CLOSE): CLOSED,
        (ERROR, SERVER, "error"): ERROR,
        (ERROR, SERVER, ERROR_CLOSE): ERROR,
    }
    for role, types in ((CLIENT, CLIENT_FRAMES), (SERVER, SERVER_FRAMES)):
        for t in types:
            if t not in ("hello", "welcome"):
                table[(OPEN, role, t)] = CLOSED if t == "bye" else OPEN
    return table


TRANSITIONS: dict[tuple[State, Role, str], State] = _build()
"""(state, role of the frame's sender, event key) -> next state; absent means illegal."""


def event_key(frame: tuple) -> str:
    """The key `frame` is looked up by in `TRANSITIONS`: its wire type, or `ERROR_CLOSE`."""
    if type(frame) is Error and frame.close:
        return ERROR_CLOSE
    return type(frame).TYPE


def legal_moves(state: State, sender: Role) -> dict[str, State]:
    """The rows of `TRANSITIONS` for `state` and `sender`: event key -> next state.

    `Connection` keeps the rows of its current state at hand so that the per-frame check is
    one dict lookup; they are still read from `TRANSITIONS` and nowhere else.
    """
    return _ROWS[(state, sender)]


_ROWS: dict[tuple[State, Role], dict[str, State]] = {
    (s, r): {} for s in State for r in Role
}
for (_s, _r, _key), _next in TRANSITIONS.items():
    _ROWS[(_s, _r)][_key] = _next
