"""The broker's figures, for an operator to graph and alert on: the `broker_stats` log line,
every `--stats-interval` seconds, what the broker holds and what it did since the line before
(docs/OPERATIONS.md, "Logs"); and the same figures as they are now, with their totals since
the start, in the reply to an admin's `stats` request (`homing health`, docs/OPERATIONS.md,
"Monitoring"). Both read counters the broker keeps anyway, and look at its sessions and
descriptors when asked; nothing on the message path counts for them but the refusals by the
rate limits (`rate_limited`) and at the connection limits (--max-handshakes,
--max-connections), a line each of which would flood the log.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import trio

import protocol as wire

if TYPE_CHECKING:
    from broker.server import Broker
    from broker.session import Session

# The longest a `stats` request's walk of the delivering sessions (`backlogs`) holds the event
# loop before the other connections get a turn: the 1 ms a health probe may hold the others up
# (docs/OPERATIONS.md, "Monitoring"); about 770 sessions at 1.3 us each (measured at 19,900).
# Slices of 128 sessions (0.15 ms) made a walk of 3,000 sessions take 24 turns, each, behind
# thousands of sessions catching up after a restart, a round of them all.
BACKLOG_SLICE_S = 0.001
BACKLOG_CLOCK_EVERY = 64  # sessions looked at between two looks at the clock (0.1 ms)

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float | None:
    """The process's resident memory in MiB (Linux's /proc/self/statm), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return round(int(f.read().split()[1]) * _PAGE_BYTES / (1 << 20), 1)
    except (OSError, IndexError, ValueError):
        return None


def disk_free_bytes(path: object) -> int | None:
    """Bytes free to an unprivileged writer on `path`'s filesystem (None if it cannot be told).

    Only a hint of a disk filling up: LMDB reuses the pages its file holds free before it
    grows the file, so writes may go on at 0, and a write may fail with some left."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def open_files() -> tuple[int | None, int | None]:
    """The file descriptors the process holds (Linux's /proc/self/fd, None elsewhere) and its
    open-file soft limit (None: unlimited), the two a connection's accept needs room between.

    Counted when asked (a `stats` request, a `broker_stats` line), never on the message
    path."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        limit = None
    try:
        # Linux 6.2 and later give the count as the directory's size (0.03 ms); before, it
        # is 0, and the directory is listed: 15 ms of the event loop at 5,000 descriptors,
        # 33 ms at 20,000, measured on the VM of docs/BENCHMARKS.md.
        held = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        held = None
    return held, limit


def _der(data: bytes, at: int) -> tuple[int, int, int]:
    """The tag, content start and content end of the DER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    return tag, at, at + length


def certificate_not_after(path: os.PathLike) -> float | None:
    """When the first certificate of the PEM chain at `path` (the broker's own, `--tls-cert`'s
    first) expires, in Unix seconds; None if it cannot be told (nor read). The standard
    library reads a certificate's dates only from a peer, so its `validity` is read here (RFC
    5280 §4.1)."""
    import base64
    import calendar
    import re

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError:
        return None
    found = re.search(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", pem, re.S)
    try:
        der = base64.b64decode(b"".join(found.group(1).split())) if found else b""
        _, tbs, _ = _der(der, _der(der, 0)[1])  # Certificate { TBSCertificate { ...
        fields, at = [], tbs
        while len(fields) < 4:  # ([0] version,) serial, signature, issuer, validity
            tag, start, end = _der(der, at)
            if tag != 0xA0 or fields:
                fields.append((start, end))
            at = end
        _, not_before_end = _der(der, fields[3][0])[1:]
        tag, start, end = _der(der, not_before_end)
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: YY from 50 is 19YY (RFC 5280 §4.1.2.5.1), not strptime's 69
            text = ("19" if text[:2] >= "50" else "20") + text
        return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


async def answer_stats(session: Session, f: wire.Stats) -> None:
    """Answer a `stats` request: its reply once the walk of the delivering sessions is done
    (`backlogs`), the other figures as they are at its end."""
    backlog = await backlogs(session.broker)
    session.reply(stats_reply(session.broker, f, backlog))
    session.flush_now()  # written now, not at the writer's next turn


def stats_reply(broker: Broker, f: wire.Stats,
                backlog: tuple[int, int] | None = None) -> wire.BrokerStats:
    """The `broker_stats` reply to a `stats` request: the figures as they are now, the counters
    summed since the start. Answered at once, from memory (and, for a device's backlog, two
    rows of the store), so a commit that does not end (a disk that stopped answering) is seen
    as `commit_running_ms` growing, not as a missing answer."""
    committer = broker.committer
    head = acked = None
    if f.user is not None and f.device is not None:
        head = broker.store.inbox_head(f.user)
        # an ack still on its way to disk counts, as at hello
        acked = max(broker.store.delivered(f.user, f.device),
                    committer.acked_mark(f.user, f.device))
    held, limit = open_files()
    backlog_max, windows_full = (None, None) if backlog is None else backlog
    return wire.BrokerStats(
        id=f.id, lsn=committer.committed_lsn, queued=committer.queued,
        committing=committer.committing,
        commit_running_ms=int(committer.commit_running_s() * 1000),
        failing=committer.failing, commits=committer.batches,
        commit_ms=int(committer.commit_s * 1000), commands=committer.commands,
        failed=committer.failed, rate_limited=broker.rate_limited,
        connections=broker.hub.count, requests_only=broker.hub.requests_only,
        handshaking=broker.handshaking, uptime_s=int(time.monotonic() - broker.started),
        disk_free_bytes=disk_free_bytes(broker.config.data_dir), head=head, acked=acked,
        commits_stopped=committer.stopped.total,
        max_connections=broker.config.max_connections,
        connections_full=_connections_full(broker),
        handshakes_full=broker.handshakes_full.total, open_files=held, open_files_limit=limit,
        tls_expires_s=_tls_expires_s(broker), backlog_max=backlog_max,
        windows_full=windows_full, auth_throttled=broker.failed_hellos.throttled,
        accept_failed=broker.accept_failures.total,
        handshakes_given_up=broker.places_given_up.total)


async def backlogs(broker: Broker) -> tuple[int, int]:
    """Of the devices connected now: the most entries waiting for one device's ack, and how
    many devices hold their whole window unacked (sent nothing more until they ack).

    A look at every delivering session, made when asked (a `stats` request), never on the
    message path, in slices of BACKLOG_SLICE_S with a checkpoint between two: about 1.3 us a
    session, 12.6 ms of the event loop at 10,000 sessions made at once, every other
    connection held up that long (docs/OPERATIONS.md, "Monitoring"). Over the users online
    at its start: a session that ended before its user's turn is left out, one that began
    for a user not online at the start is not looked at."""
    most = full = looked = 0
    turn_ends = time.monotonic() + BACKLOG_SLICE_S
    for devices in broker.hub.delivering_devices():
        for session in devices.values():  # no checkpoint within one user's map
            behind = session.head - session.acked
            if behind > most:
                most = behind
            if len(session.unacked) >= session.window:
                full += 1
        looked += len(devices)
        if looked >= BACKLOG_CLOCK_EVERY:
            looked = 0
            if time.monotonic() >= turn_ends:
                # Not a cancellation point, as the reader's own turns are not: a stop still
                # answers the request (PROTOCOL.md §6).
                await trio.lowlevel.cancel_shielded_checkpoint()
                turn_ends = time.monotonic() + BACKLOG_SLICE_S
    return most, full


def _tls_expires_s(broker: Broker) -> int | None:
    """Seconds until the broker's TLS certificate expires (0 once it has; None without TLS,
    or a certificate whose date could not be read)."""
    expires = broker.tls_not_after
    return None if expires is None else max(0, int(expires - time.time()))


def _connections_full(broker: Broker) -> int:
    """Connections refused at --max-connections or for want of a file descriptor."""
    return broker.connections_full.total + broker.out_of_files.total


async def report_stats(broker: Broker, every: float) -> None:
    """Log `broker_stats` every `every` seconds until cancelled."""
    committer = broker.committer
    then, cpu = time.monotonic(), time.process_time()
    lsn, batches, commands = committer.committed_lsn, committer.batches, committer.commands
    failed, rate_limited = committer.failed, broker.rate_limited
    handshakes_full, connections_full = broker.handshakes_full.total, _connections_full(broker)
    stopped = committer.stopped.total
    throttled, accept_failed = broker.failed_hellos.throttled, broker.accept_failures.total
    given_up = broker.places_given_up.total
    while True:
        await trio.sleep(every)
        now, cpu_now = time.monotonic(), time.process_time()
        elapsed = max(now - then, 1e-9)
        events_per_s = round((committer.committed_lsn - lsn) / elapsed, 1)
        broker.log.info(
            "broker_stats",
            connections=broker.hub.count, requests_only=broker.hub.requests_only,
            handshaking=broker.handshaking,
            lsn=committer.committed_lsn, queued=committer.queued,
            committing=committer.committing,
            events_per_s=events_per_s,
            commits_per_s=round((committer.batches - batches) / elapsed, 1),
            commands_per_s=round((committer.commands - commands) / elapsed, 1),
            failed_per_s=round((committer.failed - failed) / elapsed, 1),
            commits_stopped_per_s=round((committer.stopped.total - stopped) / elapsed, 1),
            rate_limited_per_s=round((broker.rate_limited - rate_limited) / elapsed, 1),
            handshakes_full_per_s=round(
                (broker.handshakes_full.total - handshakes_full) / elapsed, 1),
            connections_full_per_s=round(
                (_connections_full(broker) - connections_full) / elapsed, 1),
            auth_throttled_per_s=round(
                (broker.failed_hellos.throttled - throttled) / elapsed, 1),
            accept_failed_per_s=round(
                (broker.accept_failures.total - accept_failed) / elapsed, 1),
            handshakes_given_up_per_s=round(
                (broker.places_given_up.total - given_up) / elapsed, 1),
            cpu_pct=round(100 * (cpu_now - cpu) / elapsed, 1), rss_mib=rss_mib(),
            # Trio's tasks: a few per session (its reader, writer, ...) and a fixed few; a
            # count that does not come back down after a crowd has gone is tasks left behind.
            tasks=trio.lowlevel.current_statistics().tasks_living,
            open_files=open_files()[0], tls_expires_s=_tls_expires_s(broker))
        if broker.notifier is not None and not broker.stopping:  # `systemctl status` shows it
            broker.notifier.notify(STATUS=f"serving {broker.config.host}:{broker.port}: "
                                          f"{broker.hub.count} connections, "
                                          f"{events_per_s:.0f} events/s, "
                                          f"lsn {committer.committed_lsn}")
        then, cpu = now, cpu_now
        lsn, batches, commands = committer.committed_lsn, committer.batches, committer.commands
        failed, rate_limited = committer.failed, broker.rate_limited
        handshakes_full = broker.handshakes_full.total
        connections_full = _connections_full(broker)
        stopped = committer.stopped.total
        throttled, accept_failed = broker.failed_hellos.throttled, broker.accept_failures.total
        given_up = broker.places_given_up.total
