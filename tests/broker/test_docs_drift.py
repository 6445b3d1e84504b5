"""The docs are contracts: these tests fail when the code and the docs drift apart.

- Every structlog event the broker and the store can emit (found by parsing broker/ and
  storage/ with `ast`) is a row of docs/OPERATIONS.md's "Logs" table, at the level the row
  states and naming every field the call passes; every row names an event that is emitted.
- Every `CloseReason` is in OPERATIONS.md's "Close reasons" list, and nothing else is.
- Every `ErrorCode` is a row of docs/PROTOCOL.md §7 (number, name, and whether it always
  closes), and nothing else is.
- Every option of `homing serve` is documented where serve's flags are (OPERATIONS.md, CLI.md's
  "Running and tokens"), with the default the docs state equal to the code's where they state
  it in a form that reads reliably; the Limits table names no option serve does not take;
  the sentence before that table states each flag's range that is not the rule for all, and
  no number for a flag that is not one of its bounds.
- Every subcommand of `homing` (and `group create`, `channel create`) is in docs/CLI.md, with
  every option of the client commands and the defaults of its Conventions table; every
  `homing audit` action is a row of OPERATIONS.md's Auditing table, and nothing else is.
- Every public method of the SDK's `Client` is a row of docs/CLIENT.md's Methods table (but
  `aclose`, which "Cancellation and closing" tells of), with its parameters as the code has
  them; `open_client`'s are those "Connecting" spells out, with the same defaults; the
  blocking client's request methods are the ones its section lists.

Nothing here starts a broker: it reads the sources, the docs and the argparse parser.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import pytest

from broker.cli import build_parser
from broker.client import Client, open_client
from broker.client_blocking import BlockingClient
from broker.config import MIN_SECONDS
from broker.errors import CloseReason
from protocol.errors import ALWAYS_CLOSE, ErrorCode

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
CLI = ROOT / "docs" / "CLI.md"
CLIENT = ROOT / "docs" / "CLIENT.md"
LOGGING_PACKAGES = ("broker", "storage")  # bench/ and tests/ log nothing of the broker's

LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "warn": "warning",
          "error": "error", "exception": "error", "critical": "critical"}
# Keyword arguments that are not fields of their own: structlog renders exc_info as `exception`.
RENAMED_FIELDS = {"exc_info": "exception"}


# -- reading the docs ------------------------------------------------------------------------------

def section(path: Path, title: str, level: int = 2) -> str:
    """The text of the section of `path` whose heading starts with `title`, up to the next
    heading of the same level or above."""
    text = path.read_text(encoding="utf-8")
    lines, out, inside = text.splitlines(), [], False
    heading = re.compile(rf"^#{{1,{level}}} ")
    for line in lines:
        if heading.match(line):
            if inside:
                break
            inside = line.lstrip("#").strip().startswith(title)
            continue
        if inside:
            out.append(line)
    assert out, f"{path.name}: no section {'#' * level} {title!r}"
    return "\n".join(out)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table in `text` whose header line starts
    with `header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.replace(" ", "").startswith(header.replace(" ", "")):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                # `\|` inside a cell is an escaped bar, not a cell boundary
                cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
                rows.append([c.strip() for c in cells])
            return rows
    raise AssertionError(f"no table with header {header!r}")


def paragraph(text: str, start: str) -> str:
    """The paragraph (up to a blank line) of `text` that begins with `start`."""
    for para in re.split(r"\n\s*\n", text):
        if para.lstrip().startswith(start):
            return para
    raise AssertionError(f"no paragraph beginning {start!r}")


def without_parentheses(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def ticked(text: str) -> list[str]:
    """The code spans of `text` (fenced code blocks taken out first: their backticks would
    pair the spans wrongly)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`]+)`", text)


# -- reading the code ------------------------------------------------------------------------------

def _is_logger(node: ast.expr) -> bool:
    """Whether `node` looks like a structlog logger: `log`, `self.log`, `session.log`,
    `structlog.get_logger(...)`, `get_logger()`, or any of them `.bind(...)`."""
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("bind", "new"):
            return isinstance(func, ast.Attribute) and _is_logger(func.value)
        return name == "get_logger"
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in ("log", "logger", "_log") or name.endswith("_log") or name.endswith("logger")


def emitted_events() -> dict[str, list[tuple[str, str, set[str]]]]:
    """event -> [(where, level, fields passed)] for every log call in broker/ and storage/."""
    events: dict[str, list[tuple[str, str, set[str]]]] = defaultdict(list)
    not_literal = []
    for package in LOGGING_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in LEVELS and _is_logger(node.func.value)):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                first = node.args[0] if node.args else None
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    not_literal.append(where)
                    continue
                fields = {RENAMED_FIELDS.get(k.arg, k.arg) for k in node.keywords if k.arg}
                if node.func.attr == "exception":
                    fields.add("exception")
                events[first.value].append((where, LEVELS[node.func.attr], fields))
    assert not not_literal, (f"log calls whose event is not a string literal (name it, so that "
                             f"docs/OPERATIONS.md can list it): {not_literal}")
    return events


def documented_events() -> dict[str, tuple[str, str]]:
    """event -> (level, fields cell) from OPERATIONS.md's "Logs" table."""
    rows = table_rows(section(OPERATIONS, "Logs"), "| event | fields |")
    documented: dict[str, tuple[str, str]] = {}
    for cells in rows:
        names = re.findall(r"`([a-z_][a-z0-9_]*)`", cells[0])
        assert names, f"OPERATIONS.md Logs table: a row names no event: {cells[0]!r}"
        level = re.search(r"\((debug|warning|error|critical)\)", cells[0])
        for name in names:
            assert name not in documented, f"OPERATIONS.md Logs table: `{name}` has two rows"
            documented[name] = (level.group(1) if level else "info", cells[1])
    return documented


def serve_parser() -> argparse.ArgumentParser:
    return subcommands(build_parser())["serve"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# -- the tests -------------------------------------------------------------------------------------

def test_every_emitted_log_event_is_in_the_logs_table():
    emitted, documented = emitted_events(), documented_events()
    missing = {e: [w for w, _, _ in calls] for e, calls in emitted.items() if e not in documented}
    assert not missing, ("events logged by the code but not rows of docs/OPERATIONS.md's Logs "
                         f"table (`| event | fields |`): {missing}")


def test_every_event_in_the_logs_table_is_emitted():
    emitted, documented = emitted_events(), documented_events()
    stale = sorted(set(documented) - set(emitted))
    assert not stale, ("rows of docs/OPERATIONS.md's Logs table naming events nothing in "
                       f"broker/ or storage/ logs: {stale}")


def test_each_event_is_documented_at_the_level_it_is_logged():
    emitted, documented = emitted_events(), documented_events()
    wrong = []
    for event, calls in sorted(emitted.items()):
        if event not in documented:
            continue  # reported by the test above
        for where, level, _ in calls:
            if level != documented[event][0]:
                wrong.append(f"`{event}` logged at {level} ({where}), documented as "
                             f"{documented[event][0]}")
    assert not wrong, "docs/OPERATIONS.md Logs table, level in the event's cell " \
        "(none = info): " + "; ".join(wrong)


def test_each_event_row_names_the_fields_its_calls_pass():
    """The fields a call passes itself (not the logger's bound context: conn, peer, user,
    device) are each named in the row's fields cell."""
    emitted, documented = emitted_events(), documented_events()
    missing = []
    for event, calls in sorted(emitted.items()):
        if event not in documented:
            continue
        cell = documented[event][1]
        for where, _, fields in calls:
            absent = sorted(f for f in fields if not re.search(rf"(?<![\w-]){f}(?![\w-])", cell))
            if absent:
                missing.append(f"`{event}` lacks {absent} (passed at {where})")
    assert not missing, "docs/OPERATIONS.md Logs table, fields cell: " + "; ".join(missing)


def test_close_reasons_are_listed_exactly():
    para = paragraph(section(OPERATIONS, "Logs"), "Close reasons:")
    # the list is the first sentence: what follows the colon up to its full stop
    listed = ticked(re.split(r"\.\s", without_parentheses(para.split(":", 1)[1]))[0])
    assert len(listed) == len(set(listed)), f"OPERATIONS.md Close reasons: twice: {listed}"
    code = {r.value for r in CloseReason}
    problems = []
    if code - set(listed):
        problems.append(f"CloseReason values missing from it: {sorted(code - set(listed))}")
    if set(listed) - code:
        problems.append(f"it lists what is no CloseReason: {sorted(set(listed) - code)}")
    assert not problems, "docs/OPERATIONS.md, Close reasons: " + "; ".join(problems)


def test_error_registry_matches_protocol_section_7():
    rows = table_rows(section(PROTOCOL, "7."), "| code | name | meaning | closes |")
    documented: dict[int, tuple[str, str]] = {}
    for cells in rows:
        assert cells[0].isdigit(), f"PROTOCOL.md §7: a row whose code is no number: {cells}"
        assert int(cells[0]) not in documented, f"PROTOCOL.md §7: code {cells[0]} twice"
        documented[int(cells[0])] = (cells[1].strip("`"), cells[3])
    code = {int(c): c.wire_name for c in ErrorCode}
    missing = {n: name for n, name in code.items() if n not in documented}
    stale = {n: name for n, (name, _) in documented.items() if n not in code}
    renamed = {n: (documented[n][0], name) for n, name in code.items()
               if n in documented and documented[n][0] != name}
    closes = {c.wire_name: documented[int(c)][1] for c in ErrorCode if int(c) in documented}
    wrong = {n: v for n, v in closes.items()
             if (v == "always") != (ErrorCode[n.upper()] in ALWAYS_CLOSE)}
    problems = [f"{what}: {found}" for what, found in (
        ("ErrorCodes that are not rows of it", missing),
        ("rows that are no ErrorCode", stale),
        ("names that differ (documented, code)", renamed),
        ("'closes' says `always` exactly for the codes of protocol.errors.ALWAYS_CLOSE, "
         "but not for", wrong)) if found]
    assert not problems, "docs/PROTOCOL.md §7: " + "; ".join(problems)


# Where `homing serve`'s options are documented.
SERVE_DOCS = [(OPERATIONS, title) for title in
              ("Running the broker", "Limits", "Content policy", "TLS", "Logs")] + \
             [(CLI, "Running and tokens")]


def _mentions(text: str, flag: str) -> bool:
    """`flag` inside a code span of `text` (`--flag`, `--flag N`, `homing serve [--flag X]`)."""
    return any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", span) for span in ticked(text))


def test_every_serve_option_is_documented():
    texts = {f"{path.name} \"{title}\"": section(path, title) for path, title in SERVE_DOCS}
    flags = [max(a.option_strings, key=len) for a in serve_parser()._actions
             if a.option_strings and a.dest != "help"]
    missing = [f for f in flags if not any(_mentions(t, f) for t in texts.values())]
    assert not missing, (f"`homing serve` options documented in none of {sorted(texts)}: "
                         f"{missing}")
    rows = table_rows(section(OPERATIONS, "Limits"), "| flag | default | when exceeded |")
    limits = [m.group(1) for cells in rows if (m := re.fullmatch(r"`(--[a-z-]+)`", cells[0]))]
    assert "--max-frame-bytes" in limits  # the table was read
    stale = [f for f in limits if f not in flags]
    assert not stale, f"docs/OPERATIONS.md Limits table rows for no `homing serve` option: {stale}"


def test_serve_synopsis_defaults():
    """CLI.md: `homing serve [--data DIR] [--host H] [--port P] ...` "(defaults: `./DIR`,
    `HOST:PORT`)"."""
    para = paragraph(section(CLI, "Running and tokens"), "`homing serve ")
    m = re.search(r"\(defaults: `\./([^`]+)`, `([^`:]+):(\d+)`\)", para)
    assert m, "docs/CLI.md \"Running and tokens\": no `(defaults: `./DIR`, `HOST:PORT`)`"
    defaults = {a.dest: a.default for a in serve_parser()._actions}
    stated = {"data": m.group(1), "host": m.group(2), "port": int(m.group(3))}
    wrong = {k: (v, defaults[k]) for k, v in stated.items() if v != defaults[k]}
    assert not wrong, f"docs/CLI.md `homing serve` defaults (documented, code): {wrong}"


NUMBER = r"(\d[\d,]*(?:\.\d+)?)"


def _documented_defaults() -> dict[str, list[tuple[str, float]]]:
    """flag -> [(where, default)] for the defaults the docs state in a form that reads
    reliably: the Limits table's default cell when it is a number (with `s` or `/s ...`
    after it), and prose of the form `` `--flag` (N ``, `` `--flag X` (default N `` or
    `` `--flag` seconds (default N ``."""
    found: dict[str, list[tuple[str, float]]] = defaultdict(list)
    limits = section(OPERATIONS, "Limits")
    for cells in table_rows(limits, "| flag | default | when exceeded |"):
        flag = re.fullmatch(r"`(--[a-z-]+)`", cells[0])
        value = re.fullmatch(NUMBER + r"(?:\s*(?:s|/s)\b.*)?", cells[1])
        if flag and value:
            found[flag.group(1)].append(("OPERATIONS.md Limits table",
                                         float(value.group(1).replace(",", ""))))
    for path, title in SERVE_DOCS:
        # not "3 x `--heartbeat` (45 s)": a multiple of another flag, not its default
        for m in re.finditer(r"(?<!x )`(--[a-z-]+)(?: [A-Z]+)?`(?: seconds)?\s+\((?:default\s+)?"
                             + NUMBER
                             + r"(?:\s+s)?[;,)]", section(path, title)):
            found[m.group(1)].append((f"{path.name} \"{title}\"",
                                      float(m.group(2).replace(",", ""))))
    return found


def test_serve_defaults_as_documented():
    actions = {max(a.option_strings, key=len): a for a in serve_parser()._actions
               if a.option_strings}
    documented = _documented_defaults()
    assert "--max-frame-bytes" in documented and "--gc-young-threshold" in documented  # parsed
    wrong = []
    for flag, stated in sorted(documented.items()):
        if flag not in actions:
            wrong.append(f"{flag}: {stated[0][0]} states a default, but serve takes no {flag}")
            continue
        default = actions[flag].default
        if default is None:  # computed from other flags (--idle-timeout): not a number to hold
            continue
        wrong += [f"{flag}: {where} says {value:g}, the code's default is {default:g}"
                  for where, value in stated if value != default]
    assert not wrong, "`homing serve` defaults: " + "; ".join(wrong)


def test_serve_help_says_every_default():
    """`homing serve --help` is where an operator looks first (docs/OPERATIONS.md, "Running the
    broker"): each flag with a default says it there, as the Limits table does. Half of them
    (`--max-frame-bytes`, `--heartbeat`, `--max-connections`, `--log-level`, ...) showed only
    their name; the others said "(default N)"."""
    text = serve_parser().format_help()
    silent = []
    for action in serve_parser()._actions:
        flag = max(action.option_strings, key=len, default="")
        if flag in ("", "--help", "--tls-cert", "--tls-key", "--content-policy"):
            continue  # no default: off unless given
        if "default" not in (action.help or ""):
            silent.append(flag)
    assert not silent, f"flags whose --help states no default: {silent}"
    assert "(default 1048576)" in " ".join(text.split())  # --max-frame-bytes, rendered


def test_every_subcommand_is_in_cli_md():
    text = CLI.read_text(encoding="utf-8")
    spans = ticked(text)
    missing = []
    for name, sub in subcommands(build_parser()).items():
        if not any(re.search(rf"\bhoming {name}\b", s) for s in spans):
            missing.append(f"homing {name}")
        if name in ("audit", "bench"):  # their actions have their own pages
            continue
        for action in subcommands(sub):
            if not any(re.search(rf"\bhoming {name} {action}\b", s) for s in spans):
                missing.append(f"homing {name} {action}")
    assert not missing, f"subcommands in no `homing ...` code span of docs/CLI.md: {missing}"


def test_audit_actions_are_in_the_auditing_table():
    audit = subcommands(build_parser()).get("audit")
    if audit is None:
        pytest.skip("homing audit not installed")
    rows = table_rows(section(OPERATIONS, "Auditing"), "| action | what it prints |")
    listed = {re.match(r"`([\w-]+)", cells[0]).group(1) for cells in rows}
    actions = set(subcommands(audit))
    assert not actions - listed, ("`homing audit` actions not in docs/OPERATIONS.md's Auditing "
                                  f"table: {sorted(actions - listed)}")
    assert not listed - actions, ("docs/OPERATIONS.md's Auditing table lists what `homing "
                                  f"audit` does not take: {sorted(listed - actions)}")


def test_every_client_command_option_is_in_cli_md():
    """The options of the commands CLI.md documents itself (not `serve`'s, in OPERATIONS.md's
    "Limits", nor `audit`'s and `bench`'s, on their own pages)."""
    spans = ticked(CLI.read_text(encoding="utf-8"))

    def leaves(parser, path):
        subs = subcommands(parser)
        if not subs:
            yield path, parser
        for name, sub in subs.items():
            yield from leaves(sub, [*path, name])

    missing = []
    for path, parser in leaves(build_parser(), []):
        if path[0] in ("serve", "audit", "bench"):
            continue
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = max(action.option_strings, key=len)
            if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", s) for s in spans):
                missing.append(f"homing {' '.join(path)} {flag}")
    assert not missing, f"options in no code span of docs/CLI.md: {missing}"


def test_client_option_defaults_as_documented():
    """CLI.md's Conventions table: a default given as one code span is the code's default
    (`--server`'s from broker.config, since HOMING_SERVER may be set where the tests run)."""
    from broker.config import DEFAULT_HOST, DEFAULT_PORT

    rows = table_rows(section(CLI, "Conventions"), "| option | env | default | meaning |")
    actions = {max(a.option_strings, key=len): a
               for a in subcommands(build_parser())["send"]._actions if a.option_strings}
    wrong, read = [], 0
    for cells in rows:
        flag = re.match(r"`(--[a-z-]+)", cells[0])
        stated = re.fullmatch(r"`([^`]+)`", cells[2])
        if not (flag and stated):
            continue
        read += 1
        flag, stated = flag.group(1), stated.group(1)
        if flag not in actions:
            wrong.append(f"{flag}: documented, but client commands take no {flag}")
            continue
        default = (f"{DEFAULT_HOST}:{DEFAULT_PORT}" if flag == "--server"
                   else actions[flag].default)
        same = (float(stated) == default if isinstance(default, (int, float))
                and re.fullmatch(NUMBER, stated) else stated == str(default))
        if not same:
            wrong.append(f"{flag}: documented `{stated}`, the code's default is {default!r}")
    assert read >= 3, "docs/CLI.md Conventions table: its defaults were not read"
    assert not wrong, "docs/CLI.md Conventions table, default column: " + "; ".join(wrong)


# -- references between the docs -------------------------------------------------------------------

DOC_REFERENCE = re.compile(r'(?:docs/)?([A-Z]+(?:-[A-Z]+)?\.md),?\s+"([^"]+)"')


def _titles(path: Path) -> list[str]:
    """The headings of `path` (without their §-number) and its bold run-in titles (`**X**`)."""
    text = path.read_text(encoding="utf-8")
    heads = [re.sub(r"^[\d.]+\s+", "", m.group(1).strip())
             for m in re.finditer(r"^#+ (.+)$", text, re.M)]
    return heads + [m.group(1).rstrip(".") for m in re.finditer(r"\*\*([^*]+)\*\*", text)]


def test_every_section_a_doc_names_exists():
    """`docs/OPERATIONS.md, "Upgrading"` and its kin point at a heading (or a bold run-in title)
    of that file: a reader who follows one finds it."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for path in files:
        if path.name == "BENCHMARKS-JOURNAL.md":  # dated entries, quoting the docs of their day
            continue
        for name, title in DOC_REFERENCE.findall(path.read_text(encoding="utf-8")):
            title = " ".join(title.split())  # a reference broken over two lines
            target = ROOT / "docs" / name
            if target.exists() and not any(t.startswith(title) for t in _titles(target)):
                missing.append(f"{path.name}: {name}, \"{title}\"")
    assert not missing, ("references to sections that do not exist: "
                         + "; ".join(sorted(set(missing))))


def _fixed_limits() -> list[tuple[str, str, str]]:
    """(constant, the first cell its "(fixed)" row of OPERATIONS.md's Limits table shows,
    words of that row's text that tell it from the others), for every bound of the broker's
    own caches and queues that no flag sets. A new such constant belongs here and in the
    table."""
    from broker import (
        awaiting,
        handlers,
        handshake,
        listen,
        presence,
        roster,
        session,
        stats,
        weight,
    )
    from protocol import fields
    from storage import buffered_tables, lmdb_env, rules, store

    return [
        ("session.FAIR_SLICE_S", f"{session.FAIR_SLICE_S * 1000:g} ms",
         "one connection's frames hold"),
        ("presence.SLICE_S", f"{presence.SLICE_S * 1000:g} ms", "one user's presence walk"),
        ("handlers.RATE_PAUSE_MAX_S", f"{handlers.RATE_PAUSE_MAX_S * 1000:g} ms",
         "a `read` refused by `--read-rate`"),
        ("roster.ROSTER_CACHE_MAX", f"{roster.ROSTER_CACHE_MAX:,}",
         "conversations whose member lists the broker keeps"),
        ("buffered_tables.COUNTED_GROUPS", f"{buffered_tables.COUNTED_GROUPS:,}",
         "conversations whose member count"),
        ("session.MUTED_CACHE_MAX", f"{session.MUTED_CACHE_MAX:,}", "mute state"),
        ("rules._KNOWN_IDS_MAX", f"{rules._KNOWN_IDS_MAX:,}",
         "user and device ids the commit thread remembers"),
        ("fields._KNOWN_MAX", f"{fields._KNOWN_MAX:,}", "frame checks remember"),
        ("buffered_tables.TRACKED_SENDERS", f"{buffered_tables.TRACKED_SENDERS:,}",
         "senders whose greatest committed cid"),
        ("weight.POST_SIZES_MAX", f"{weight.POST_SIZES_MAX:,}", "post size"),
        ("store.DAMAGED_KEPT", f"{store.DAMAGED_KEPT:,}", "met a damaged projection row"),
        ("lmdb_env.MAX_READERS", f"{lmdb_env.MAX_READERS:,} readers", "reader table"),
        ("session.MAX_QUEUED_FRAMES, MAX_QUEUED_BYTES",
         f"{session.MAX_QUEUED_FRAMES} frames or {session.MAX_QUEUED_BYTES >> 20} MiB",
         "replies queued for a client that sends but does not read"),
        ("session.DELIVER_BYTES", f"{session.DELIVER_BYTES >> 10} KiB",
         "deliveries one session takes into memory"),
        ("stats.BACKLOG_SLICE_S", f"{stats.BACKLOG_SLICE_S * 1000:g} ms",
         "the longest a `stats` request"),
        ("listen.ACCEPT_BURST", f"{listen.ACCEPT_BURST} connections",
         "taken off the listen backlog in one turn"),
        ("handshake.CHECK_WAITERS, CHECK_WAIT_S",
         f"{handshake.CHECK_WAITERS} connections, {handshake.CHECK_WAIT_S * 1000:g} ms",
         "connections past `--max-handshakes` given"),
        ("handshake.CHECK_CROWDED_S", f"{handshake.CHECK_CROWDED_S * 1000:g} ms",
         "a place past `--max-handshakes`"),
        ("awaiting.SILENT_S", f"{awaiting.SILENT_S:g} s",
         "how long a connection holding a `--max-handshakes` place may say nothing"),
    ]


def test_fixed_limits_as_documented():
    """Each "(fixed)" row of OPERATIONS.md's Limits table states its constant's value, and
    every such row is one of those constants: the audit of 2026-12-06 found two bounds in no
    row (weight.POST_SIZES_MAX, store.DAMAGED_KEPT), and nothing held the rows' numbers to the
    code's."""
    rows = [cells for cells in table_rows(section(OPERATIONS, "Limits"),
                                          "| flag | default | when exceeded |")
            if cells[0].startswith("(fixed)")]
    assert rows, "OPERATIONS.md Limits: no (fixed) row read"
    problems, matched = [], set()
    for name, shown, words in _fixed_limits():
        found = [i for i, cells in enumerate(rows) if words in cells[2]]
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} rows say {words!r}, not one")
            continue
        matched.add(found[0])
        if rows[found[0]][0] != f"(fixed) {shown}":
            problems.append(f"{name}: the row says {rows[found[0]][0]!r}, the code "
                            f"'(fixed) {shown}'")
    problems += [f"a row for no known constant: {rows[i][0]} {rows[i][2][:60]!r}"
                 for i in range(len(rows)) if i not in matched]
    assert not problems, "docs/OPERATIONS.md Limits, (fixed) rows: " + "; ".join(problems)


# Numbers as the docs and the flags' refusals write them, exactly: as floats, 9223372036854775807
# and 9223372036854775808 are one number, so a bound off by one in the docs went unseen.
BOUND = r"\d+(?:\.\d+)?"


def _type_range(action: argparse.Action) -> tuple[bool, list[Fraction]] | None:
    """(takes fractions, its bounds in order) of a flag whose type takes numbers, read from what
    its type says when it refuses -1 and 0.5 (`--stats-interval`: "0 (none) or at least 1");
    None for a flag of another kind (text, choices)."""
    if action.type is None or action.choices:
        return None
    bounds: set[Fraction] = set()
    for probe in ("-1", "0.5"):
        try:
            action.type(probe)
        except argparse.ArgumentTypeError as exc:
            said = re.search(r"must be (.+), not ", str(exc))
            if said is None and probe == "-1":
                raise AssertionError(f"{action.option_strings}: unexpected refusal {exc}") from None
            if said is not None:
                bounds.update(Fraction(n) for n in re.findall(BOUND, said.group(1)))
        else:
            assert probe != "-1", f"{action.option_strings} takes -1"
    assert bounds, f"{action.option_strings}: no bound in its refusal of -1"
    try:
        action.type("1.5")
        fractions = True
    except argparse.ArgumentTypeError:
        fractions = False
    return fractions, sorted(bounds)


def _shown(number: Fraction) -> str:
    return str(number) if number.denominator == 1 else str(float(number))


def _said_of(after: str) -> list[str]:
    """The numbers a clause says of the flag that `after` follows: up to the next flag, or,
    where none are said before it ("`--record-cache` and `--roster-cache-members` at least 0"),
    those of the next flag's words."""
    for words in re.split(r"`--[a-z-]+`", after):
        if numbers := re.findall(BOUND, words):
            return numbers
    return []


def test_serve_bounds_as_documented():
    """OPERATIONS.md's Limits says, before its table, the range of every number a `homing serve`
    flag takes: a whole number at least 1 and a time or rate at least 0.001, and each flag
    whose range is other than that is named with its own bounds, in order, and with no number
    that is not one of them. The audit of 2026-12-06 found `--record-cache` and
    `--roster-cache-members` (0 or more) under "counts, sizes and limits must be at least 1";
    its first form of this test, which read the numbers as floats and checked only that each
    bound was among those said, passed `--heartbeat` "from 1 to 9223372036854775808",
    `--stats-interval` "0 (off) or at least 0.5" (or without its "at least 1"), `--port` "65535
    to 0", and `--shutdown-grace` "from 1 to 3600 s" (the review of dcde6fe)."""
    para = paragraph(section(OPERATIONS, "Limits"), "Every limit is a flag")
    assert "The flags themselves are checked" in para and "Two pairs must" in para, para[:200]
    checked = para.split("The flags themselves are checked", 1)[1].split("Two pairs must", 1)[0]
    text = " ".join(without_parentheses(checked).split())
    assert "counts, sizes and limits must be at least 1" in text
    assert "times and rates at least 0.001" in text
    clauses = re.split(r"[,;]", text)
    wrong = []
    for action in serve_parser()._actions:
        flag = max(action.option_strings, key=len, default="")
        found = _type_range(action)
        if found is None:
            continue
        fractions, bounds = found
        rule = Fraction(str(MIN_SECONDS)) if fractions else Fraction(1)
        # the rule for all ("at least 1", "at least 0.001") need not be said again
        needed = [b for b in bounds if not (b == bounds[0] == rule)]
        stated = [Fraction(n) for clause in clauses if f"`{flag}`" in clause
                  for n in _said_of(clause.split(f"`{flag}`", 1)[1])]
        span = " or ".join(map(_shown, bounds))
        if missing := [b for b in needed if b not in stated]:
            wrong.append(f"{flag} ({span}): the docs do not say {', '.join(map(_shown, missing))}")
        if other := [n for n in stated if n not in bounds]:
            wrong.append(f"{flag} ({span}): the docs say {', '.join(map(_shown, other))}")
        if stated != sorted(stated):
            wrong.append(f"{flag} ({span}): the docs say its bounds out of order")
    assert not wrong, "docs/OPERATIONS.md Limits, the flags' ranges: " + "; ".join(wrong)


def _parameters(fn) -> str:
    """`fn`'s parameters as the guide spells them: no `self`, no annotations, double quotes."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty)
              for name, p in sig.parameters.items() if name != "self"]
    shown = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return str(shown)[1:-1].replace("'", '"')


def _signature(params: str) -> list[tuple[str, str, object]]:
    """Parameters spelt as in a `def` (`conv, *, limit=50`): each one's name, kind and default
    (its value where it is a literal, so `30` and `30.0` or `'a'` and `"a"` are alike; else its
    source; None for none), whatever the spacing or line breaks."""
    args = ast.parse(f"def f({params}): pass").body[0].args

    def value(node: ast.expr | None) -> object:
        if node is None:
            return None
        try:
            return ("=", ast.literal_eval(node))
        except ValueError:
            return ("=", ast.unparse(node))
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    shown = [(a.arg, "positional", value(d)) for a, d in zip(positional, defaults, strict=True)]
    if args.vararg:
        shown.append((args.vararg.arg, "*", None))
    shown += [(a.arg, "keyword", value(d))
              for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        shown.append((args.kwarg.arg, "**", None))
    return shown


def test_client_md_methods_table_matches_the_sdk():
    """Each method named in docs/CLIENT.md's Methods table is the Client's, with the parameters
    it has (`...` for "as the one before in the row", which must then have the same), and
    every public method is named there. Before 2026-12-07 `ping` and `create(kind, ...)` were
    in no row, and a reader of the table did not know the blocking client's `create` and `ping`
    were the trio client's too."""
    named, wrong = set(), []
    for row in table_rows(section(CLIENT, "Methods"), "| method | returns |"):
        before = None
        for name, params in re.findall(r"`(\w+)\(([^`]*)\)`", row[0]):
            named.add(name)
            method = getattr(Client, name, None)
            if method is None:
                wrong.append(f"{name}: not a method of Client")
                continue
            code = _parameters(method)
            if params == "..." and before is None:
                wrong.append(f"{name}(...): no method before it in its row")
            elif params == "..." and _signature(code) != _signature(before):
                wrong.append(f"{name}(...): the code has ({code}), not the one before's "
                             f"({before})")
            elif params != "..." and _signature(params) != _signature(code):
                wrong.append(f"{name}({params}): the code has ({code})")
            before = code
    public = {name for name, value in vars(Client).items()
              if callable(value) and not name.startswith("_")}
    wrong += [f"{name}: in no row" for name in sorted(public - named - {"aclose"})]
    assert not wrong, "docs/CLIENT.md Methods: " + "; ".join(wrong)


def test_client_md_open_client_and_blocking_lists_match_the_sdk():
    """"Connecting" names open_client's parameters in order, each default it states the code's;
    the blocking client's section lists exactly its methods made from the Client's (but
    `deliveries`, an iterator there)."""
    text = section(CLIENT, "Connecting")
    said = re.search(r"`open_client\(([^`]*)\)`", text).group(1)
    code, doc = _signature(_parameters(open_client)), _signature(said)
    # (a default the text leaves out, as the server's, is not checked)
    assert len(doc) == len(code) and [
        (name, kind, said_default or default)
        for (name, kind, said_default), (_, _, default) in zip(doc, code, strict=True)] == code, (
        said, _parameters(open_client))
    # (not `section`: a comment line of that section's code reads as a heading)
    listed = paragraph(CLIENT.read_text(encoding="utf-8"), "What is the same as the trio API")
    listed = listed.split("every request method (", 1)[1]
    listed = set(re.findall(r"`(\w+)`", listed.split(")", 1)[0]))
    made = {name for name, value in vars(BlockingClient).items()
            if callable(value) and not name.startswith("_") and hasattr(Client, name)}
    made.discard("deliveries")  # an iterator there, told of under "What differs"
    assert listed == made, (sorted(listed - made), sorted(made - listed))
