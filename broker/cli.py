"""The `homing` command: serve, mint tokens, and talk to a broker from scripts.

Output contract (docs/CLI.md): client commands print one JSON object per line on stdout; errors
go to stderr as one JSON object {"error", "code", "message"} with a non-zero exit status:
1 the broker refused the request, 2 bad usage, 3 the broker could not be reached.

This module holds what keeps that contract for every subcommand: the exit statuses, CliError,
emit and warn, the argument parser and `main` (the `homing` entry point). The commands live in
the `*_cli` modules beside it, each registering its own with `add_parser(sub)`: serve_cli
(`serve`, `token`), client_cli (the commands that talk to a broker), audit_cli, backup_cli,
secret_cli, and bench/cli.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from broker.config import MIN_SECONDS, out_of_range

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


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


def _os_why(exc: OSError, data: Path, who: str = "the broker") -> str:
    """Why a data directory cannot be used: the error, after the file it met it on (one in
    the directory: its lock, its secret) and, for a permission refused, the uid that asked."""
    why = str(exc.strerror or exc)
    if exc.filename is not None and Path(os.fsdecode(exc.filename)) != data:
        why = f"{os.fsdecode(exc.filename)}: {why}"
    if exc.errno == errno.EACCES:
        why += f" ({who} runs as uid {os.getuid()})"
    return why


def _number(kind: type, lo: float, hi: float | None = None):
    """An argparse type: a `kind` (int or float) from `lo` to `hi` (no upper bound if None)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            # "1.5" for a count or whole seconds is a number, just not one this flag takes
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        # not inf, nan (or 1e400, which float reads as inf); an int is (isfinite cannot take
        # one past a float's range)
        if out_of_range(value, lo, hi):
            finite = kind is not float or math.isfinite(value)
            span = f"at least {kind(lo)}" if hi is None else f"from {kind(lo)} to {kind(hi)}"
            raise argparse.ArgumentTypeError(
                f"must be {'' if finite else 'finite and '}{span}, not {text}")
        return value

    return parse


# The argument types both serve_cli and client_cli take.
_COUNT = _number(int, 1)  # sizes, counts and limits: at least one
_SECONDS = _number(float, MIN_SECONDS)


def build_parser() -> argparse.ArgumentParser:
    parser = JsonErrorParser(prog="homing", description="homing: an event-sourced "
                             "instant-messaging broker")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Imported here, not at the top: they import this module's plumbing (CliError, emit, ...).
    from broker import client_cli, health_cli, serve_cli

    serve_cli.add_parser(sub)
    client_cli.add_parser(sub)
    health_cli.add_parser(sub)
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
    # the commands, all kept in other modules (serve_cli, client_cli, audit_cli, bench), is the
    # class main catches.
    from broker.cli import main as imported_main

    sys.exit(imported_main())
