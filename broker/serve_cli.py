"""`homing serve` and `homing token`: run the broker on a data directory, and mint the access
tokens it accepts (docs/CLI.md, "Running and tokens"; docs/OPERATIONS.md).

What can be found wrong before serving (a flag, the TLS pair, the content policy, the address,
the data directory) is a usage error, exit 2 (broker/cli.py); the address is bound first, so
that a start that fails there has made nothing, and the store is opened after it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import re
import signal
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from broker import tokens
from broker.cli import _COUNT, _SECONDS, EXIT_USAGE, CliError, _number, _os_why, warn
from broker.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    GC_THRESHOLD_MAX,
    MAX_WAIT_S,
    MIN_SECONDS,
    MIN_STATS_INTERVAL_S,
    Config,
)
from broker.keyring import Keyring
from protocol import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT, MIN_FRAME_VALUES, UINT_MAX
from protocol.fields import MAX_USER_LIST

if TYPE_CHECKING:
    from broker.sdnotify import Notifier

MAX_TOKEN_TTL_S = 3650 * 86400  # ten years: longer is a typo, and past 2**64 s msgpack fails
DEFAULT_LOG_BUFFER_BYTES = 1 << 20  # broker/logs.py DEFAULT_BUFFER_BYTES, not imported: structlog


def _tls_pair_problem(cert: Path, key: Path) -> str | None:
    """Which of a TLS pair that does not load is at fault, and how, where that can be told
    (OpenSSL says `[SSL] PEM lib` for a file that is not PEM, or not what its flag needs);
    None otherwise."""
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        return (f"--tls-cert {cert}: no PEM certificate in it (a -----BEGIN CERTIFICATE----- "
                f"block; a DER one converts with openssl x509 -inform DER -in FILE -out PEM)")
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_pem):
        return f"--tls-key {key}: no PEM private key in it (a -----BEGIN PRIVATE KEY----- block)"
    return None


def _tls_pair_error(cert: Path, key: Path, exc: OSError) -> str:
    """The usage error's message for a TLS pair that does not load."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"--tls-key {key} is not the key of --tls-cert {cert} (key values mismatch)"
    return _tls_pair_problem(cert, key) or f"--tls-cert {cert} / --tls-key {key}: " \
        f"{exc.strerror or exc}"


def cmd_serve(args: argparse.Namespace) -> int:
    from broker import listen
    from broker.logs import configure

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError(EXIT_USAGE, "usage", "--tls-cert and --tls-key go together")
    if args.content_action and not args.content_policy:  # it would be ignored
        raise CliError(EXIT_USAGE, "usage", "--content-action needs --content-policy")
    configure(args.log_level, args.log_format, buffer_bytes=args.log_buffer_bytes)
    try:
        cfg = _serve_config(args)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, "usage", str(exc)) from None
    if cfg.content_policy:  # read now: a file that cannot be used is a usage error
        _check_content_policy(cfg)
    _raise_nofile(cfg.max_connections + cfg.max_handshakes + 64)
    tune_gc(cfg.gc_young_threshold)
    if cfg.tls_cert:  # before anything is created: a bad pair is a usage error
        from broker.server import KeyNeedsPassphrase, no_passphrase

        for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)):
            try:
                path.open("rb").close()
            except OSError as exc:  # say which file, and why (a key only root may read, say)
                raise CliError(EXIT_USAGE, "usage", f"{flag} {path}: {exc.strerror or exc} "
                               f"(the broker runs as uid {os.getuid()})") from None
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(cfg.tls_cert), str(cfg.tls_key), password=no_passphrase)
        except KeyNeedsPassphrase:  # not OpenSSL's prompt: nothing could answer it twice
            raise CliError(EXIT_USAGE, "usage", f"--tls-key {cfg.tls_key}: the key is encrypted "
                           "and serve takes no passphrase: give it the key unencrypted "
                           "(openssl pkey -in KEY -out PLAIN), readable by the broker's user "
                           "alone") from None
        except (OSError, ssl.SSLError) as exc:
            raise CliError(EXIT_USAGE, "usage",
                           _tls_pair_error(cfg.tls_cert, cfg.tls_key, exc)) from None
    try:  # first, so that a port taken (or not ours) fails the start having made nothing
        sockets = listen.bind(cfg.host, cfg.port)
    except OSError as exc:
        raise _cannot_listen(cfg, exc) from None
    except UnicodeError:  # the resolver cannot even encode it (`a..b`): no host either
        raise _cannot_listen(cfg, OSError("not a host name (a part between dots is empty or "
                                          "over 63 characters)")) from None
    try:
        return _serve_bound(cfg, sockets)
    finally:
        listen.close(sockets)  # never listened on, or closed already by the broker



def _check_content_policy(cfg: Config) -> None:
    """A usage error unless `--content-policy` names a UTF-8 file holding words (the broker
    reads it again as it starts; a bad one was a traceback there, after the data directory was
    made, and systemd's `Restart=` repeated it)."""
    from broker.policy import ContentPolicy

    try:
        ContentPolicy.load(cfg.content_policy, cfg.content_action)
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        why = str(exc.strerror or exc)
        if exc.errno == errno.EACCES:
            why += f" (the broker runs as uid {os.getuid()})"
    except ValueError:
        why = "it holds no words (one a line; blank lines and # comments are skipped)"
    else:
        return
    raise CliError(EXIT_USAGE, "usage", f"--content-policy {cfg.content_policy}: {why}")



def _serve_bound(cfg: Config, sockets: list[socket.socket]) -> int:
    """`homing serve` once its address is bound: open the store, serve until stopped."""
    from broker.sdnotify import Notifier
    from storage.errors import DataDirLocked, StorageError
    from storage.rules import Limits
    from storage.store import Store

    notifier = Notifier.from_environ()
    if notifier is not None:  # a layout change rebuilds the projections before serving
        notifier.notify(STATUS=f"opening {cfg.data_dir}")
    try:
        # The keys, read once (`secret.key` made if missing) and handed to the broker: read
        # again there, after a store's open that may take minutes, a file replaced meanwhile
        # gave a broker of other keys than those checked here (a new key where the file was
        # deleted, so the tokens of the one checked refused; a traceback for one cut short).
        # A change after this read is taken up as any rotate is, at the broker's first look.
        keyring = Keyring(cfg.data_dir)
        _warn_if_exposed(cfg.data_dir / tokens.SECRET_FILE)
        _warn_if_exposed(cfg.data_dir / tokens.PREVIOUS_FILE, missing_ok=True)
        store = Store.open(str(cfg.data_dir), map_size=cfg.map_size_bytes,
                           record_cache=cfg.record_cache,
                           table_cache_rows=cfg.table_cache_rows,
                           limits=Limits(max_members=cfg.max_members,
                                         max_body_bytes=cfg.max_body_bytes),
                           on_rebuild=_rebuild_reporter(notifier),
                           on_catch_up=_catch_up_reporter(notifier))
    except DataDirLocked as exc:
        raise CliError(EXIT_USAGE, "locked", str(exc)) from None
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:  # the directory cannot be made or written (permissions, a file)
        raise CliError(*_start_failure(exc),
                       f"cannot use {cfg.data_dir}: {_os_why(exc, cfg.data_dir)}") from None
    except StorageError as exc:  # files LMDB cannot open, a log the rebuild cannot replay
        raise CliError(*_start_failure(exc), f"cannot use {cfg.data_dir}: {exc}") from None
    try:
        trio.run(_serve, cfg, store, notifier, sockets, keyring)
    except BaseExceptionGroup as group:
        failed = _listen_error(group)
        if failed is None:
            raise
        raise _cannot_listen(cfg, failed) from None
    finally:
        store.close()
    return 0


# A start kept from its data directory by something that passes by itself: exit status 1,
# `unavailable`, so that systemd's Restart=on-failure tries again (RestartPreventExitStatus=2
# stops only what would repeat its error: docs/OPERATIONS.md, "As a systemd service").
EXIT_TRY_AGAIN = 1
_PASSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE,
                             errno.ENFILE})


def _start_failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and error name of a start whose data directory failed with `exc`:
    `unavailable` (1) when the cause may pass (LMDB's reader table full of other processes'
    readers, the disk full, memory or the open-file table short), else `data_dir` (2)."""
    import lmdb

    from storage.errors import StorageFull

    passing = (StorageFull, lmdb.ReadersFullError, lmdb.DiskError, lmdb.MemoryError)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, passing) or \
                (isinstance(cause, OSError) and cause.errno in _PASSING_ERRNOS):
            return EXIT_TRY_AGAIN, "unavailable"
        cause = cause.__cause__
    return EXIT_USAGE, "data_dir"


def _cannot_listen(cfg: Config, exc: OSError) -> CliError:
    return CliError(EXIT_USAGE, "listen", f"cannot listen on {cfg.host}:{cfg.port}: "
                                          f"{exc.strerror or exc}")


REBUILD_REPORT_S = 5.0  # at most one projections_rebuild_progress line (and notice) this often
# While a rebuild makes progress, systemd's start timeout is pushed this far ahead each time.
REBUILD_EXTEND_S = 30.0
# Once its replay is done, the rows are sorted, written and committed, with nothing to report
# meanwhile (measured: 0.28 s after a 0.34 s replay): this many times the replay's time is asked.
REBUILD_WRITE_FACTOR = 2.0


def _rebuild_reporter(notifier: Notifier | None):
    """`Store.open`'s `on_rebuild`: a rebuild before serving (a new layout) can take minutes, so
    say how far it got (`projections_rebuild_progress`, and `STATUS=` to systemd) at its first
    chunk and then every REBUILD_REPORT_S, and ask systemd for REBUILD_EXTEND_S more to start
    each time (`EXTEND_TIMEOUT_USEC`): a rebuild that moves is never cut off by
    `TimeoutStartSec`, one that stops is."""
    from broker.logs import get_logger

    log = get_logger()
    started = time.monotonic()
    last = -math.inf

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        replayed = done >= total  # the last call: the rows are written next
        if now - last < REBUILD_REPORT_S and not replayed:
            return
        last = now
        log.info("projections_rebuild_progress", events=done, of=total,
                 seconds=round(now - started, 1))
        if notifier is None:
            return
        if replayed:  # the rows' writing reports nothing: ask for time in proportion
            notifier.notify(EXTEND_TIMEOUT_USEC=int(
                max(REBUILD_EXTEND_S, REBUILD_WRITE_FACTOR * (now - started)) * 1e6),
                STATUS=f"rebuilding projections: writing the rows of {total:,} events")
        else:
            notifier.notify(EXTEND_TIMEOUT_USEC=int(REBUILD_EXTEND_S * 1e6),
                            STATUS=f"rebuilding projections: {done:,} of {total:,} events")

    return report


def _catch_up_reporter(notifier: Notifier | None):
    """`Store.open`'s `on_catch_up`: projections behind the log are caught up before serving,
    a committed transaction at a time (storage/store.py, `_catch_up`), which a long tail makes
    minutes: say how far it got (`STATUS=`) and ask systemd for REBUILD_EXTEND_S more to
    start, after its first transaction and then every REBUILD_REPORT_S, as a rebuild does.
    Its log lines are the store's own (`projections_behind_log`, `projections_caught_up`)."""
    if notifier is None:
        return None
    last = -math.inf

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < REBUILD_REPORT_S:
            return
        last = now
        notifier.notify(EXTEND_TIMEOUT_USEC=int(REBUILD_EXTEND_S * 1e6),
                        STATUS=f"catching up projections: {done:,} of {total:,} events")

    return report


def _listen_error(group: BaseExceptionGroup) -> OSError | None:
    """The error of listening (port taken, not permitted, no such address) inside what
    `trio.run` raised, or None if it is something else: the address was bound before the
    store opened, but another process may have bound it too meanwhile and listened first."""
    match, _ = group.split(lambda e: isinstance(e, OSError) and e.errno in (
        errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL))
    while isinstance(match, BaseExceptionGroup):
        match = match.exceptions[0]
    return match


def _serve_config(args: argparse.Namespace) -> Config:
    """`homing serve`'s Config; ValueError if its limits do not fit together."""
    return Config(
        data_dir=Path(args.data), host=args.host, port=args.port,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        max_frame_bytes=args.max_frame_bytes, max_body_bytes=args.max_body_bytes,
        max_frame_values=args.max_frame_values, window=args.window, heartbeat_s=args.heartbeat,
        idle_timeout_s=args.idle_timeout,
        handshake_timeout_s=args.handshake_timeout,
        sends_per_s_per_connection=args.send_rate, sends_per_s_per_user=args.user_send_rate,
        typing_per_s_per_user=args.typing_rate, changes_per_s_per_user=args.change_rate,
        reads_per_s_per_user=args.read_rate,
        max_connections=args.max_connections, max_handshakes=args.max_handshakes,
        max_connections_per_user=args.max_connections_per_user,
        auth_fail_rate=args.auth_fail_rate, auth_fail_addresses=args.auth_fail_addresses,
        max_members=args.max_members, receipt_audience_max=args.receipt_audience_max,
        max_pending_pushes=args.max_pending_pushes,
        max_batch=args.max_batch, max_batch_rows=args.max_batch_rows,
        max_inflight_requests=args.max_inflight_requests,
        catch_up_per_turn=args.catch_up_per_turn,
        record_cache=args.record_cache, roster_cache_members=args.roster_cache_members,
        table_cache_rows=args.table_cache_rows,
        shutdown_grace_s=args.shutdown_grace,
        content_policy=Path(args.content_policy) if args.content_policy else None,
        content_action=args.content_action or "reject",
        gc_young_threshold=args.gc_young_threshold,
        stats_interval_s=args.stats_interval,
    )


async def _serve(cfg: Config, store: Any, notifier: Notifier | None,
                 sockets: list[socket.socket], keyring: Keyring) -> None:
    from broker.server import Broker

    broker = Broker(cfg, store, notifier, keyring)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(broker.serve, sockets=sockets))
        with trio.open_signal_receiver(*_stop_signals()) as signals:
            async for signum in signals:
                broker.shutdown(signal.Signals(signum).name)
                break
            # Held until stopped: a second signal during the grace period must not kill the
            # process half-way through its shutdown (it is logged and otherwise ignored).
            async with trio.open_nursery() as inner:
                inner.start_soon(_log_more_signals, signals, broker)
                await broker.wait_stopped()
                inner.cancel_scope.cancel()


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the broker cleanly: SIGTERM, SIGINT, and SIGHUP (the terminal that
    ran it closed, an ssh session dropped: a stop, not a kill cutting every connection without a
    word), unless SIGHUP was ignored when it started (`nohup homing serve`), which keeps it so."""
    stop = (signal.SIGTERM, signal.SIGINT)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return stop
    return (*stop, signal.SIGHUP)


async def _log_more_signals(signals: Any, broker: Any) -> None:
    async for signum in signals:
        broker.log.warning("signal_during_shutdown", signal=signal.Signals(signum).name)


def tune_gc(young_threshold: int) -> None:
    """Set up the cyclic garbage collector for a long-running server (docs/OPERATIONS.md).

    Everything alive once the code is imported is frozen out of collections, and the young
    generation is collected every `young_threshold` allocations instead of Python's 700: at
    700 the objects of in-flight requests survive young collections, get promoted, and set off
    full collections that walk every session and cache (measured: 22 full collections and
    0.75 s of collecting per 128,000 messages, pauses up to 30 ms; with these settings 2).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(young_threshold, mid, old)


def _raise_nofile(want: int) -> None:
    """Raise the open-file soft limit towards `want` (up to the hard limit); warn when it
    stays below, since the connections past it would be refused by the kernel, unanswered."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ImportError, ValueError, OSError):
        return
    if soft != resource.RLIM_INFINITY and soft < want:
        import structlog

        structlog.get_logger("homing").warning(
            "open_file_limit_low", limit=soft, wanted=want,
            hint="--max-connections plus --max-handshakes plus 64; raise the hard limit "
                 "(ulimit -Hn, systemd LimitNOFILE=) or lower --max-connections")


def _warn_if_exposed(secret: Path, missing_ok: bool = False) -> None:
    """Warn when users other than the owner may read `secret`: they could mint any token,
    admin tokens included (it is made 0600; a copy or a restore may have loosened it)."""
    try:
        mode = stat.S_IMODE(secret.stat().st_mode)
    except FileNotFoundError:
        if missing_ok:  # `secret.prev.key`: held only between a rotate and a retire
            return
        raise
    if mode & 0o077:
        import structlog

        structlog.get_logger("homing").warning(
            "secret_key_exposed", path=str(secret), mode=f"{mode:04o}",
            hint=f"anyone who can read it can sign tokens: chmod 600 {secret}")


def cmd_token(args: argparse.Namespace) -> int:
    role = ("admin" if args.admin else "service" if args.service
            else "monitor" if args.monitor else "user")
    try:
        ttl = tokens.parse_ttl(args.ttl)
        if not 0 < ttl <= MAX_TOKEN_TTL_S:
            raise ValueError(f"--ttl must be from 1s to {MAX_TOKEN_TTL_S // 86400}d, "
                             f"not {args.ttl}")
        for user in args.users:  # before the secret is made: a usage error makes nothing
            tokens.check_user(user)
        key = Path(args.data) / tokens.SECRET_FILE
        new = not key.exists()
        secret = tokens.load_secret(Path(args.data))
        if new:  # a token no running broker accepts, unless it serves this directory
            warn("secret_created", f"created a new signing secret in {key}: a broker accepts "
                 f"this token only if it serves {args.data} (homing serve --data {args.data})")
        minted = [tokens.issue(secret, user, role, ttl) for user in args.users]
    except ValueError as exc:
        raise CliError(EXIT_USAGE, "usage", str(exc)) from None
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:
        why = _os_why(exc, Path(args.data), "homing token")
        raise CliError(EXIT_USAGE, "data_dir", f"cannot use {args.data}: {why}") from None
    print("\n".join(minted))  # out of the try: a reader gone away is no fault of the data dir
    return 0


def _zero_or_at_least(least: float, zero: str):
    """The type of a flag taking 0 (meaning `zero`) or a finite number of at least `least`."""
    def parse(text: str) -> float:
        value = _number(float, 0)(text)
        if 0 < value < least:
            raise argparse.ArgumentTypeError(
                f"must be 0 ({zero}) or at least {least:g}, not {text}")
        return value
    return parse


# `--stats-interval`: 0 (no stats lines), or at least MIN_STATS_INTERVAL_S seconds.
_stats_interval = _zero_or_at_least(MIN_STATS_INTERVAL_S, "none")
# `--auth-fail-rate`: 0 (not limited), or at least MIN_SECONDS a second.
_auth_fail_rate = _zero_or_at_least(MIN_SECONDS, "not limited")


_RATE = _number(float, MIN_SECONDS)
_WAIT = _number(float, MIN_SECONDS, MAX_WAIT_S)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing serve` and `homing token` on the `homing` subparsers."""
    d = Config()
    s = sub.add_parser("serve", help="run the broker")
    s.add_argument("--data", default=DEFAULT_DATA_DIR,
                   help="data directory (default ./%(default)s)")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on; 0.0.0.0 serves others (default %(default)s)")
    s.add_argument("--port", type=_number(int, 0, 65535), default=DEFAULT_PORT,
                   help="(default %(default)s)")
    s.add_argument("--tls-cert", help="PEM certificate chain; serve TLS")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--max-frame-bytes", type=_number(int, MIN_FRAME_LIMIT, MAX_FRAME_LIMIT),
                   default=d.max_frame_bytes,
                   help="bytes of one frame at most (default %(default)s)")
    s.add_argument("--max-body-bytes", type=_COUNT, default=d.max_body_bytes,
                   help="bytes of one message's body at most (default %(default)s)")
    s.add_argument("--max-frame-values", type=_number(int, MIN_FRAME_VALUES, MAX_FRAME_LIMIT),
                   default=d.max_frame_values,
                   help="msgpack values (keys, values, items) in a client's frame (default "
                        "%(default)s)")
    s.add_argument("--window", type=_COUNT, default=d.window,
                   help="unacked deliveries in flight per device (default %(default)s)")
    s.add_argument("--heartbeat", type=_number(int, 1, UINT_MAX), default=d.heartbeat_s,
                   help="whole seconds between the pings welcome asks for (default "
                        "%(default)s)")
    s.add_argument("--idle-timeout", type=_SECONDS, default=None,
                   help=f"seconds (default: three heartbeats, {d.idle_timeout_s:g})")
    s.add_argument("--handshake-timeout", type=_WAIT, default=d.handshake_timeout_s,
                   help="seconds for a hello to arrive (default %(default)g)")
    s.add_argument("--send-rate", type=_RATE, default=d.sends_per_s_per_connection,
                   help="sends per second per connection (default %(default)g)")
    s.add_argument("--user-send-rate", type=_RATE, default=d.sends_per_s_per_user,
                   help="sends per second per user (default %(default)g)")
    s.add_argument("--typing-rate", type=_RATE, default=d.typing_per_s_per_user,
                   help="typing notices per second per user; the rest are dropped (default "
                        "%(default)g)")
    s.add_argument("--change-rate", type=_RATE, default=d.changes_per_s_per_user,
                   help="membership changes (create, invite, set_role, join, subscribe, leave, "
                        "remove, mute) per second per user; the rest are refused rate_limited "
                        "(default %(default)g)")
    s.add_argument("--read-rate", type=_RATE, default=d.reads_per_s_per_user,
                   help="read receipts (read) per second per user; the rest are refused "
                        "rate_limited (default %(default)g)")
    s.add_argument("--max-connections", type=_COUNT, default=d.max_connections,
                   help="sessions past hello, at most (default %(default)s)")
    s.add_argument("--max-handshakes", type=_COUNT, default=d.max_handshakes,
                   help="connections not yet past hello, at most (default %(default)s)")
    s.add_argument("--max-connections-per-user", type=_COUNT,
                   default=d.max_connections_per_user,
                   help="sessions of one user, at most (default %(default)s)")
    s.add_argument("--auth-fail-rate", type=_auth_fail_rate, default=d.auth_fail_rate,
                   help="failed hellos per second per peer address (an IPv6 /64), a "
                        "burst of 60 seconds' worth: hellos refused unauthorized and "
                        "connections refused for what they sent instead of a hello "
                        "(garbage, another protocol version, plaintext on a TLS port) alike; "
                        "past it they are not logged each, and told retry_ms; good tokens "
                        "are never refused; 0: not limited (default %(default)g)")
    s.add_argument("--auth-fail-addresses", type=_COUNT, default=d.auth_fail_addresses,
                   help="peer addresses whose failed hellos are counted, at most; past it the "
                        "least recently failed is forgotten (default %(default)s)")
    s.add_argument("--max-members", type=_number(int, 1, MAX_USER_LIST), default=d.max_members,
                   help=f"members of a group or channel, at most; up to {MAX_USER_LIST}, the "
                        "user ids a reply's list holds (default %(default)s)")
    s.add_argument("--receipt-audience-max", type=_COUNT, default=d.receipt_audience_max,
                   help="members of a group above which its receipts are pushed only to its "
                        "owners and admins, as a channel's (default %(default)s)")
    s.add_argument("--max-pending-pushes", type=_COUNT, default=d.max_pending_pushes,
                   help="frames queued for a device that does not read them before it is "
                        "closed slow_consumer (default %(default)s)")
    s.add_argument("--max-batch", type=_COUNT, default=d.max_batch,
                   help="commands in one group commit at most (default %(default)s)")
    s.add_argument("--max-batch-rows", type=_COUNT, default=d.max_batch_rows,
                   help="rows one group commit writes at most, before its last command (a "
                        "post: one inbox entry per member of its conversation); a command "
                        "heavier than this commits alone (default %(default)s)")
    s.add_argument("--record-cache", type=_number(int, 0), default=d.record_cache,
                   help="log records kept in memory for the deliveries after their commit, at "
                        "most (a commit's are kept whole; about this many times "
                        "--max-body-bytes of memory; default %(default)s)")
    s.add_argument("--roster-cache-members", type=_number(int, 0),
                   default=d.roster_cache_members,
                   help="members, in all, of the member lists kept in memory for pushes "
                        "(receipts, typing, presence), at most; about 120 bytes each; 0 keeps "
                        "none (default %(default)s)")
    s.add_argument("--table-cache-rows", type=_number(int, 0), default=d.table_cache_rows,
                   help="rows each of the 13 tables the commit thread keeps in memory between "
                        "commits holds at most (conversations, members, inbox heads, device "
                        "marks); about 215 bytes of memory a row; 0 keeps none "
                        "(default %(default)s)")
    s.add_argument("--max-inflight-requests", type=_COUNT, default=d.max_inflight_requests,
                   help="requests of one connection awaiting their commit; past it the broker "
                        "stops reading that connection (default %(default)s)")
    s.add_argument("--catch-up-per-turn", type=_COUNT, default=d.catch_up_per_turn,
                   help="sessions that read deliveries from the store (catching up) in one "
                        "turn of the event loop; the others wait theirs (default %(default)s)")
    s.add_argument("--shutdown-grace", type=_WAIT, default=d.shutdown_grace_s,
                   help="seconds a stop gives connections to finish before it cuts them "
                        "(default %(default)g)")
    s.add_argument("--content-policy", help="file of forbidden words, one per line")
    s.add_argument("--content-action", choices=("reject", "mask"), default=None,
                   help="what to do with a send that matches --content-policy (default reject)")
    s.add_argument("--gc-young-threshold", type=_number(int, 1, GC_THRESHOLD_MAX),
                   default=d.gc_young_threshold,
                   help="allocations between young garbage collections (default %(default)s)")
    s.add_argument("--stats-interval", type=_stats_interval, default=d.stats_interval_s,
                   help="seconds between broker_stats log lines, at least 1; 0: none (default "
                        "%(default)g)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="(default %(default)s)")
    s.add_argument("--log-format", default="auto", choices=("auto", "json", "console"),
                   help="auto: console on a terminal, JSON lines otherwise (default "
                        "%(default)s)")
    s.add_argument("--log-buffer-bytes", type=_number(int, 4096, 1 << 30),
                   default=DEFAULT_LOG_BUFFER_BYTES,
                   help="log lines held for a sink slow to take them before lines are lost "
                        "(default %(default)s)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="print a signed access token (one a line for several users)")
    t.add_argument("users", nargs="+", metavar="USER",
                   help="the user; several: a token each, one a line, in the order given")
    t.add_argument("--data", default=DEFAULT_DATA_DIR, help="data directory holding the secret")
    role = t.add_mutually_exclusive_group()
    role.add_argument("--service", action="store_true", help="a service token")
    role.add_argument("--admin", action="store_true", help="an admin token")
    role.add_argument("--monitor", action="store_true",
                      help="a monitor token: `homing health` and nothing else")
    t.add_argument("--ttl", default="30d", help="lifetime, e.g. 30d, 12h (default %(default)s)")
    t.set_defaults(func=cmd_token)
