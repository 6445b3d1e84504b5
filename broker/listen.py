"""The broker's listening sockets, bound before anything else is done.

`homing serve` binds its address first, before it makes or opens the data directory, so that a
port already taken (or not ours to bind) fails the start having created nothing; it listens
only once the store is open, so a connection made while the projections rebuild is refused
(and retried by clients) rather than left unanswered in the backlog. The sockets are made as
`trio.open_tcp_listeners` makes them: one per address the host resolves to, SO_REUSEADDR,
IPv6 sockets IPv6-only.
"""

from __future__ import annotations

import errno
import socket

import trio

BACKLOG = 0xFFFF  # as trio's default: the kernel caps it at net.core.somaxconn


def bind(host: str | None, port: int) -> list[socket.socket]:
    """Sockets bound to `port` on each address of `host` (None: every interface), not yet
    listening; OSError (socket.gaierror for a host that does not resolve) if one cannot be."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    unsupported: list[OSError] = []
    try:
        for family, type_, proto, _, address in addresses:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except BaseException:
                sock.close()
                raise
            bound.append(sock)
    except BaseException:
        close(bound)
        raise
    if not bound:
        raise OSError(errno.EAFNOSUPPORT, f"no socket can be made for {host}") from (
            unsupported[0] if unsupported else None)
    return bound


def listen(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Start listening on `sockets` (from `bind`), as trio listeners owning them."""
    listeners = []
    for sock in sockets:
        sock.listen(BACKLOG)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


def close(sockets: list[socket.socket]) -> None:
    """Close sockets that never got to listen."""
    for sock in sockets:
        sock.close()
