"""`homing secret rotate` and `homing secret retire`: the token-signing key changed with an
overlap (docs/OPERATIONS.md, "Rotating the signing secret"; docs/CLI.md). A running broker
takes the change up by itself within a second, and at once for a token of the new key."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker import keyring, tokens
from broker.cli import EXIT_USAGE, CliError, _os_why, emit
from broker.config import DEFAULT_DATA_DIR


def cmd_rotate(args: argparse.Namespace) -> int:
    data = Path(args.data)
    with _errors(args, "rotate"):
        new, previous = keyring.rotate(data)
    emit({"key_id": new, "previous_key_id": previous})
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    data = Path(args.data)
    with _errors(args, "retire"):
        retired, current = keyring.retire(data)
    emit({"retired_key_id": retired, "key_id": current})
    return 0


@contextmanager
def _errors(args: argparse.Namespace, action: str) -> Iterator[None]:
    """The failures of both actions as the command's JSON errors, exit 2 (docs/CLI.md)."""
    data = args.data
    try:
        yield
    except FileNotFoundError as exc:  # no secret.key, or no data directory at all
        if exc.filename is not None and Path(exc.filename).name not in (
                tokens.SECRET_FILE, Path(data).name):
            raise CliError(EXIT_USAGE, "data_dir", f"cannot use {data}: "
                           f"{_os_why(exc, Path(data), 'homing secret')}") from None
        raise CliError(EXIT_USAGE, "no_secret", f"{data} holds no {tokens.SECRET_FILE}: "
                       f"nothing to {action} (is --data the broker's data directory?)") from None
    except keyring.PreviousKeyHeld as exc:
        raise CliError(EXIT_USAGE, "previous_key", f"{data} still holds the previous key "
                       f"{exc} (one at most): once the tokens signed with it are replaced, "
                       f"retire it (homing secret retire --data {data}), then rotate") from None
    except keyring.RotateUnfinished as exc:
        raise CliError(EXIT_USAGE, "rotate_unfinished", f"{data}'s previous key is its current "
                       f"key {exc}: a rotate was cut short; nothing retired. Finish it (homing "
                       f"secret rotate --data {data}), hand out new tokens, then retire") from None
    except tokens.SecretError as exc:
        raise CliError(EXIT_USAGE, "bad_secret", str(exc)) from None
    except OSError as exc:
        raise CliError(EXIT_USAGE, "data_dir", f"cannot use {data}: "
                       f"{_os_why(exc, Path(data), 'homing secret')}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `homing secret rotate|retire` on the `homing` subparsers."""
    p = sub.add_parser("secret", help="rotate the token-signing key, retire the previous one")
    actions = p.add_subparsers(dest="action", required=True)
    for name, func, help in (
            ("rotate", cmd_rotate, "sign new tokens with a new key; the current one's tokens "
                                   "still work until it is retired"),
            ("retire", cmd_retire, "refuse the tokens of the previous key, and end their "
                                   "sessions")):
        a = actions.add_parser(name, help=help)
        a.add_argument("--data", default=DEFAULT_DATA_DIR,
                       help="data directory holding the keys (default ./%(default)s)")
        a.set_defaults(func=func)
