"""Broker settings: every limit in one place, with its unit and default.

Each field is documented in docs/OPERATIONS.md; `homing serve --help` shows the flags that set
them. Defaults are sized for one 2-core machine serving a few thousand devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7717
DEFAULT_DATA_DIR = "homing-data"


@dataclass(frozen=True, slots=True)
class Config:
    """What `homing serve` runs with."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Frames and bodies (docs/PROTOCOL.md "Limits").
    max_frame_bytes: int = 1 << 20
    max_body_bytes: int = 64 * 1024
    # Time.
    handshake_timeout_s: float = 10.0
    heartbeat_s: int = 15
    idle_timeout_s: float = 45.0
    shutdown_grace_s: float = 10.0
    # Delivery and flow control.
    window: int = 256
    max_pending_pushes: int = 4096
    max_inflight_requests: int = 1024
    # Rates (sends per second; burst = one second's worth).
    sends_per_s_per_connection: float = 5000.0
    sends_per_s_per_user: float = 20000.0
    # Connections.
    max_connections: int = 20000
    max_connections_per_user: int = 256
    # Conversations.
    max_members: int = 10000
    # Group commit.
    max_batch: int = 4096
    # Storage.
    map_size_bytes: int = 1 << 30
    # Process: allocations between two collections of the cyclic GC's young generation.
    gc_young_threshold: int = 100_000
    # Content policy: a file of forbidden words, one per line, and what to do on a match.
    content_policy: Path | None = None
    content_action: str = "reject"  # "reject" or "mask"

    def replace(self, **changes: object) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
