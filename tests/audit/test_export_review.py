"""Review of `homing audit verify-export` (a619ba2): genuine exports of every kind of log homing
writes verify, and the files an auditor meets in practice (a broker's raised body limit, CR LF
line breaks, a blank line, two exports joined) are told apart with a reason that says what
happened (docs/OPERATIONS.md, "Verifying an export"). Real stores in tmp dirs, the real
`homing` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage import commands as c
from storage.rules import Limits
from storage.store import Store
from tests.audit.test_damaged import assert_one_json_error
from tests.audit.test_previous_layout import make_layout_4
from tests.procs import homing

# Text of every plane, the line and paragraph separators JSON leaves unescaped, NUL, CR, a
# backslash and quote, and characters JSON escapes.
ODD_TEXT = "".join(chr(c) for c in (0, 1, 0x0D, 0x1F, 0x22, 0x5C, 0x7F, 0xE9, 0x2028, 0x2029,
                                     0xFEFF, 0xFFFF, 0x1F600, 0x2A6D6, 0x3134A, 0xE0001,
                                     0xFFFFD, 0x10FFFD))


def _every_event(path: Path) -> int:
    """A log of every event type homing writes: creates of each kind with and without cid,
    joins, invites, roles, mutes, leaves, removals, text, empty, odd and binary bodies, acks
    with convs and acks as logged before they carried them, read marks, revocations; returns
    its last LSN."""
    store = Store.open(str(path))
    try:
        made = [o.reply["conv"] for o in store.execute([
            c.CreateConv("alice", "d", "user", "group", "g", False, ("bob",), cid="k1"),
            c.CreateConv("alice", "d", "user", "channel", "c", True, ("carol",)),
            c.CreateConv("alice", "d", "user", "group", None, False, ())])]
        grp, chn, bare = made
        store.execute([
            c.Join("dave", "d", "user", chn), c.Invite("alice", "d", "user", grp, "carol", "admin"),
            c.SetRole("alice", "d", "user", grp, "bob", "admin"),
            c.SetMute("bob", "d", "user", grp, True), c.Leave("carol", "d", "user", grp),
            c.Remove("alice", "d", "user", grp, "bob"), c.Invite("alice", "d", "user", bare, "eve"),
            c.SendMessage("alice", "d", "user", "m1", "plain", conv=grp),
            c.SendMessage("alice", "d", "user", "m2", "", conv=chn),
            c.SendMessage("alice", "d", "user", "m3", b"", to="bob"),
            c.SendMessage("alice", "d", "user", "m4", ODD_TEXT, to="bob"),
            c.SendMessage("bob", "d2", "user", "m5", bytes(range(256)), to="alice"),
            c.SendMessage("alice", "d", "user", "m6", "\u2028" * 1000, conv=bare)])
        store.execute([c.Ack("bob", "d", "user", store.inbox_head("bob")),
                       c.RevokeTokens("ops", "d", "admin", "dave")])
        store.execute([c.MarkRead("eve", "d", "user", bare, 1)])
        store.log.append([(store.last_lsn(), "delivery.acked", "alice", "p", {"upto": 1})])
        store.rebuild()
        return store.last_lsn()
    finally:
        store.close()


def _verify(f: Path, *flags: str):
    return homing("audit", "verify-export", str(f), *flags, check=False)


def test_every_event_type_and_odd_body_exports_and_verifies_from_any_lsn(tmp_path):
    """Every event homing writes (older acks without convs too), bodies of every Unicode plane,
    U+2028, NUL, empty and binary, exported whole, from the last LSN and past it, verify ok
    against the head `audit verify` printed, with no `record_b64`."""
    data = tmp_path / "data"
    last = _every_event(data)
    head = json.loads(homing("audit", "verify", "--data", str(data)).stdout)["head"]
    assert head["lsn"] == last
    types = set()
    for start, lines in ((1, last), (last, 1), (last + 1, 0)):
        text = homing("audit", "export", "--data", str(data), "--from-lsn", str(start)).stdout
        assert text.count("\n") == lines and "record_b64" not in text
        types |= {json.loads(r)["type"] for r in text.split("\n")[:-1]}  # not U+2028
        f = tmp_path / f"from-{start}.jsonl"
        f.write_text(text, encoding="utf-8")
        anchor = () if not lines else ("--anchor", f"{head['lsn']}:{head['digest']}")
        report = json.loads(_verify(f, *anchor).stdout)
        assert report["ok"] and report["lines"] == lines, report
        if lines:
            assert report["head"] == head
    assert types == {"conv.created", "member.added", "member.removed", "member.role_set",
                     "mute.set", "message.accepted", "delivery.acked", "read.marked",
                     "tokens.revoked"}, types


@pytest.mark.parametrize("layout", ["4", "5", "6"])
def test_a_directory_of_a_previous_layout_exports_and_verifies(tmp_path, layout):
    """A data directory a previous release left (no table added since) exports a file that
    verifies, as an operator does right after upgrading."""
    data = tmp_path / "data"
    last = make_layout_4(data, layout)
    f = tmp_path / "old.jsonl"
    f.write_text(homing("audit", "export", "--data", str(data)).stdout, encoding="utf-8")
    report = json.loads(_verify(f).stdout)
    assert report["ok"] and report["last_lsn"] == last, report


def test_a_genuine_line_longer_than_the_bound_is_usage_not_a_fault(tmp_path):
    """A broker with `--max-body-bytes` raised writes a message whose line passes the default
    16 MiB bound (3 MB of control characters, 6 bytes each): verify-export stops there with
    `usage` (exit 2, `file.ok` null, saying to raise the bound), not `corrupt_export`, which
    told an auditor a genuine export had been tampered with; a larger bound checks it ok."""
    data = tmp_path / "data"
    store = Store.open(str(data), limits=Limits(max_body_bytes=4_000_000))
    try:
        (sent,) = store.execute([c.SendMessage("ann", "d", "user", "big", "\x01" * 3_000_000,
                                             to="bob")])
        assert sent.error is None
    finally:
        store.close()
    f = tmp_path / "big.jsonl"
    f.write_text(homing("audit", "export", "--data", str(data)).stdout, encoding="utf-8")
    assert f.stat().st_size > 16 << 20
    out = _verify(f)
    assert_one_json_error(out, 2, "usage")
    report = json.loads(out.stdout)
    assert report["ok"] is False and "head" not in report
    assert report["file"]["ok"] is None and report["file"]["line"] == sent.lsn, report
    assert "larger bound" in report["file"]["reason"]
    assert json.loads(_verify(f, "--max-line-bytes", str(20 << 20)).stdout)["ok"] is True


def test_crlf_a_bom_a_blank_line_and_two_exports_joined_say_what_happened(tmp_path):
    """A file whose line breaks a Windows editor made CR LF fails at its first line saying so
    (and that the lines are otherwise their records'), one it began with a byte order mark
    says that, not JSON's `Expecting value`; a blank line at the end fails as an
    empty line, not as JSON's `line 2 column 1`; two exports joined fail at the second's first
    line. Each is `corrupt_export`, exit 1."""
    data = tmp_path / "data"
    last = _every_event(data)
    text = homing("audit", "export", "--data", str(data)).stdout
    cases = {
        "crlf": (text.replace("\n", "\r\n"), 1, "CR LF"),
        "crlf, the last break a CR": (text.replace("\n", "\r\n")[:-1], 1, "CR LF"),
        "a byte order mark": ("\ufeff" + text, 1, "byte order mark"),
        "blank": (text + "\n", last + 1, "an empty line"),
        "joined": (text + text, last + 1, "only an export's first line carries"),
    }
    for name, (changed, line, words) in cases.items():
        f = tmp_path / "changed.jsonl"
        f.write_bytes(changed.encode())
        out = _verify(f)
        assert_one_json_error(out, 1, "corrupt_export")
        report = json.loads(out.stdout)["file"]
        assert report["line"] == line and words in report["reason"], (name, report)
