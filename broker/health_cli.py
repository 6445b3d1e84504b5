"""`homing health`: whether a broker is serving, for a monitor to run (docs/CLI.md, "Health";
docs/OPERATIONS.md, "Monitoring").

One requests-only session asks the broker's `stats` (a monitor or admin token's request) and
prints the figures as one JSON line, with a verdict the exit status repeats. The whole check is
bounded by `--timeout`: a broker that takes connections but answers nothing (stopped by SIGSTOP,
its event loop stuck) is `unreachable` once it passes, never a hung check. Nothing is retried: a
refused connection is reported at once, and a monitor's own schedule decides when to ask again.

The broker answers `stats` from memory, without a commit, so it answers while its commits do
not end: the figures say so (`commit_running_ms`), and past `--stall` the verdict is `stalled`.
A broker whose last commit failed (a full disk) is `failing`. With `--backlog USER:DEVICE` the
figures also say how many of that device's deliveries wait for its ack, and past
`--max-backlog` the verdict is `behind` (a service's `listen` that died). Each exits with
EXIT_NOT_WELL, apart from 1 (the check's token refused: a check misconfigured, not a broker
down) and 3 (no answer).
"""

from __future__ import annotations

import argparse
import os
import time

import trio

from broker.cli import _COUNT, _SECONDS, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, CliError, emit
from broker.config import DEFAULT_HOST, DEFAULT_PORT

EXIT_NOT_WELL = 4  # the broker answers, but: stalled, failing, behind, or unavailable
TIMEOUT_S = 10.0  # the whole check: under a Kubernetes probe's or Nagios' own timeouts
# A commit running this long is taken for a stall. A healthy commit takes milliseconds (two
# fsyncs); systemd's watchdog in the docs' unit waits 30 s for the same sign.
STALL_S = 10.0
DEVICE = "health"  # the device of the check's session: requests-only, it ends no `listen`


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing health` on the `homing` subparsers."""
    p = sub.add_parser("health", help="whether a broker is serving and committing (monitor token)")
    default_server = os.environ.get("HOMING_SERVER", f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    p.add_argument("--server", default=default_server,
                   help="HOST:PORT of the broker (env HOMING_SERVER; default %(default)s)")
    p.add_argument("--token", default=os.environ.get("HOMING_TOKEN"),
                   help="a monitor (or admin) token (env HOMING_TOKEN): "
                        "`homing token NAME --monitor`")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument("--tls-ca", help="CA certificate file to verify the broker with (implies --tls)")
    p.add_argument("--timeout", type=_SECONDS, default=TIMEOUT_S,
                   help="seconds the whole check may take; past it the broker is unreachable "
                        "(default %(default)g)")
    p.add_argument("--stall", type=_SECONDS, default=STALL_S,
                   help="seconds a commit may run before the broker is said stalled "
                        "(default %(default)g)")
    p.add_argument("--backlog", type=_user_device, metavar="USER:DEVICE",
                   help="also how many deliveries of USER's DEVICE wait for its ack")
    p.add_argument("--max-backlog", type=_COUNT, metavar="N",
                   help="with --backlog: more than N waiting is `behind` (default: no limit)")
    p.set_defaults(func=run_health)


def _user_device(text: str) -> tuple[str, str]:
    """`--backlog USER:DEVICE`: two ids (neither holds a colon, docs/PROTOCOL.md §4.1)."""
    from protocol import fields

    user, colon, device = text.partition(":")
    if not (colon and fields.user_id(user) and fields.user_id(device)):
        raise argparse.ArgumentTypeError(f"not USER:DEVICE, two ids of A-Z a-z 0-9 _ . @ + -: "
                                         f"{text!r}")
    return user, device


def run_health(args: argparse.Namespace) -> int:
    """Ask, print the figures and the verdict; raise CliError for anything but `ok`."""
    from broker.client_cli import connection_args

    if args.max_backlog is not None and args.backlog is None:
        raise CliError(EXIT_USAGE, "usage", "--max-backlog goes with --backlog USER:DEVICE")
    figures = _figures(args, connection_args(args))
    figures = {"status": _verdict(figures, args), **figures}
    emit(figures)
    _fail_unless_ok(figures, args)
    return 0


# What a broker that refused the session, or answered an error, says of its health.
_NOT_WELL = ("unavailable", "limit_exceeded")  # up, but serving no new session now
_STOPPING = ("shutting_down",)


def _figures(args: argparse.Namespace, tls) -> dict:
    """The broker's figures; CliError when it did not give them."""
    from broker.client import BrokerUnavailable, ClientError, ConnectionLost

    try:
        figures = trio.run(_ask, args, tls)
    except ClientError as exc:
        if exc.name == "unknown_type":
            raise CliError(EXIT_REFUSED, exc.name, "this broker does not answer `stats` (a "
                           "homing from before 2026-12-06): " + exc.message, exc.code) from None
        status = (EXIT_NOT_WELL if exc.name in _NOT_WELL
                  else EXIT_UNREACHABLE if exc.name in _STOPPING else EXIT_REFUSED)
        raise CliError(status, exc.name, exc.message, exc.code) from None
    except BrokerUnavailable as exc:  # reached, and refused the session or closed it
        if exc.name in _NOT_WELL or exc.name in _STOPPING:
            status = EXIT_NOT_WELL if exc.name in _NOT_WELL else EXIT_UNREACHABLE
            raise CliError(status, exc.name, str(exc), exc.code) from None
        raise CliError(EXIT_UNREACHABLE, "unreachable", str(exc)) from None
    except (ConnectionLost, OSError) as exc:
        raise CliError(EXIT_UNREACHABLE, "unreachable", str(exc)) from None
    if figures is None:
        raise CliError(EXIT_UNREACHABLE, "unreachable",
                       f"no answer from {args.server} within {args.timeout:g} s (--timeout)")
    return figures


def _fail_unless_ok(figures: dict, args: argparse.Namespace) -> None:
    """The error that follows the figures of a broker that is not `ok`."""
    status = figures["status"]
    if status == "stalled":
        raise CliError(EXIT_NOT_WELL, "stalled", (
            f"a commit has run for {figures['commit_running_ms'] / 1000:g} s (--stall "
            f"{args.stall:g}): {figures['committing']} commands in it and {figures['queued']} "
            "queued behind it wait; a disk that stopped answering?"))
    if status == "failing":
        raise CliError(EXIT_NOT_WELL, "failing", (
            f"the broker's last commit failed ({figures['failed']} commands answered "
            "`unavailable` since it started): a full disk? see its batch_failed log lines"))
    if status == "behind":
        user, device = args.backlog
        raise CliError(EXIT_NOT_WELL, "behind", (
            f"{figures['backlog']['unacked']} deliveries of {user}'s device {device} wait for "
            f"its ack (--max-backlog {args.max_backlog}): is its client running and reading "
            "them?"))


async def _ask(args: argparse.Namespace, tls) -> dict | None:
    """The broker's figures, with `answer_ms`; None if they did not come within --timeout."""
    from broker.client import open_client

    started = time.monotonic()
    with trio.move_on_after(args.timeout):
        async with open_client(args.server, args.token, DEVICE, tls=tls, reconnect=False,
                               reconnect_timeout=args.timeout, deliver=False) as client:
            stats = await client.stats(*(args.backlog or (None, None)))
        answer_ms = round((time.monotonic() - started) * 1000, 1)
        figures = {"answer_ms": answer_ms, **stats._asdict()}
        del figures["id"], figures["head"], figures["acked"]
        if args.backlog is not None:
            figures["backlog"] = {"user": args.backlog[0], "device": args.backlog[1],
                                  "head": stats.head, "acked": stats.acked,
                                  "unacked": max(0, stats.head - stats.acked)}
        return figures
    return None


def _verdict(figures: dict, args: argparse.Namespace) -> str:
    """`failing` (the last commit failed), `stalled` (one has run --stall s), `behind` (the
    device of --backlog has more than --max-backlog unacked), else `ok`."""
    if figures["failing"]:
        return "failing"
    if figures["commit_running_ms"] >= args.stall * 1000:
        return "stalled"
    if args.max_backlog is not None and figures["backlog"]["unacked"] > args.max_backlog:
        return "behind"
    return "ok"
