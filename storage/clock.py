"""The log's clock: the times records are stamped with do not go back along the log across a
wall clock set back by up to 10 minutes.

A record's `ts_us` is the wall clock when its batch ran, taken under the write lock so that
times follow LSNs. A wall clock can step back (an NTP correction, a VM migrated, a clock that ran
ahead set right by hand); a log whose times stepped back with it would show a conversation's
later messages as older than earlier ones (`deliver` and `history` carry these times), and a
replay up to a time (`homing audit inbox --at`) stops at the first record later than that time,
so it would leave out the later records with earlier times. So a batch is stamped with the
later of the wall clock and the last time logged: while the wall clock is behind the log, new
records carry the last logged time, until the wall clock passes it again (docs/DESIGN.md,
"Stored events"). The store logs `clock_behind_log` when that starts, `clock_caught_up` when it
ends.

For at most `MAX_HOLD_US`. A wall clock further behind than that says the log's last time is
the wrong one (a host that booted with its clock years ahead, and logged events before NTP set it
right): holding the log's times there would stamp every message with that future time until the
clock reached it. Then the wall clock wins, times go back once, and the store logs
`clock_stepped_back` (an error: the log holds times from a clock that was wrong).
"""

from __future__ import annotations

import structlog

log = structlog.get_logger()

MAX_HOLD_US = 10 * 60 * 1_000_000  # the furthest a wall clock behind the log is held: 10 min


class LogClock:
    """Stamps batches with `max(wall clock, last logged time)`, unless the wall clock is more
    than `MAX_HOLD_US` behind; used under the write lock."""

    def __init__(self, last_us: int) -> None:
        self.last_us = last_us  # the time of the log's last record (0: none, or unreadable)
        self.behind_us = 0  # how far the wall clock was behind the log at the last commit

    def stamp(self, wall_us: int) -> int:
        """The time of a batch run when the wall clock says `wall_us`."""
        if wall_us >= self.last_us or self.last_us - wall_us > MAX_HOLD_US:
            return wall_us
        return self.last_us

    def logged(self, ts_us: int, wall_us: int) -> None:
        """A batch stamped `ts_us` (`stamp(wall_us)`) committed records."""
        if ts_us < self.last_us:
            log.error("clock_stepped_back", back_s=round((self.last_us - ts_us) / 1e6, 6),
                      ts_us=ts_us, last_us=self.last_us,
                      note=f"the wall clock is more than {MAX_HOLD_US // 60_000_000} minutes "
                      "behind the log's last time: taken as it is, so the log's times go back "
                      "here; check the host's clock")
            self.behind_us = 0
        self.last_us = ts_us
        behind = ts_us - wall_us
        if behind > 0 and not self.behind_us:
            log.warning("clock_behind_log", behind_s=round(behind / 1e6, 6), ts_us=ts_us,
                        note="the wall clock stepped back: records keep the last logged time "
                        "until it passes it again")
        elif behind <= 0 and self.behind_us:
            log.info("clock_caught_up", ts_us=ts_us)
        self.behind_us = max(0, behind)
