"""The `homing` command: serve, mint tokens, and talk to a broker from scripts.

Output contract (docs/CLI.md): client commands print one JSON object per line on stdout; errors
go to stderr as one JSON object {"error", "code", "message"} with a non-zero exit status:
1 the broker refused the request, 2 bad usage, 3 the broker could not be reached.
"""

from __future__ import annotations

import argparse
import base64
import errno
import functools
import json
import math
import os
import random
import re
import select
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from broker import tokens
from broker.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    GC_THRESHOLD_MAX,
    MAX_WAIT_S,
    MIN_SECONDS,
    MIN_STATS_INTERVAL_S,
    Config,
    out_of_range,
)
from protocol import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT, MIN_FRAME_VALUES, UINT_MAX

if TYPE_CHECKING:
    from broker.sdnotify import Notifier

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
MAX_TOKEN_TTL_S = 3650 * 86400  # ten years: longer is a typo, and past 2**64 s msgpack fails
DEFAULT_LOG_BUFFER_BYTES = 1 << 20  # broker/logs.py DEFAULT_BUFFER_BYTES, not imported: structlog
RATE_LIMITED_PAUSE_S = 0.05  # first pause before resending a send refused as rate_limited
RATE_LIMITED_MAX_PAUSE_S = 1.0  # the pause doubles while refused, up to this


class CliError(Exception):
    """A failure to report on stderr with an exit status."""

    def __init__(self, status: int, name: str, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.status, self.name, self.message, self.code = status, name, message, code


def warn(name: str, message: str) -> None:
    """A warning on stderr, one JSON object `{"warning": NAME, "message": TEXT}`; the command
    still succeeds (docs/CLI.md, Conventions)."""
    _drain_log()
    sys.stderr.write(json.dumps({"warning": name, "message": message}) + "\n")


def _drain_log() -> None:
    """Before writing to stderr: the broker's log lines still held go out first (`serve`)."""
    logs = sys.modules.get("broker.logs")
    if logs is not None:
        logs.drain()


class JsonErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors keep the output contract: a JSON `usage` error on stderr
    and exit status 2 instead of usage text. Subparsers inherit the class, `--help` is as is."""

    def error(self, message: str) -> NoReturn:
        raise CliError(EXIT_USAGE, "usage", f"{self.prog}: {message}")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, "_innermost"):  # a subcommand's parser finishes first
            namespace._innermost = self
        return namespace, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown argument is reported by the subcommand it was given
        to (`homing send: unrecognized arguments: ...`), as every other usage error is."""
        namespace, extras = self.parse_known_args(args, namespace)
        parser = vars(namespace).pop("_innermost", self)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def emit(obj: dict[str, Any]) -> None:
    """Print one JSON object on its own line; for nobody when started without a stdout (`>&-`),
    as `homing token` does (`listen`, which acks what it prints, refuses to start so)."""
    if sys.stdout is None:
        return
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def body_fields(body: str | bytes | None) -> dict[str, Any]:
    """`body` as JSON fields: text as "body", binary as "body_b64"."""
    if isinstance(body, bytes):
        return {"body_b64": base64.b64encode(body).decode("ascii")}
    return {"body": body}


# -- serve and token ---------------------------------------------------------------------------

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


def _os_why(exc: OSError, data: Path, who: str = "the broker") -> str:
    """Why a data directory cannot be used: the error, after the file it met it on (one in
    the directory: its lock, its secret) and, for a permission refused, the uid that asked."""
    why = str(exc.strerror or exc)
    if exc.filename is not None and Path(os.fsdecode(exc.filename)) != data:
        why = f"{os.fsdecode(exc.filename)}: {why}"
    if exc.errno == errno.EACCES:
        why += f" ({who} runs as uid {os.getuid()})"
    return why


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
        tokens.load_secret(cfg.data_dir)
        _warn_if_exposed(cfg.data_dir / tokens.SECRET_FILE)
        if tokens.load_previous(cfg.data_dir) is not None:  # held since a rotate
            _warn_if_exposed(cfg.data_dir / tokens.PREVIOUS_FILE)
        store = Store.open(str(cfg.data_dir), map_size=cfg.map_size_bytes,
                           limits=Limits(max_members=cfg.max_members,
                                         max_body_bytes=cfg.max_body_bytes),
                           on_rebuild=_rebuild_reporter(notifier),
                           on_catch_up=_catch_up_reporter(notifier))
    except DataDirLocked as exc:
        raise CliError(EXIT_USAGE, "locked", str(exc)) from None
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:  # the directory cannot be made or written (permissions, a file)
        raise CliError(EXIT_USAGE, "data_dir",
                       f"cannot use {cfg.data_dir}: {_os_why(exc, cfg.data_dir)}") from None
    except StorageError as exc:  # files LMDB cannot open, a log the rebuild cannot replay
        raise CliError(EXIT_USAGE, "data_dir", f"cannot use {cfg.data_dir}: {exc}") from None
    try:
        trio.run(_serve, cfg, store, notifier, sockets)
    except BaseExceptionGroup as group:
        failed = _listen_error(group)
        if failed is None:
            raise
        raise _cannot_listen(cfg, failed) from None
    finally:
        store.close()
    return 0


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
        max_connections=args.max_connections, max_handshakes=args.max_handshakes,
        max_connections_per_user=args.max_connections_per_user,
        max_members=args.max_members, receipt_audience_max=args.receipt_audience_max,
        max_pending_pushes=args.max_pending_pushes,
        max_batch=args.max_batch, max_inflight_requests=args.max_inflight_requests,
        shutdown_grace_s=args.shutdown_grace,
        content_policy=Path(args.content_policy) if args.content_policy else None,
        content_action=args.content_action or "reject",
        gc_young_threshold=args.gc_young_threshold,
        stats_interval_s=args.stats_interval,
    )


async def _serve(cfg: Config, store: Any, notifier: Notifier | None,
                 sockets: list[socket.socket]) -> None:
    from broker.server import Broker

    broker = Broker(cfg, store, notifier)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(broker.serve, sockets=sockets))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                broker.shutdown()
                break
            # Held until stopped: a second signal during the grace period must not kill the
            # process half-way through its shutdown (it is logged and otherwise ignored).
            async with trio.open_nursery() as inner:
                inner.start_soon(_log_more_signals, signals, broker)
                await broker.wait_stopped()
                inner.cancel_scope.cancel()


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


def _warn_if_exposed(secret: Path) -> None:
    """Warn when users other than the owner may read `secret`: they could mint any token,
    admin tokens included (it is made 0600; a copy or a restore may have loosened it)."""
    mode = stat.S_IMODE(secret.stat().st_mode)
    if mode & 0o077:
        import structlog

        structlog.get_logger("homing").warning(
            "secret_key_exposed", path=str(secret), mode=f"{mode:04o}",
            hint=f"anyone who can read it can sign tokens: chmod 600 {secret}")


def cmd_token(args: argparse.Namespace) -> int:
    role = "admin" if args.admin else "service" if args.service else "user"
    try:
        ttl = tokens.parse_ttl(args.ttl)
        if not 0 < ttl <= MAX_TOKEN_TTL_S:
            raise ValueError(f"--ttl must be from 1s to {MAX_TOKEN_TTL_S // 86400}d, "
                             f"not {args.ttl}")
        tokens.check_user(args.user)  # before the secret is made: a usage error makes nothing
        key = Path(args.data) / tokens.SECRET_FILE
        new = not key.exists()
        secret = tokens.load_secret(Path(args.data))
        if new:  # a token no running broker accepts, unless it serves this directory
            warn("secret_created", f"created a new signing secret in {key}: a broker accepts "
                 f"this token only if it serves {args.data} (homing serve --data {args.data})")
        token = tokens.issue(secret, args.user, role, ttl)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, "usage", str(exc)) from None
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:
        why = _os_why(exc, Path(args.data), "homing token")
        raise CliError(EXIT_USAGE, "data_dir", f"cannot use {args.data}: {why}") from None
    print(token)  # out of the try: a reader gone away is no fault of the data directory
    return 0


# -- client commands -----------------------------------------------------------------------------

def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of --tls / --tls-ca; a usage error if the CA file cannot be loaded."""
    if not (args.tls or args.tls_ca):
        return None
    ctx = ssl.create_default_context()
    if args.tls_ca:
        try:
            ctx.load_verify_locations(args.tls_ca)
        except OSError as exc:  # ssl.SSLError is one too
            reason = exc.strerror or str(exc)
            raise CliError(EXIT_USAGE, "usage", f"--tls-ca {args.tls_ca}: {reason}") from None
    return ctx


def run_client(args: argparse.Namespace, body, check=None) -> int:
    """Check the arguments, then connect with the common options and run `body(client, args)`.

    Whatever can be checked without the broker (`check(args)` for the command's own) is checked
    before connecting, so a usage error exits 2 whether a broker is running or not. Only
    `listen` and `ack` take the device's delivering session; the other commands open a
    requests-only one (PROTOCOL.md §9), which leaves a `homing listen` of the same user and
    device running (each of them replaced it until 2026-12-05).
    """
    from broker.client import (
        ClientError,
        ConnectionLost,
        InboxReset,
        Replaced,
        open_client,
        parse_server,
    )

    if not args.token:
        raise CliError(EXIT_USAGE, "usage", "a token is needed: --token or HOMING_TOKEN")
    try:
        parse_server(args.server)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, "usage", str(exc)) from None
    tls = _tls_context(args)
    if check is not None:
        check(args)

    def unreachable(reason: str) -> None:
        warn("retrying", f"{reason}; trying again for up to {args.connect_timeout:g} s "
                         "(--connect-timeout)")

    def inbox_reset(reset: InboxReset) -> None:
        warn("inbox_reset", f"the broker's inbox of this user went back from inbox_seq "
                            f"{reset.before} to {reset.head} (restored from an older backup?): "
                            f"deliveries start over after {reset.acked}, and the inbox_seqs "
                            "from there name other entries than those printed before")

    async def main() -> None:
        async with open_client(args.server, args.token, args.device, tls=tls,
                               reconnect_timeout=args.connect_timeout,
                               on_unreachable=unreachable,
                               on_inbox_reset=inbox_reset,
                               start=getattr(args, "start", "first"),
                               deliver=body in DELIVERING) as client:
            await body(client, args)

    try:
        trio.run(main)
    except ClientError as exc:
        status = EXIT_UNREACHABLE if exc.name in ("shutting_down",) else EXIT_REFUSED
        raise CliError(status, exc.name, exc.message, exc.code) from None
    except Replaced as exc:  # another process connected with this user and --device
        raise CliError(EXIT_REFUSED, "replaced", str(exc)) from None
    except BrokenPipeError:  # stdout's reader went away (`homing history ... | head -1`),
        return _reader_gone()  # not the broker
    except (ConnectionLost, OSError) as exc:
        raise CliError(EXIT_UNREACHABLE, "unreachable", str(exc)) from None
    return 0


def _result(r: Any) -> dict[str, Any]:
    return {"conv": r.conv, "seq": r.seq, "lsn": r.lsn, "cid": r.cid, "dup": r.dup}


def check_send(args: argparse.Namespace) -> None:
    """`send` takes its text from TEXT or from --stdin: exactly one of them."""
    if args.stdin and args.text is not None:
        raise CliError(EXIT_USAGE, "usage", "send takes TEXT or --stdin, not both")
    if not args.stdin and args.text is None:
        raise CliError(EXIT_USAGE, "usage", "send needs TEXT or --stdin")
    if args.stdin and sys.stdin is None:  # `homing send --stdin <&-`
        raise CliError(EXIT_USAGE, "usage", "--stdin: standard input is closed")
    # Each cid option belongs to one form: the other would be ignored, and a script that meant
    # its sends to be idempotent would get fresh cids (and duplicates when run again).
    if args.stdin and args.cid is not None:
        raise CliError(EXIT_USAGE, "usage", "--cid goes with TEXT; with --stdin use --cid-prefix")
    if not args.stdin and args.cid_prefix is not None:
        raise CliError(EXIT_USAGE, "usage", "--cid-prefix goes with --stdin; with TEXT use --cid")
    _check_not_empty(("--cid", args.cid), ("--cid-prefix", args.cid_prefix))


def _check_not_empty(*options: tuple[str, str | None]) -> None:
    """A usage error for a cid option given empty (`--cid "$ORDER"` with ORDER unset): taken
    for none, it would get a fresh cid, and a duplicate each time the script ran again."""
    for option, value in options:
        if value == "":
            raise CliError(EXIT_USAGE, "usage", f"{option} is empty: give one, or leave "
                           f"{option} out for a fresh one")


def check_create(args: argparse.Namespace) -> None:
    """`group create` and `channel create`: a `--cid` given is not empty."""
    _check_not_empty(("--cid", args.cid))


async def do_send(client, args) -> None:
    if args.stdin:
        await _send_lines(client, args)
        return
    emit(_result(await client.send(args.text, to=args.to, conv=args.conv, cid=args.cid)))


async def _send_lines(client, args) -> None:
    """Send each stdin line as one message, pipelined, until every line is accepted.

    The first failure stops the rest and is reported alone (not as an exception group).
    """
    from broker.client import ClientError, new_cid
    from protocol import ErrorCode

    # A fresh prefix sorts with the SDK's time-ordered cids (docs/DESIGN.md, "Projections").
    prefix = args.cid_prefix or new_cid()
    limit = trio.Semaphore(args.pipeline)
    failures: list[Exception] = []

    async def one(cid: str, text: str, number: int) -> None:
        try:
            emit(_result(await _send_until_accepted(client, args, cid, text)))
        except ClientError as exc:  # the broker's refusal of this line: say which line
            failures.append(ClientError(exc.code, exc.name,
                                        f"line {number} of stdin: {exc.message}"))
            nursery.cancel_scope.cancel()
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            limit.release()

    number = 0
    async with trio.open_nursery() as nursery:
        try:
            async for text in _stdin_lines():
                number += 1
                await limit.acquire()
                nursery.start_soon(one, f"{prefix}-{number}", text, number)
        except UnicodeDecodeError as exc:  # refused as the broker refuses a bad field; the
            invalid = ErrorCode.INVALID  # lines before it are still sent and printed
            failures.append(ClientError(invalid, invalid.wire_name, (
                f"send: line {number + 1} of stdin is not {exc.encoding} text: {exc.reason} "
                f"at byte {exc.start}")))
    if failures:
        raise failures[0]


async def _stdin_lines() -> AsyncIterator[str]:
    """stdin's lines without their line ends, read a chunk at a time in a worker thread.

    A blocking read in the event loop would hold back everything else while a slow pipe
    (`tail -f events | homing send --stdin`) waits for its next line: the results of the lines
    already sent, and the heartbeats that keep the connection open. The read is abandoned when
    the command stops meanwhile (a refusal, the broker lost for good, Ctrl-C): it must not
    wait for a line that may never come. So it reads the file descriptor itself: an abandoned
    read of sys.stdin's buffer would hold that buffer's lock, and the interpreter aborts when
    it cannot take the lock at exit.
    """
    fd = sys.stdin.fileno()
    # Strictly, whatever sys.stdin's own handler: in the C and C.UTF-8 locales Python reads
    # stdin with surrogateescape, which turns a line that is not text into one with lone
    # surrogates, refused later without naming its line (the broker can never take it).
    encoding, errors = sys.stdin.encoding, "strict"
    rest = b""
    while chunk := await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode(encoding, errors)
    if rest:
        yield rest.removesuffix(b"\r").decode(encoding, errors)


async def _send_until_accepted(client, args, cid: str, text: str) -> Any:
    """`client.send`, again with the same cid after a growing pause while the broker answers
    rate_limited (its per-connection and per-user send rates): the line is still to be sent."""
    from broker.client import ClientError

    pause = RATE_LIMITED_PAUSE_S
    while True:
        try:
            return await client.send(text, to=args.to, conv=args.conv, cid=cid)
        except ClientError as exc:
            if exc.name != "rate_limited":
                raise
        await trio.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, RATE_LIMITED_MAX_PAUSE_S)


def check_listen(args: argparse.Namespace) -> None:
    """`listen` needs a stdout: it acks each delivery once printed, and would ack unread ones."""
    if sys.stdout is None:  # `homing listen >&-`
        raise CliError(EXIT_USAGE, "usage", "standard output is closed: listen acks each "
                                            "delivery once it is printed, and there is nowhere "
                                            "to print it")


async def do_listen(client, args) -> None:
    """Print each delivery, then ack it; stop after --count, after --timeout with nothing
    arriving, or once stdout's reader went away (BrokenPipeError, as a write raises)."""
    waiting = trio.CancelScope()  # the wait for the next delivery: cut short if the reader goes
    reader_gone = trio.Event()
    failures: list[Exception] = []

    async def watch_reader() -> None:
        await _wait_reader_gone()
        reader_gone.set()
        waiting.cancel()  # not an ack under way: the line printed before it was read

    async def print_deliveries() -> None:
        nonlocal waiting
        count = 0
        deliveries = client.deliveries()
        while not reader_gone.is_set() and (args.count is None or count < args.count):
            with trio.move_on_after(math.inf if args.timeout is None else args.timeout) as waiting:
                d = await deliveries.receive()
            if waiting.cancelled_caught:
                break
            out = {"inbox_seq": d.inbox_seq, "conv": d.conv, "seq": d.seq, "from": d.sender,
                   **body_fields(d.body), "cid": d.cid, "ts": d.ts}
            if d.kind != "msg":
                out["kind"] = d.kind
            if d.muted:
                out["muted"] = True
            emit(out)
            count += 1
            if not args.no_ack:
                await client.ack(d.inbox_seq)
        if not args.no_ack:
            await client.ping()  # make sure the last ack reached the broker before we close

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_reader)
        try:
            await print_deliveries()
        except Exception as exc:  # raised alone, not in a group: run_client tells them apart
            failures.append(exc)
        nursery.cancel_scope.cancel()
    if failures:
        raise failures[0]
    if reader_gone.is_set():
        raise BrokenPipeError(errno.EPIPE, "stdout's reader went away")


async def _wait_reader_gone() -> None:
    """Return once stdout is a pipe whose reader went away (`homing listen | head -1`); never
    for any other stdout. A write would find that out, but `listen` writes only when a
    delivery comes, and may wait for one for ever, holding the user's session meanwhile.

    The write end of a pipe is never readable; poll reports an error on it once the read end
    is closed (Linux; coreutils `tail -f` watches its output so), which wakes a reader."""
    try:
        fd = sys.stdout.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            await trio.lowlevel.wait_readable(fd)
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if any(events & select.POLLERR for _, events in poll.poll(0)):
                return
    except (AttributeError, ValueError, OSError):  # no stdout, or one poll cannot watch
        pass
    await trio.sleep_forever()  # a FIFO opened to read as well, say: leave it to the write


async def do_create(client, args) -> None:
    members = [m for m in (args.members or "").split(",") if m]
    conv = await client.create(args.kind, args.name, members, args.open, cid=args.cid)
    emit({"conv": conv})


async def do_invite(client, args) -> None:
    await client.invite(args.conv, args.user, args.role)
    emit({"conv": args.conv, "user": args.user, "ok": True})


async def do_set_role(client, args) -> None:
    await client.set_role(args.conv, args.user, args.role)
    emit({"conv": args.conv, "user": args.user, "role": args.role, "ok": True})


async def do_remove(client, args) -> None:
    await client.remove(args.conv, args.user)
    emit({"conv": args.conv, "user": args.user, "ok": True})


def _simple(method: str):
    async def run(client, args) -> None:
        await getattr(client, method)(args.conv)
        emit({"conv": args.conv, "ok": True})
    return run


async def do_mute(client, args) -> None:
    await client.mute(args.conv, not args.unmute)
    emit({"conv": args.conv, "muted": not args.unmute})


async def do_revoke(client, args) -> None:
    before = await client.revoke_tokens(args.user)
    # A token minted before the clock passes `before` is revoked too: return once it has (a
    # second at most on the broker's own clock, where `homing token` runs).
    await trio.sleep(min(1.0, max(0.0, before - time.time())))
    ahead = before - time.time()
    if ahead > 0:  # a cut-off logged earlier, while a clock ran ahead: say how long it holds
        warn("revoked_ahead", f"tokens of {args.user} issued before "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before))} ({math.ceil(ahead)} s "
             f"from now by this host's clock) are refused, also those minted until then: an "
             f"earlier revocation holds that cut-off (a clock that ran ahead then, or runs "
             f"behind here)")
    emit({"user": args.user, "before": before})


async def do_read(client, args) -> None:
    await client.read(args.conv, args.upto)
    emit({"conv": args.conv, "read": args.upto})


async def do_receipts(client, args) -> None:
    r = await client.receipts(args.conv, args.seq)
    emit({"conv": r.conv, "seq": r.seq, "delivered": list(r.delivered), "read": list(r.read)})


async def do_ack(client, args) -> None:
    await client.ack(args.upto)
    await client.ping()  # the ack reached the broker before we close
    emit({"acked": args.upto})


# The commands that take the device's delivering session (its deliveries, its cursor).
DELIVERING = (do_listen, do_ack)


async def do_history(client, args) -> None:
    if args.after is not None:  # the page right after it, in order
        page = await client.history(args.conv, after=args.after, limit=args.limit,
                                    order="oldest")
        messages = page.messages
    else:  # the latest page (before --before), printed oldest first
        page = await client.history(args.conv, before=args.before, limit=args.limit,
                                    order="newest")
        messages = tuple(reversed(page.messages))
    for m in messages:
        emit({"conv": args.conv, "seq": m.seq, "from": m.sender, **body_fields(m.body),
              "cid": m.cid, "ts": m.ts, "lsn": m.lsn})


async def do_members(client, args) -> None:
    m = await client.members(args.conv)
    emit({"conv": m.conv, "kind": m.kind, "name": m.name, "owners": list(m.owners),
          "admins": list(m.admins), "members": list(m.members)})


async def do_convs(client, args) -> None:
    after = None
    while True:
        page = await client.conversations(after=after, limit=1000)
        for c in page.convs:
            unread = max(0, c.last_seq - c.read)
            if unread or not args.unread:
                emit({"conv": c.conv, "kind": c.kind, "name": c.name, "role": c.role,
                      "last_seq": c.last_seq, "read": c.read, "unread": unread,
                      "muted": c.muted})
        if not page.more or not page.convs:
            return
        after = page.convs[-1].conv


async def do_presence(client, args) -> None:
    emit({"conv": args.conv, "online": list(await client.presence(args.conv))})


# -- argument parsing ------------------------------------------------------------------------------

def _client_options(p: argparse.ArgumentParser) -> None:
    default_server = os.environ.get("HOMING_SERVER", f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    p.add_argument("--server", default=default_server,
                   help="HOST:PORT of the broker (env HOMING_SERVER; default %(default)s)")
    p.add_argument("--token", default=os.environ.get("HOMING_TOKEN"),
                   help="access token (env HOMING_TOKEN); mint one with `homing token`")
    p.add_argument("--device", default="cli",
                   help="device name; successive commands with one name share a delivery "
                        "cursor (listen and ack take its session; the others leave it be)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument("--tls-ca", help="CA certificate file to verify the broker with (implies --tls)")
    p.add_argument("--connect-timeout", type=_SECONDS, default=30.0,
                   help="seconds to keep trying to (re)connect before giving up (default 30)")


def _number(kind: type, lo: float, hi: float | None = None):
    """An argparse type: a `kind` (int or float) from `lo` to `hi` (no upper bound if None)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        # not inf, nan (or 1e400, which float reads as inf); an int is (isfinite cannot take
        # one past a float's range)
        if out_of_range(value, lo, hi):
            finite = kind is not float or math.isfinite(value)
            span = f"at least {kind(lo)}" if hi is None else f"from {kind(lo)} to {kind(hi)}"
            raise argparse.ArgumentTypeError(
                f"must be {'' if finite else 'finite and '}{span}, not {text}")
        return value

    return parse


_COUNT = _number(int, 1)  # sizes, counts and limits: at least one


def _stats_interval(text: str) -> float:
    """`--stats-interval`: 0 (no stats lines), or at least MIN_STATS_INTERVAL_S seconds."""
    value = _number(float, 0)(text)
    if 0 < value < MIN_STATS_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"must be 0 (none) or at least {MIN_STATS_INTERVAL_S:g}, not {text}")
    return value
_SECONDS = _number(float, MIN_SECONDS)
_RATE = _number(float, MIN_SECONDS)
_WAIT = _number(float, MIN_SECONDS, MAX_WAIT_S)


def build_parser() -> argparse.ArgumentParser:
    parser = JsonErrorParser(prog="homing", description="homing: an event-sourced "
                             "instant-messaging broker")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = Config()
    s = sub.add_parser("serve", help="run the broker")
    s.add_argument("--data", default=DEFAULT_DATA_DIR,
                   help="data directory (default ./%(default)s)")
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=_number(int, 0, 65535), default=DEFAULT_PORT)
    s.add_argument("--tls-cert", help="PEM certificate chain; serve TLS")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--max-frame-bytes", type=_number(int, MIN_FRAME_LIMIT, MAX_FRAME_LIMIT),
                   default=d.max_frame_bytes)
    s.add_argument("--max-body-bytes", type=_COUNT, default=d.max_body_bytes)
    s.add_argument("--max-frame-values", type=_number(int, MIN_FRAME_VALUES, MAX_FRAME_LIMIT),
                   default=d.max_frame_values,
                   help="msgpack values (keys, values, items) in a client's frame (default "
                        "%(default)s)")
    s.add_argument("--window", type=_COUNT, default=d.window,
                   help="unacked deliveries in flight per device (default %(default)s)")
    s.add_argument("--heartbeat", type=_number(int, 1, UINT_MAX), default=d.heartbeat_s,
                   help="seconds")
    s.add_argument("--idle-timeout", type=_SECONDS, default=None,
                   help=f"seconds (default: three heartbeats, {d.idle_timeout_s:g})")
    s.add_argument("--handshake-timeout", type=_WAIT, default=d.handshake_timeout_s,
                   help="seconds")
    s.add_argument("--send-rate", type=_RATE, default=d.sends_per_s_per_connection,
                   help="sends per second per connection")
    s.add_argument("--user-send-rate", type=_RATE, default=d.sends_per_s_per_user,
                   help="sends per second per user")
    s.add_argument("--typing-rate", type=_RATE, default=d.typing_per_s_per_user,
                   help="typing notices per second per user; the rest are dropped")
    s.add_argument("--change-rate", type=_RATE, default=d.changes_per_s_per_user,
                   help="membership changes (create, invite, set_role, join, subscribe, leave, "
                        "remove, mute) per second per user; the rest are refused rate_limited")
    s.add_argument("--max-connections", type=_COUNT, default=d.max_connections)
    s.add_argument("--max-handshakes", type=_COUNT, default=d.max_handshakes,
                   help="connections not yet past hello, at most (default %(default)s)")
    s.add_argument("--max-connections-per-user", type=_COUNT,
                   default=d.max_connections_per_user)
    s.add_argument("--max-members", type=_COUNT, default=d.max_members)
    s.add_argument("--receipt-audience-max", type=_COUNT, default=d.receipt_audience_max,
                   help="members of a group above which its receipts are pushed only to its "
                        "owners and admins, as a channel's (default %(default)s)")
    s.add_argument("--max-pending-pushes", type=_COUNT, default=d.max_pending_pushes)
    s.add_argument("--max-batch", type=_COUNT, default=d.max_batch,
                   help="commands in one group commit at most (default %(default)s)")
    s.add_argument("--max-inflight-requests", type=_COUNT, default=d.max_inflight_requests,
                   help="requests of one connection awaiting their commit; past it the broker "
                        "stops reading that connection (default %(default)s)")
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
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument("--log-format", default="auto", choices=("auto", "json", "console"))
    s.add_argument("--log-buffer-bytes", type=_number(int, 4096, 1 << 30),
                   default=DEFAULT_LOG_BUFFER_BYTES,
                   help="log lines held for a sink slow to take them before lines are lost "
                        "(default %(default)s)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="print a signed access token")
    t.add_argument("user")
    t.add_argument("--data", default=DEFAULT_DATA_DIR, help="data directory holding the secret")
    role = t.add_mutually_exclusive_group()
    role.add_argument("--service", action="store_true", help="a service token")
    role.add_argument("--admin", action="store_true", help="an admin token")
    t.add_argument("--ttl", default="30d", help="lifetime, e.g. 30d, 12h (default %(default)s)")
    t.set_defaults(func=cmd_token)

    def client(name: str, help: str, body, check=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        _client_options(p)
        p.set_defaults(func=lambda a: run_client(a, body, check))
        return p

    snd = client("send", "send a message (prints its durable result)", do_send, check_send)
    target = snd.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="user id: the direct conversation with them")
    target.add_argument("--conv", help="conversation id")
    snd.add_argument("--cid", help="client message id (a retry with the same id sends nothing new)")
    snd.add_argument("--stdin", action="store_true", help="send each stdin line as a message")
    snd.add_argument("--cid-prefix", help="with --stdin: cid of line N is PREFIX-N")
    snd.add_argument("--pipeline", type=_COUNT, default=256,
                     help="with --stdin: sends in flight")
    snd.add_argument("text", nargs="?")

    lst = client("listen", "print deliveries (and ack them)", do_listen, check_listen)
    lst.add_argument("--count", type=_COUNT, help="stop after N deliveries")
    lst.add_argument("--timeout", type=_SECONDS,
                     help="stop after SECONDS with nothing arriving")
    lst.add_argument("--no-ack", action="store_true", help="print without acking")
    lst.add_argument("--start", choices=("first", "head"), default="first",
                     help="where a device the broker has no cursor for starts: first, the "
                          "whole inbox; head, only what arrives after (default %(default)s)")

    for kind in ("group", "channel"):
        grp = sub.add_parser(kind, help=f"{kind} commands")
        gsub = grp.add_subparsers(dest="action", required=True)
        c = gsub.add_parser("create", help=f"create a {kind}")
        _client_options(c)
        c.add_argument("name")
        c.add_argument("--members", help="comma-separated user ids")
        c.add_argument("--open", action="store_true", help="anyone may join/subscribe")
        c.add_argument("--cid", help=f"client id of this create: a retry with the same id "
                                     f"creates nothing new and prints the first {kind}")
        c.set_defaults(kind=kind, func=lambda a: run_client(a, do_create, check_create))

    inv = client("invite", "add a user to a group or channel", do_invite)
    inv.add_argument("conv")
    inv.add_argument("user")
    inv.add_argument("--role", choices=("member", "admin"), default="member")
    sr = client("role", "make a member of a group or channel an admin or a plain member",
                do_set_role)
    sr.add_argument("conv")
    sr.add_argument("user")
    sr.add_argument("role", choices=("member", "admin"))
    rm = client("remove", "take a member out of a group or channel", do_remove)
    rm.add_argument("conv")
    rm.add_argument("user")
    for name, method in (("join", "join"), ("leave", "leave"), ("subscribe", "subscribe")):
        client(name, f"{name} a conversation", _simple(method)).add_argument("conv")
    mute = client("mute", "mute a conversation", do_mute)
    mute.add_argument("conv")
    mute.add_argument("--unmute", action="store_true")
    rd = client("read", "mark a conversation read up to a seq", do_read)
    rd.add_argument("--conv", required=True)
    rd.add_argument("--upto", type=int, required=True)
    ack = client("ack", "ack this device's deliveries up to an inbox_seq", do_ack)
    ack.add_argument("--upto", type=int, required=True,
                     help="inbox_seq (as `listen --no-ack` printed it): acks it and all before")
    rc = client("receipts", "who received and who read a message", do_receipts)
    rc.add_argument("--conv", required=True)
    rc.add_argument("--seq", type=int, required=True)
    hs = client("history", "print a conversation's messages, oldest first", do_history)
    hs.add_argument("--conv", required=True)
    page = hs.add_mutually_exclusive_group()
    page.add_argument("--before", type=int, help="the messages before this seq (the latest ones)")
    page.add_argument("--after", type=int, help="the messages right after this seq")
    hs.add_argument("--limit", type=int, default=50)
    client("presence", "which members are online", do_presence).add_argument("conv")
    cv = client("convs", "list your conversations with their unread counts", do_convs)
    cv.add_argument("--unread", action="store_true",
                    help="only the conversations with unread messages")
    client("members", "a conversation's kind, name and members by role",
           do_members).add_argument("conv")
    client("revoke", "revoke every token of a user issued up to now (admin token)",
           do_revoke).add_argument("user")

    _add_optional(sub, "broker.audit_cli")
    _add_optional(sub, "broker.backup_cli")
    _add_optional(sub, "broker.secret_cli")
    _add_optional(sub, "bench.cli")
    return parser


def _add_optional(sub, module: str) -> None:
    """Register the subcommands whose parser lives in `module` (`add_parser(sub)`), if present."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return
    mod.add_parser(sub)


def _reader_gone() -> int:
    """stdout's reader went away (`homing token alice | head -c0`): stop quietly, as `homing
    audit` does, exit 1, with stdout on /dev/null so that the interpreter's final flush cannot
    fail again (it printed "Exception ignored ... BrokenPipeError" and exited 120)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args) or 0
        if sys.stdout is not None:  # None: started without one (`>&-`), nothing to flush
            sys.stdout.flush()  # here, where a reader gone away is told apart
        return status
    except BrokenPipeError:
        return _reader_gone()
    except CliError as exc:
        _drain_log()
        sys.stderr.write(json.dumps({"error": exc.name, "code": exc.code,
                                     "message": exc.message}) + "\n")
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # Ctrl-C inside a nursery of a command's own
        if group.split(KeyboardInterrupt)[1] is None:
            return 130
        raise


if __name__ == "__main__":
    # `python -m broker.cli`: run the imported module's main, so that the CliError raised by
    # the commands kept in other modules (audit, bench) is the class main catches.
    from broker.cli import main as imported_main

    sys.exit(imported_main())
