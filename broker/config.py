"""Broker settings: every limit in one place, with its unit and default.

Each field is documented in docs/OPERATIONS.md; `homing serve --help` shows the flags that set
them. Defaults are sized for one 2-core machine serving a few thousand devices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    DEFAULT_MAX_FRAME_VALUES,
    MAX_FRAME_LIMIT,
    MIN_FRAME_LIMIT,
    MIN_FRAME_VALUES,
    UINT_MAX,
    largest_deliver_frame,
)
from protocol.fields import MAX_USER_LIST

DEFAULT_RECORD_CACHE = 4096
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7717
DEFAULT_DATA_DIR = "homing-data"
IDLE_HEARTBEATS = 3  # the default idle timeout, in heartbeats: two pings may be lost
# --shutdown-grace and --handshake-timeout: a stop that waits longer on a stuck client never
# ends in practice, nor does a silent connection's hold on one of the --max-handshakes places.
MAX_WAIT_S = 3600.0
MIN_SECONDS = 0.001  # the shortest time and the lowest rate a flag takes
MIN_STATS_INTERVAL_S = 1.0  # a shorter one would flood the log (600 lines a second at 0.0001)
GC_THRESHOLD_MAX = (1 << 31) - 1  # gc.set_threshold takes a C int
CONTENT_ACTIONS = ("reject", "mask")
# The range of each number a flag sets, by field: (flag, lowest, highest or None). A Config made
# in code is held to them as `homing serve`'s flags are (`Config.__post_init__`).
RANGES: dict[str, tuple[str, float, float | None]] = {
    "port": ("--port", 0, 65535),
    "max_frame_bytes": ("--max-frame-bytes", MIN_FRAME_LIMIT, MAX_FRAME_LIMIT),
    "max_body_bytes": ("--max-body-bytes", 1, None),
    "handshake_timeout_s": ("--handshake-timeout", MIN_SECONDS, MAX_WAIT_S),
    "idle_timeout_s": ("--idle-timeout", MIN_SECONDS, None),
    "shutdown_grace_s": ("--shutdown-grace", MIN_SECONDS, MAX_WAIT_S),
    "window": ("--window", 1, None),
    "max_pending_pushes": ("--max-pending-pushes", 1, None),
    "max_inflight_requests": ("--max-inflight-requests", 1, None),
    "catch_up_per_turn": ("--catch-up-per-turn", 1, None),
    "sends_per_s_per_connection": ("--send-rate", MIN_SECONDS, None),
    "sends_per_s_per_user": ("--user-send-rate", MIN_SECONDS, None),
    "typing_per_s_per_user": ("--typing-rate", MIN_SECONDS, None),
    "changes_per_s_per_user": ("--change-rate", MIN_SECONDS, None),
    "reads_per_s_per_user": ("--read-rate", MIN_SECONDS, None),
    "max_connections": ("--max-connections", 1, None),
    "max_handshakes": ("--max-handshakes", 1, None),
    "max_connections_per_user": ("--max-connections-per-user", 1, None),
    "auth_fail_rate": ("--auth-fail-rate", 0, None),
    "auth_fail_addresses": ("--auth-fail-addresses", 1, None),
    # A member_list or receipt_list names at most MAX_USER_LIST users a list (PROTOCOL.md §5.3).
    "max_members": ("--max-members", 1, MAX_USER_LIST),
    "receipt_audience_max": ("--receipt-audience-max", 1, None),
    "max_batch": ("--max-batch", 1, None),
    "max_batch_rows": ("--max-batch-rows", 1, None),
    "record_cache": ("--record-cache", 0, None),
    "roster_cache_members": ("--roster-cache-members", 0, None),
    "table_cache_rows": ("--table-cache-rows", 0, None),
    "gc_young_threshold": ("--gc-young-threshold", 1, GC_THRESHOLD_MAX),
    "stats_interval_s": ("--stats-interval", 0, None),
}


def out_of_range(value: float, lo: float, hi: float | None) -> bool:
    """Whether `value` is not a finite number from `lo` to `hi` (no upper bound if None)."""
    finite = not isinstance(value, float) or math.isfinite(value)
    return not finite or not value >= lo or (hi is not None and value > hi)


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
    # Sessions that read deliveries from the store (catching up) in one turn of the event loop;
    # the others wait theirs, in order (broker/turns.py).
    catch_up_per_turn: int = 32
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
    # Read receipts (`read`) per second per user (burst as for sends); the rest are refused
    # `rate_limited`. Each is a command of the commits, refused or not.
    reads_per_s_per_user: float = 5000.0
    # Connections.
    max_connections: int = 20000
    # Connections accepted but not yet past hello (each holds up to HELLO_MAX_FRAME_BYTES).
    max_handshakes: int = 1000
    max_connections_per_user: int = 256
    # Failed hellos per second per peer address (an IPv4 address, an IPv6 /64), a burst of 60
    # seconds' worth: hellos refused `unauthorized`, and connections refused for what they
    # sent instead of a hello (garbage, another protocol version, plaintext on a TLS port),
    # in one bucket; past it they are not logged each (broker/hellos.py). Good tokens are
    # never counted nor refused. 0: not limited.
    auth_fail_rate: float = 1.0
    # Peer addresses whose failed hellos are counted, at most (about 300 bytes each); past it
    # the least recently failed is forgotten.
    auth_fail_addresses: int = 10000
    # Conversations.
    max_members: int = 10000
    # Groups of more members push receipts only to their owners and admins, as channels do: a
    # post read by all n members online is n x n pushes (256: 65,536; 10,000: 100,000,000).
    receipt_audience_max: int = 256
    # Group commit.
    max_batch: int = 4096
    # And the rows one commit writes before its last command (a post: an inbox entry per member
    # of its conversation). broker.committer.MAX_BATCH_ROWS, not imported (as below).
    max_batch_rows: int = 32768
    # Storage.
    map_size_bytes: int = 1 << 30
    # Log records kept in memory for the deliveries that follow their commit (a message to
    # many inboxes is decoded once), at most: about this many x max_body_bytes of memory.
    # storage.queries.RECORD_CACHE, not imported: the client commands load this module.
    record_cache: int = DEFAULT_RECORD_CACHE
    # Members, in all, of the member lists the broker keeps in memory for pushes (receipts,
    # typing, presence): about 120 bytes each (240 until 2026-12-06). 0 keeps none: each push
    # reads its conversation's list. broker.roster.ROSTER_CACHE_MEMBERS, not imported.
    roster_cache_members: int = 500_000
    # Rows each of the 13 tables the commit thread keeps between commits (conversations,
    # members, inbox heads, device marks, ...) holds at most, a table past it emptied after a
    # commit: about 215 bytes a row (docs/OPERATIONS.md, "Limits"). 0 keeps none past a
    # commit. storage.buffered_tables.CACHE_ROWS, not imported (as above).
    table_cache_rows: int = 200_000
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
        for field, (flag, lo, hi) in RANGES.items():
            value = getattr(self, field)
            if out_of_range(value, lo, hi):
                span = f"at least {lo:g}" if hi is None else f"from {lo:g} to {hi:g}"
                raise ValueError(f"{flag} must be a finite number {span}, not {value!r}")
        if 0 < self.stats_interval_s < MIN_STATS_INTERVAL_S:
            raise ValueError(f"--stats-interval must be 0 (none) or at least "
                             f"{MIN_STATS_INTERVAL_S:g}, not {self.stats_interval_s!r}")
        if 0 < self.auth_fail_rate < MIN_SECONDS:
            raise ValueError(f"--auth-fail-rate must be 0 (not limited) or at least "
                             f"{MIN_SECONDS:g}, not {self.auth_fail_rate!r}")
        if self.content_action not in CONTENT_ACTIONS:
            raise ValueError(f"--content-action must be one of {', '.join(CONTENT_ACTIONS)}, "
                             f"not {self.content_action!r}")
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
