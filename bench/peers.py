"""Peers for comparison: NATS JetStream and Redis Streams (filled in below)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def peer_name(url: str) -> str:
    return urlsplit(url).scheme or url


def unreachable(url: str) -> str | None:
    """Why `url` cannot be used, or None if a TCP connection to it succeeds."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "redis"):
        return f"unknown peer scheme {parts.scheme!r} (nats:// or redis://)"
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return None
    except OSError as exc:
        return str(exc)
