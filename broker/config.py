"""Broker settings: every limit in one place, with its unit and default.

Each field is documented in docs/OPERATIONS.md; `homing serve --help` shows the flags that set
them. Defaults are sized for one 2-core machine serving a few thousand devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    DEFAULT_MAX_FRAME_VALUES,
    MAX_FRAME_LIMIT,
    MIN_FRAME_VALUES,
    UINT_MAX,
    largest_deliver_frame,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7717
DEFAULT_DATA_DIR = "homing-data"
IDLE_HEARTBEATS = 3  # the default idle timeout, in heartbeats: two pings may be lost


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
    max_frame_values: int = DEFAULT_MAX_FRAME_VALUES
    # Time.
    handshake_timeout_s: float = 10.0
    heartbeat_s: int = 15
    idle_timeout_s: float | None = None  # None: IDLE_HEARTBEATS x heartbeat_s (45 s by default)
    shutdown_grace_s: float = 10.0
    # Delivery and flow control.
    window: int = 256
    max_pending_pushes: int = 4096
    max_inflight_requests: int = 1024
    # Rates (sends per second; burst = one second's worth, at least one send).
    sends_per_s_per_connection: float = 5000.0
    sends_per_s_per_user: float = 20000.0
    # Typing notices per second per user (burst: one second's worth, at least one); the rest
    # are dropped.
    typing_per_s_per_user: float = 5.0
    # Membership changes (create, invite, set_role, join and subscribe, leave, remove, mute)
    # per second per user (burst as for sends); the rest are refused `rate_limited`.
    changes_per_s_per_user: float = 100.0
    # Connections.
    max_connections: int = 20000
    # Connections accepted but not yet past hello (each holds up to HELLO_MAX_FRAME_BYTES).
    max_handshakes: int = 1000
    max_connections_per_user: int = 256
    # Conversations.
    max_members: int = 10000
    # Groups of more members push receipts only to their owners and admins, as channels do: a
    # post read by all n members online is n x n pushes (256: 65,536; 10,000: 100,000,000).
    receipt_audience_max: int = 256
    # Group commit.
    max_batch: int = 4096
    # Storage.
    map_size_bytes: int = 1 << 30
    # Process: allocations between two collections of the cyclic GC's young generation.
    gc_young_threshold: int = 100_000
    # A `broker_stats` log line this often, in seconds (0: none).
    stats_interval_s: float = 60.0
    # Content policy: a file of forbidden words, one per line, and what to do on a match.
    content_policy: Path | None = None
    content_action: str = "reject"  # "reject" or "mask"

    def __post_init__(self) -> None:
        if not 1 <= self.heartbeat_s <= UINT_MAX:  # welcome's field: a uint of 63 bits
            raise ValueError(f"--heartbeat must be from 1 to {UINT_MAX}, not {self.heartbeat_s}")
        if self.idle_timeout_s is None:
            object.__setattr__(self, "idle_timeout_s", float(IDLE_HEARTBEATS * self.heartbeat_s))
        if not MIN_FRAME_VALUES <= self.max_frame_values <= MAX_FRAME_LIMIT:
            raise ValueError(f"--max-frame-values must be from {MIN_FRAME_VALUES} to "
                             f"{MAX_FRAME_LIMIT}, not {self.max_frame_values}")
        if self.idle_timeout_s < self.heartbeat_s:
            raise ValueError(
                f"--idle-timeout {self.idle_timeout_s:g} is shorter than --heartbeat "
                f"{self.heartbeat_s}: clients that ping every heartbeat, as welcome asks them "
                f"to, would be timed out. Use an idle timeout of at least the heartbeat (the "
                f"default is three heartbeats)")
        frame = largest_deliver_frame(self.max_body_bytes)
        if self.max_frame_bytes < frame:
            raise ValueError(
                f"--max-frame-bytes {self.max_frame_bytes} is below the largest delivery of a "
                f"--max-body-bytes {self.max_body_bytes} message ({frame} bytes): such a "
                f"message would be accepted and never delivered. Raise --max-frame-bytes to "
                f"at least {frame}, or lower --max-body-bytes to at most "
                f"{self.max_body_bytes - (frame - self.max_frame_bytes)}")

    def replace(self, **changes: object) -> Config:
        """A copy with some fields changed; an idle timeout that followed the heartbeat (the
        default) follows a new one."""
        if ("heartbeat_s" in changes and "idle_timeout_s" not in changes
                and self.idle_timeout_s == IDLE_HEARTBEATS * self.heartbeat_s):
            changes["idle_timeout_s"] = None
        return dataclasses.replace(self, **changes)
