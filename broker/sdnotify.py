"""systemd's service notifications (sd_notify(3)): readiness, stopping, status and the watchdog.

Under a unit with `Type=notify`, systemd passes `NOTIFY_SOCKET` (a datagram socket's path, or
`@name` in the abstract namespace) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and
`WATCHDOG_PID`, the process it is meant for). A notification is one datagram of `KEY=value`
lines; that is the whole protocol, so it is written here rather than taken as a dependency.
Without `NOTIFY_SOCKET` there is no `Notifier` and nothing is sent.

A notification that cannot be sent is logged once (`sd_notify_failed`) and never stops the
broker: readiness is systemd's business, serving is ours.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
import trio

if TYPE_CHECKING:
    from broker.committer import Committer

log = structlog.get_logger("homing")  # lazy: bound at the first line, after logs.configure


class Notifier:
    """Sends notifications to one `NOTIFY_SOCKET`; `watchdog_s` is systemd's watchdog timeout
    for this process (None: no watchdog asked)."""

    def __init__(self, address: str, watchdog_s: float | None = None) -> None:
        self.address = address
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None when not started as `Type=notify`.

        `WATCHDOG_USEC` counts only when `WATCHDOG_PID` is unset or names this process (a
        watchdog meant for a parent that started us is not ours to feed)."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            log.warning("sd_notify_unsupported", notify_socket=address,
                        message="NOTIFY_SOCKET is neither a path nor @abstract: not notifying")
            return None
        watchdog_s = None
        pid = environ.get("WATCHDOG_PID", "")
        usec = environ.get("WATCHDOG_USEC", "")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("sd_notify_unsupported", watchdog_usec=usec,
                            message="WATCHDOG_USEC is not a whole number: no watchdog")
        return cls(address, watchdog_s)

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines (`notify(READY=1, STATUS="...")`); True if the datagram went.
        Never raises: a failure is logged once (`sd_notify_failed`)."""
        # One line each: a line break in a value (a data directory's odd name) would start a
        # field of its own, so it goes out as a space.
        lines = [f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items()]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify_failed", notify_socket=self.address,
                            error=exc.strerror or str(exc))
            return False
        return True


async def keep_watchdog(notifier: Notifier, committer: Committer) -> None:
    """Send `WATCHDOG=1` every half of systemd's watchdog timeout while the broker is healthy:
    its trio loop runs (this task does), and no commit has been running for the whole timeout
    (a disk that stopped answering leaves every send waiting). Otherwise the keep-alive is
    withheld (`watchdog_withheld`, logged once), systemd's watchdog fires, and the unit's
    `Restart=` policy takes over; once commits move again, the keep-alives resume."""
    timeout = notifier.watchdog_s
    assert timeout is not None
    withheld = False
    while True:
        running = committer.commit_running_s()
        if running < timeout:
            notifier.notify(WATCHDOG=1)
            if withheld:
                withheld = False
                log.info("watchdog_resumed")
        elif not withheld:
            withheld = True
            log.error("watchdog_withheld", commit_running_s=round(running, 3),
                      watchdog_s=timeout,
                      message="a commit has been running for the whole watchdog timeout")
        await trio.sleep(timeout / 2)
