"""The `homing` command's output as the contract docs/CLI.md says it is: for each command, the
exact top-level keys of its success line and the type of each, its documented error lines
(name, code, exit status), and a stderr of JSON objects only.

The key sets are read from the docs, so a change to either side fails here: the example lines
where a doc prints one (`send`, `listen`; `backup` and `health` in docs/OPERATIONS.md), else the
doc's own `{"key", "key": VALUE[, "optional"]}` notation (the Conversations table, Health,
`homing secret`, `ack`, and OPERATIONS.md's Auditing). What the docs give only in words (the
types of most values, the keys a delivery gains) is listed here next to the sentence it comes
from, and that sentence is checked to be still in the doc.

All commands run as child processes against one `homing serve` child per module (per xdist
worker), each test on users of its own. Every stderr line must be a JSON warning or, last, the
JSON error (Conventions, "stderr"); `homing serve`'s own lines are its JSON log events.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.procs import BrokerProcess, as_user, free_port, homing

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "docs" / "CLI.md"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"

NULL = type(None)
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_WELL = 0, 1, 2, 3, 4


# -- reading the docs ------------------------------------------------------------------------------

def _flat(path: Path) -> str:
    """The doc's text with every run of whitespace one space (its sentences wrap anywhere)."""
    return " ".join(path.read_text(encoding="utf-8").split())


def said(path: Path, sentence: str) -> str:
    """`sentence`, checked to be in the doc still: a key or type listed in this module from
    the doc's words must go when those words go."""
    assert " ".join(sentence.split()) in _flat(path), f"{path.name} no longer says: {sentence}"
    return sentence


def brace_after(path: Path, anchor: str) -> str:
    """The first backticked span holding a `{...}` after `anchor` in the doc."""
    text = _flat(path)
    at = text.find(" ".join(anchor.split()))
    assert at >= 0, f"{path.name} no longer says: {anchor}"
    span = re.compile(r"`([^`]*\{[^`]*\})`").search(text, at + len(anchor))
    assert span, f"no `{{...}}` after {anchor!r} in {path.name}"
    return span.group(1)


def brace_keys(spec: str) -> tuple[set[str], set[str]]:
    """The top-level keys of a doc's object notation, as (always printed, printed at times):
    `{"conv", "read": SEQ}`, `{"ok", "events", "log": {...}[, "anchor": {...}]}` (a `[, ...]`
    group is optional), values written as words, `[users]` or nested objects skipped."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', spec[spec.index("{"):])
    required: set[str] = set()
    optional: set[str] = set()
    in_optional, want_key, i = 0, True, 1
    while tokens[i] != "}":
        token = tokens[i]
        if token == "[" and tokens[i + 1] == ",":  # `[, "key", ...]`: printed at times
            in_optional, i = in_optional + 1, i + 2
            want_key = True
            continue
        if token == "]" and in_optional:
            in_optional -= 1
        elif token == ",":
            want_key = True
        elif token == ":":
            i = _skip_value(tokens, i + 1)
            want_key = False
            continue
        elif token.startswith('"') and want_key:
            (optional if in_optional else required).add(token.strip('"'))
            want_key = False
        i += 1
    return required, optional


def _skip_value(tokens: list[str], i: int) -> int:
    """The index past the value starting at `tokens[i]`: a nested `{...}` or `[...]`, or words."""
    if tokens[i] in "{[":
        depth = 0
        while True:
            depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(tokens[i], 0)
            i += 1
            if depth == 0:
                return i
    while tokens[i] not in (",", "}", "]"):
        i += 1
    return i


def inner(spec: str, first_key: str) -> str:
    """The nested object of a doc's notation that begins with `first_key`."""
    return spec[spec.index(f'{{"{first_key}"'):]


def example_line(path: Path, first_key: str) -> dict:
    """The doc's example output line (an indented JSON object) whose first key is `first_key`."""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith(f'{{"{first_key}"'):
            return json.loads(line)
    raise AssertionError(f"{path.name} shows no line starting {{\"{first_key}\"")


def conversation_table() -> dict[str, tuple[set[str], set[str]]]:
    """CLI.md's Conversations table: each command of a row, the keys of what it prints."""
    rows = {}
    for line in CLI.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `homing"):
            continue
        command, prints = re.split(r"(?<!\\)\|", line)[1:3]
        keys = brace_keys(re.search(r"`([^`]*\{[^`]*\})`", prints).group(1))
        for name in re.findall(r"`homing ((?:group|channel) create|[a-z]+)", command):
            rows[name] = keys
    return rows


def registry() -> dict[str, int]:
    """The protocol's error registry, docs/PROTOCOL.md §7: name to code."""
    return {name: int(code) for code, name in re.findall(
        r"^\| (\d+) \| `([a-z_]+)` \|", PROTOCOL.read_text(encoding="utf-8"), re.M)}


# Conventions, "stderr": the warning and error objects.
WARNING_KEYS = brace_keys(brace_after(CLI, "**stderr**: a warning is one JSON object"))
ERROR_KEYS = brace_keys(brace_after(CLI, "On failure the last line is one JSON object"))


# -- running commands ------------------------------------------------------------------------------

class Ran:
    """What a command printed: its stdout objects, its stderr warnings and error (or None)."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.proc = proc
        objects = [json.loads(line) for line in proc.stderr.splitlines()]
        for obj in objects:
            assert isinstance(obj, dict), proc.stderr
        self.error = objects.pop() if proc.returncode != 0 and objects else None
        self.warnings = objects

    @property
    def out(self) -> list[dict]:
        """stdout's JSON objects, one a line (not `homing token`'s lines)."""
        return [json.loads(line) for line in self.proc.stdout.splitlines()]


def run(*args: str, status: int = EXIT_OK, env: dict | None = None, input: str | None = None,
        error: str | None = None, code: int | None = None) -> Ran:
    """Run `homing ARGS`, check its exit status and that stderr is JSON only (Conventions):
    warnings of their exact keys and, on failure, the error `error` last, with its `code`
    (by default the registry's for a name of the registry, a broker's refusal, else 0)."""
    proc = homing(*args, env=env, input=input, check=False)
    assert proc.returncode == status, (args, proc.returncode, proc.stderr)
    try:
        ran = Ran(proc)
    except ValueError:  # a line that is no JSON
        raise AssertionError(f"homing {' '.join(args)}: stderr is not JSON lines:\n"
                             f"{proc.stderr}") from None
    for warning in ran.warnings:
        assert set(warning) == WARNING_KEYS[0], warning
        assert all(type(v) is str for v in warning.values()), warning
    if status == EXIT_OK:
        assert ran.error is None, proc.stderr
    else:
        assert ran.error is not None, f"homing {' '.join(args)}: no error line"
        assert set(ran.error) == ERROR_KEYS[0], ran.error
        assert (type(ran.error["error"]), type(ran.error["code"]),
                type(ran.error["message"])) == (str, int, str), ran.error
        assert ran.error["error"] == error, ran.error
        assert ran.error["code"] == (registry().get(error, 0) if code is None else code), \
            ran.error
    return ran


def check(obj: dict, keys: tuple[set[str], set[str]], types: dict[str, tuple]) -> None:
    """`obj` has every key of `keys[0]`, others of `keys[1]` only, each of its listed type
    (exactly: a bool is no int here); `types` lists the doc's keys, no more."""
    required, optional = keys
    assert set(types) == required | optional, "the test's types and the doc's keys differ"
    assert required <= set(obj) <= required | optional, (sorted(obj), sorted(required),
                                                         sorted(optional))
    for key, value in obj.items():
        assert type(value) in types[key], (key, value, types[key])


def shown(example: dict, types: dict[str, tuple]) -> tuple[set[str], set[str]]:
    """The keys of a doc's example line, each value of it checked to be of the type listed
    here (the types are the example's, and what the doc says in words of others)."""
    for key, value in example.items():
        assert type(value) in types[key], (key, value, types[key])
    return set(example), set(types) - set(example)


def one(ran: Ran) -> dict:
    [obj] = ran.out
    return obj


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with BrokerProcess(tmp_path_factory.mktemp("contract") / "data") as bp:
        yield bp


# -- messages ----------------------------------------------------------------------------------

SEND = {"conv": (str,), "seq": (int,), "lsn": (int,), "cid": (str,), "dup": (bool,)}
DELIVERY = {"inbox_seq": (int,), "conv": (str,), "seq": (int,), "from": (str,),
            "body": (str, NULL), "cid": (str, NULL), "ts": (int,),
            # "Deliveries that are not messages carry `"kind"`: ... `body` and `cid` null";
            # "A delivery from a muted conversation carries `"muted": true`"; "a binary body
            # is printed as `"body_b64"`" (Conventions).
            "kind": (str,), "muted": (bool,), "body_b64": (str,)}


def test_send_listen_and_ack_print_the_docs_example_lines(broker):
    """`send` (TEXT, a dup, `--stdin`), `listen` (a message, `added`, muted, `removed`) and
    `ack` print the keys of CLI.md's Messages examples, of the types they show."""
    said(CLI, 'Deliveries that are not messages carry `"kind"`: `"added"`')
    said(CLI, 'A delivery from a muted conversation carries `"muted": true`')
    said(CLI, 'a binary body is printed as `"body_b64"` (base64) instead of `"body"`')
    shop, bob = as_user(broker, "m_shop"), as_user(broker, "m_bob")
    send_keys = shown(example_line(CLI, "conv"), SEND)
    assert send_keys == ({"conv", "seq", "lsn", "cid", "dup"}, set())

    first = one(run("send", "--to", "m_bob", "--cid", "c1", "hi", env=shop))
    check(first, send_keys, SEND)
    assert one(run("send", "--to", "m_bob", "--cid", "c1", "hi", env=shop))["dup"] is True
    for line in run("send", "--to", "m_bob", "--stdin", env=shop, input="a\nb\n").out:
        check(line, send_keys, SEND)

    conv = one(run("group", "create", "g", "--members", "m_bob", env=shop))["conv"]
    run("mute", conv, env=bob)
    run("send", "--conv", conv, "muted post", env=shop)
    run("remove", conv, "m_bob", env=shop)
    trio.run(_send_binary, broker, "m_shop", "m_bob")  # (only the SDK sends bytes)
    got = run("listen", "--count", "7", "--timeout", "10", "--no-ack", env=bob).out
    example, _ = shown(example_line(CLI, "inbox_seq"), DELIVERY)
    listen_keys = (example - {"body"}, {"body", "body_b64", "kind", "muted"})
    for delivery in got:
        check(delivery, listen_keys, DELIVERY)
        assert ("body" in delivery) != ("body_b64" in delivery), delivery
    assert [d.get("kind") for d in got] == [None, None, None, "added", None, "removed", None]
    assert [d.get("muted", False) for d in got][4] is True
    added = got[3]
    assert (added["seq"], added["body"], added["cid"]) == (0, None, None)
    assert got[6]["body_b64"] == "AP9iaW4="
    # `history` prints a binary body so too: its row's keys, `body_b64` in place of `body`
    [line] = run("history", "--conv", "dm:m_bob:m_shop", "--after", "3", env=bob).out
    text_only = {k: v for k, v in CONVERSATIONS["history"].items() if k != "body"}
    check(line, (conversation_table()["history"][0] - {"body"}, {"body_b64"}),
          {**text_only, "body_b64": (str,)})
    assert line["body_b64"] == "AP9iaW4="
    # `homing ack --upto INBOX_SEQ` ... prints `{"acked": INBOX_SEQ}`
    acked = one(run("ack", "--upto", str(got[-1]["inbox_seq"]), env=bob))
    check(acked, brace_keys(brace_after(CLI, "with `homing ack --upto INBOX_SEQ`")),
          {"acked": (int,)})


async def _send_binary(bp: BrokerProcess, sender: str, to: str) -> None:
    async with bp.client(sender) as client:
        await client.send(b"\x00\xffbin", to=to)


# -- conversations ---------------------------------------------------------------------------------

# The values of CLI.md's Conversations table: `true`, `SEQ`, `[users]`, and in words.
CONVERSATIONS = {
    "group create": {"conv": (str,)},
    "channel create": {"conv": (str,)},
    "invite": {"conv": (str,), "user": (str,), "ok": (bool,)},
    "role": {"conv": (str,), "user": (str,), "role": (str,), "ok": (bool,)},
    "remove": {"conv": (str,), "user": (str,), "ok": (bool,)},
    "join": {"conv": (str,), "ok": (bool,)},
    "subscribe": {"conv": (str,), "ok": (bool,)},
    "leave": {"conv": (str,), "ok": (bool,)},
    "mute": {"conv": (str,), "muted": (bool,)},
    "read": {"conv": (str,), "read": (int,)},
    "receipts": {"conv": (str,), "seq": (int,), "delivered": (list,), "read": (list,),
                 "unread": (list,)},
    # `ts` integers (Conventions, "Timestamps"); a message's body as in `listen`
    "history": {"conv": (str,), "seq": (int,), "from": (str,), "body": (str,), "cid": (str,),
                "ts": (int,), "lsn": (int,)},
    # a direct conversation has no name: null
    "convs": {"conv": (str,), "kind": (str,), "name": (str, NULL), "role": (str,),
              "last_seq": (int,), "read": (int,), "unread": (int,), "muted": (bool,)},
    "presence": {"conv": (str,), "online": (list,)},
    # "`before` (Unix seconds, the next whole second)"
    "revoke": {"user": (str,), "before": (int,)},
    "members": {"conv": (str,), "kind": (str,), "name": (str, NULL), "owners": (list,),
                "admins": (list,), "members": (list,)},
}


def test_every_conversation_command_prints_its_row_of_the_table(broker):
    """Each command of CLI.md's Conversations table prints one line (history and convs one
    per item) of the keys its row shows, and the table names no command not run here."""
    table = conversation_table()
    assert set(table) == set(CONVERSATIONS)
    said(CLI, "`before` (Unix seconds, the next whole second)")
    owner, cat = as_user(broker, "c_ann"), as_user(broker, "c_cat")
    admin = as_user(broker, "c_root", "admin")
    printed: dict[str, list[dict]] = {}

    def do(name: str, *args: str, env: dict) -> dict:
        ran = run(*name.split(), *args, env=env)
        printed.setdefault(name, []).extend(ran.out)
        return ran.out[0] if ran.out else {}

    group = do("group create", "g", "--open", env=owner)["conv"]
    channel = do("channel create", "news", "--open", env=owner)["conv"]
    do("invite", group, "c_ben", env=owner)
    do("role", group, "c_ben", "admin", env=owner)
    do("remove", group, "c_ben", env=owner)
    do("join", group, env=cat)
    do("subscribe", channel, env=cat)
    sent = one(run("send", "--conv", group, "hello", env=owner))
    do("mute", group, env=cat)
    do("read", "--conv", group, "--upto", str(sent["seq"]), env=cat)
    do("receipts", "--conv", group, "--seq", str(sent["seq"]), env=owner)
    do("history", "--conv", group, env=cat)
    do("convs", env=cat)
    do("presence", group, env=owner)
    do("members", group, env=owner)
    do("leave", group, env=cat)
    do("revoke", "c_ben", env=admin)

    assert set(printed) == set(CONVERSATIONS)
    for name, objects in printed.items():
        assert objects, name
        for obj in objects:
            check(obj, table[name], CONVERSATIONS[name])


# -- refusals and failures of client commands ------------------------------------------------------

def test_refusals_are_error_lines_of_the_registry_and_failures_the_commands_own(broker):
    """A broker's refusal is exit 1 with its registry name and code; bad usage exit 2,
    `usage`, code 0; a broker out of reach exit 3, `unreachable`, code 0, after a `retrying`
    warning (Conventions: "exit status", "stderr")."""
    shop = as_user(broker, "r_shop")
    sent = one(run("send", "--to", "r_bob", "--cid", "r1", "hi", env=shop))
    group = one(run("group", "create", "g", env=shop))["conv"]
    for args, error in [
            (("send", "--to", "Bad User", "x"), "invalid"),
            (("history", "--conv", group), "forbidden"),
            (("receipts", "--conv", sent["conv"], "--seq", "99"), "not_found"),
            (("send", "--conv", group, "--cid", "r1", "x"), "conflict")]:
        env = as_user(broker, "r_eve") if error == "forbidden" else shop
        assert run(*args, env=env, status=EXIT_REFUSED, error=error).out == []
    forged = {**shop, "HOMING_TOKEN": "v1.abc.def"}
    run("send", "--to", "r_bob", "hi", env=forged, status=EXIT_REFUSED, error="unauthorized")
    run("send", "--to", "r_bob", env=shop, status=EXIT_USAGE, error="usage")
    gone = run("convs", "--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.1",
               env=shop, status=EXIT_UNREACHABLE, error="unreachable")
    assert [w["warning"] for w in gone.warnings] == ["retrying"]


# -- health ----------------------------------------------------------------------------------------

# The values of CLI.md's Health line, as docs/PROTOCOL.md's `broker_stats` reply gives them:
# counts and milliseconds are integers but `answer_ms` (the check's own time, to 0.1 ms);
# "`disk_free_bytes` null where it cannot be told", "`commits_stopped` null from a broker
# before 2026-12-06" (this one's: an integer), `open_files`, `open_files_limit` and
# `tls_expires_s` null where they cannot be told or without TLS.
HEALTH = {"status": (str,), "answer_ms": (float,), "lsn": (int,), "queued": (int,),
          "committing": (int,), "commit_running_ms": (int,), "failing": (bool,),
          "commits": (int,), "commit_ms": (int,), "commands": (int,), "failed": (int,),
          "rate_limited": (int,), "connections": (int,), "requests_only": (int,),
          "handshaking": (int,), "uptime_s": (int,), "disk_free_bytes": (int, NULL),
          "commits_stopped": (int,), "max_connections": (int,), "connections_full": (int,),
          "handshakes_full": (int,), "open_files": (int, NULL), "open_files_limit": (int, NULL),
          "tls_expires_s": (int, NULL), "backlog_max": (int,), "windows_full": (int,),
          "auth_throttled": (int,), "accept_failed": (int,), "handshakes_given_up": (int,),
          "backlog": (dict,)}
BACKLOG = {"user": (str,), "device": (str,), "head": (int,), "acked": (int,), "unacked": (int,)}


def test_health_prints_the_figures_of_the_docs(broker):
    """`homing health` prints CLI.md's figures (OPERATIONS.md's example line has the same
    keys), `backlog` with `--backlog`; `behind` is those figures, then the error, exit 4; a
    token not an admin's is `forbidden`, exit 1, no figures; no broker, exit 3."""
    said(CLI, "`disk_free_bytes` null where it cannot be told")
    figures = brace_keys(brace_after(CLI, "It prints one line of the broker's figures"))
    assert figures == (shown(example_line(OPERATIONS, "status"), HEALTH)[0], set())
    with_backlog = (figures[0], {"backlog"})
    backlog_keys = brace_keys(brace_after(CLI, "and with `--backlog USER:DEVICE` also"))
    admin = as_user(broker, "h_ops", "admin")
    for _ in range(2):
        run("send", "--to", "h_dan", "x", env=as_user(broker, "h_shop"))

    ok = one(run("health", env=admin))
    check(ok, with_backlog, HEALTH)
    assert "backlog" not in ok and ok["status"] == "ok"
    ok = one(run("health", "--backlog", "h_dan:cli", env=admin))
    check(ok, with_backlog, HEALTH)
    check(ok["backlog"], backlog_keys, BACKLOG)
    behind = run("health", "--backlog", "h_dan:cli", "--max-backlog", "1", env=admin,
                 status=EXIT_NOT_WELL, error="behind")
    check(one(behind), with_backlog, HEALTH)
    assert one(behind)["status"] == "behind"
    refused = run("health", env=as_user(broker, "h_ops"), status=EXIT_REFUSED,
                  error="forbidden")
    assert refused.out == []
    run("health", "--server", f"127.0.0.1:{free_port()}", env=admin,
        status=EXIT_UNREACHABLE, error="unreachable")


# -- tokens and secrets ----------------------------------------------------------------------------

def test_token_and_secret_print_what_running_and_tokens_says(tmp_path):
    """`homing token` prints one `v1.<claims>.<signature>` a USER, with `secret_created` on
    stderr when it made the secret; `secret rotate` and `retire` print their documented keys
    and fail with their own names, exit 2."""
    said(CLI, "The token is `v1.<claims>.<signature>`")
    data = str(tmp_path / "data")
    made = run("token", "t_ann", "t_ben", "--data", data)
    assert [w["warning"] for w in made.warnings] == ["secret_created"]
    tokens = made.proc.stdout.splitlines()
    assert len(tokens) == 2 and all(re.fullmatch(r"v1\.[\w-]+\.[\w-]+", t) for t in tokens)
    assert run("token", "t_ann", "--data", data).warnings == []
    run("token", "Bad User", "--data", data, status=EXIT_USAGE, error="usage")

    key_id = (str,)  # "12 hex digits each"; `retired_key_id` "null when no previous key"
    said(CLI, "(12 hex digits each)")
    said(CLI, "`retired_key_id` null when no previous key was held")
    rotate_keys = brace_keys(brace_after(CLI, "`homing secret rotate [--data DIR]`"))
    retire_keys = brace_keys(brace_after(CLI, "`homing secret retire [--data DIR]`"))
    check(one(run("secret", "rotate", "--data", data)), rotate_keys,
          {"key_id": key_id, "previous_key_id": key_id})
    run("secret", "rotate", "--data", data, status=EXIT_USAGE, error="previous_key")
    for _ in range(2):  # a previous key retired; then none held
        check(one(run("secret", "retire", "--data", data)), retire_keys,
              {"retired_key_id": (str, NULL), "key_id": key_id})
    shutil.copy(Path(data) / "secret.key", Path(data) / "secret.prev.key")
    run("secret", "retire", "--data", data, status=EXIT_USAGE, error="rotate_unfinished")
    run("secret", "rotate", "--data", str(tmp_path / "none"), status=EXIT_USAGE,
        error="no_secret")
    (Path(data) / "secret.key").write_bytes(b"cut short")
    for args in (("secret", "rotate"), ("token", "t_ann")):
        run(*args, "--data", data, status=EXIT_USAGE, error="bad_secret")


# -- serve -----------------------------------------------------------------------------------------

def _json_log_keys() -> set[str]:
    """The keys OPERATIONS.md's "Logs" says every JSON line holds: "In JSON, a line is the
    event's fields, then `event`, `level` and `timestamp` in that order" (its example line after
    that holds one event's fields, not every line's)."""
    text = _flat(OPERATIONS)
    start = text.index("In JSON, a line is")
    named = set(re.findall(r"`(\w+)`", text[start:text.index(" in that order", start)]))
    assert named == {"event", "level", "timestamp"}, named
    return named


def test_serve_that_cannot_start_prints_nothing_and_ends_its_log_with_the_error(broker,
                                                                                 tmp_path):
    """`homing serve` prints nothing on stdout; on stderr its JSON log lines, each with the
    keys OPERATIONS.md's "Logs" names, then, when it cannot start, the error: `locked`
    (another broker serves DIR) or `listen` (the port is taken), exit 2."""
    log_keys = _json_log_keys()
    served = broker.logfile.read_text(encoding="utf-8").split("\n")[:-1]  # whole lines
    assert served  # (broker_listening at least)
    for line in map(json.loads, served):
        assert log_keys <= set(line) and all(type(line[k]) is str for k in log_keys), line
    for flags, error in [(("--data", str(broker.data), "--port", str(free_port())), "locked"),
                         (("--data", str(tmp_path / "d"), "--port", str(broker.port)), "listen")]:
        proc = homing("serve", *flags, "--log-format", "json", check=False)
        assert (proc.returncode, proc.stdout) == (EXIT_USAGE, ""), proc.stderr
        *logged, last = [json.loads(line) for line in proc.stderr.splitlines()]
        for line in logged:
            assert log_keys <= set(line) and all(type(line[k]) is str for k in log_keys), line
        assert set(last) == ERROR_KEYS[0] and (last["error"], last["code"]) == (error, 0)


# -- backups and audits ----------------------------------------------------------------------------

# OPERATIONS.md, Auditing: "In JSON, `"ts"` is always an ISO-8601 UTC string", events also
# carry "`"ts_us"`" (integer microseconds); LSNs and counts are integers.
AUDIT = {
    "verify": {"ok": (bool,), "events": (int,), "log": (dict,), "head": (dict,),
               "projections": (dict,), "anchor": (dict,)},
    "rebuild": {"ok": (bool,), "rebuilt": (int,), "seconds": (float,)},
    "check": {"ok": (bool,), "check": (bool,), "replayed": (int,), "difference": (dict,)},
    "trace": {"conv": (str,), "seq": (int,), "from": (str,), "lsn": (int,), "ts": (str,),
              "recipients": (dict,)},
    "inbox": {"user": (str,), "lsn": (int,), "ts": (str,), "inbox_head": (int,),
              "inbox": (list,), "unread": (dict,), "muted": (list,), "delivered": (dict,)},
    "stats": {"events": (int,), "by_type": (dict,), "users": (int,), "conversations": (int,),
              "log_bytes": (int,), "disk_bytes": (int,), "first_ts": (str,),
              "last_ts": (str,), "first_lsn": (int,), "last_lsn": (int,)},
    "event": {"lsn": (int,), "ts": (str,), "ts_us": (int,), "type": (str,), "actor": (str,),
              "device": (str,), "data": (dict,)},
    "export": {"lsn": (int,), "ts": (str,), "ts_us": (int,), "type": (str,), "actor": (str,),
               "device": (str,), "data": (dict,), "prev": (str,), "digest": (str,),
               "record_b64": (str,)},
    "verify-export": {"ok": (bool,), "lines": (int,), "first_lsn": (int, NULL),
                      "last_lsn": (int, NULL), "prev": (dict, NULL), "file": (dict,),
                      "head": (dict,), "anchors": (list,)},
}
AUDIT_ANCHORS = {
    "verify": "**verify** prints", "rebuild": "**rebuild** without `--check` takes",
    "check": "`--check` prints the projection half of verify", "trace": "**trace** prints",
    "inbox": "those are left out: `--at-lsn` is exact) and prints", "stats": "**stats** prints",
    "event": "**Event objects** (`log --json`, `export`):",
    "export": "**Export lines** (`export`):", "verify-export": "Only the last line may lack "
    "its line break. It prints"}
BACKUP = {"backup": (str,), "last_lsn": (int,), "head": (dict,), "bytes": (int,),
          "secret": (bool,), "previous_secret": (bool,), "seconds": (float,)}


def test_backup_and_audit_print_the_keys_of_operations(broker, tmp_path):
    """`homing backup` prints OPERATIONS.md's example line (CLI.md's keys too); each `audit`
    action's JSON is its Auditing paragraph's; and their errors are their own names: a backup
    into a used DEST `data_dir`, of no data directory `no_data` (exit 2), a trace of no
    message `not_found` and a verify against another anchor `corrupt_log` (exit 1), a
    rebuild of a served directory `locked` (exit 2)."""
    said(OPERATIONS, 'In JSON, `"ts"` is always an ISO-8601 UTC string')
    keys = {name: brace_keys(brace_after(OPERATIONS, anchor))
            for name, anchor in AUDIT_ANCHORS.items()}
    shop = as_user(broker, "a_shop")
    run("send", "--to", "a_bob", "--cid", "a1", "hi", env=shop)
    run("group", "create", "g", "--members", "a_bob", env=shop)  # an `added` inbox entry
    run("listen", "--count", "2", "--timeout", "10", env=as_user(broker, "a_bob"))

    copy = tmp_path / "copy"
    backup_keys = shown(example_line(OPERATIONS, "backup"), BACKUP)
    assert backup_keys == brace_keys(brace_after(CLI, "`homing backup DEST [--data DIR]`"))
    backup = one(run("backup", str(copy), "--data", str(broker.data)))
    check(backup, backup_keys, BACKUP)
    run("backup", str(copy), "--data", str(broker.data), status=EXIT_USAGE, error="data_dir")
    run("backup", str(tmp_path / "c2"), "--data", str(tmp_path / "none"), status=EXIT_USAGE,
        error="no_data")

    data = ("--data", str(copy))
    verified = one(run("audit", "verify", *data))
    check(verified, keys["verify"], AUDIT["verify"])
    assert verified["head"] == backup["head"]
    anchor = f"{backup['last_lsn']}:{'0' * 64}"
    wrong = run("audit", "verify", *data, "--anchor", anchor, status=EXIT_REFUSED,
                error="corrupt_log")
    said(OPERATIONS, "for an empty log; left out when the log fails")  # verify's head
    required, optional = keys["verify"]
    check(one(wrong), (required - {"head"}, optional | {"head"}), AUDIT["verify"])
    check(one(run("audit", "rebuild", "--check", *data)), keys["check"], AUDIT["check"])
    trace = one(run("audit", "trace", "--cid", "a1", "--from", "a_shop", "--json", *data))
    check(trace, keys["trace"], AUDIT["trace"])
    # "recipients": {user: {"delivered", "devices": {device: ts}, "read"}}, times or null
    recipient = brace_keys(inner(brace_after(OPERATIONS, AUDIT_ANCHORS["trace"]), "delivered"))
    check(trace["recipients"]["a_bob"], recipient,
          {"delivered": (str, NULL), "devices": (dict,), "read": (str, NULL)})
    said(CLI, "those of `homing audit`: `no_data`, `outdated_layout`, `corrupt_log`, "
              "`projection_mismatch`, `not_found`")  # the command's own names: N is 0
    run("audit", "trace", "--conv", "dm:a_bob:a_shop", "--seq", "9", "--json", *data,
        status=EXIT_REFUSED, error="not_found", code=0)
    inbox = one(run("audit", "inbox", "--user", "a_bob", "--json", *data))
    check(inbox, keys["inbox"], AUDIT["inbox"])
    # "inbox": [{"inbox_seq", ..., "cid", "body"|"body_b64"}] ... "(`cid` and body for `msg`
    # entries only)"
    said(OPERATIONS, "(`cid` and body for `msg` entries only)")
    entry = brace_keys(inner(brace_after(OPERATIONS, AUDIT_ANCHORS["inbox"]), "inbox_seq"))[0]
    entry_types = {"inbox_seq": (int,), "kind": (str,), "conv": (str,), "seq": (int,),
                   "lsn": (int,), "from": (str,), "ts": (str,), "cid": (str,), "body": (str,)}
    assert [e["kind"] for e in inbox["inbox"]] == ["msg", "added"]
    check(inbox["inbox"][0], (entry, set()), entry_types)
    check(inbox["inbox"][1], (entry - {"cid", "body"}, {"cid", "body"}), entry_types)
    check(one(run("audit", "stats", "--json", *data)), keys["stats"], AUDIT["stats"])
    events = run("audit", "log", "--json", *data).out
    export_run = run("audit", "export", *data)
    exported = export_run.out
    assert events and [{k: e[k] for k in event} for e, event in zip(
        exported, events, strict=True)] == events  # export: the same, keys added after
    for event, line in zip(events, exported, strict=True):
        check(event, keys["event"], AUDIT["event"])
        check(line, keys["export"], AUDIT["export"])
    export_file = tmp_path / "export.jsonl"
    export_file.write_text(export_run.proc.stdout)
    head = f"{verified['head']['lsn']}:{verified['head']['digest']}"
    checked = one(run("audit", "verify-export", str(export_file), "--anchor", head))
    check(checked, keys["verify-export"], AUDIT["verify-export"])
    assert checked["head"] == verified["head"]
    export_file.write_text("".join(export_run.proc.stdout.splitlines(keepends=True)[1:]))
    failed = one(run("audit", "verify-export", str(export_file), status=EXIT_REFUSED,
                     error="corrupt_export"))
    required, optional = keys["verify-export"]
    check(failed, (required, optional), AUDIT["verify-export"])
    check(one(run("audit", "rebuild", *data)), keys["rebuild"], AUDIT["rebuild"])
    run("audit", "rebuild", "--data", str(broker.data), status=EXIT_USAGE, error="locked")
    run("audit", "verify", "--data", str(tmp_path / "none"), status=EXIT_USAGE,
        error="no_data")


def test_audit_rebuild_after_an_unclean_stop_warns_in_json(tmp_path):
    """`homing audit rebuild` of a directory whose broker was killed says so on stderr as a
    JSON warning (`unclean_stop_found`, Conventions), not as a line of console text."""
    with BrokerProcess(tmp_path / "data") as bp:
        run("send", "--to", "u_bob", "hi", env=as_user(bp, "u_shop"))
        bp.kill()
    ran = run("audit", "rebuild", "--data", str(tmp_path / "data"))
    assert [w["warning"] for w in ran.warnings] == ["unclean_stop_found"]
    assert str(tmp_path / "data") in ran.warnings[0]["message"]
