"""`homing audit`'s text outputs (`log`'s table, `inbox`, `trace` and `stats` without
`--json`) on text a sender or a record chained on by hand chose: a line break, an escape
sequence, a C1 control, a bidi override, U+2028, NUL. None reaches the terminal as it is:
each such character is shown `\\uXXXX`, as `log`'s table has shown it since 2026-12-06, so
no text moves the cursor or forges a row (docs/OPERATIONS.md, "Auditing"). Real LMDB in tmp
dirs, the real `homing` command in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli import main
from storage.commands import SendMessage
from storage.log import seal
from storage.records import GENESIS
from storage.store import Store
from tests.audit.test_damaged import make_data
from tests.audit.test_export_verify import _forge, _last_lsn

TS = 1_800_000_000_000_000
# What a terminal acts on: clear the screen, home the cursor, a C1 CSI, line breaks, bidi.
EVIL = "\x1b[2J\x1b[H\x9b31m\u2028\u2029\u202eevil\r\n     9  msg      forged"
BODY = EVIL + "\x00\x07"  # a body any sender may post, through the broker
GROUP = "grp:" + EVIL  # ids of records chained on by hand (`verify` passes them)
USER = "eve" + EVIL
DEVICE = "phone" + EVIL


def _homing(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def _rows(out: str) -> list[str]:
    """The lines of a text output, split at its line breaks alone, each printable."""
    assert out.endswith("\n"), out
    rows = out[:-1].split("\n")
    for row in rows:
        assert row.isprintable(), row
    return rows


@pytest.fixture()
def evil_data(tmp_path, capsys) -> Path:
    """A data directory whose log and projections `verify` passes: bob's messages to alice,
    one of them `BODY` (through the store, as the broker writes it), and a group `GROUP`
    chained on by hand and rebuilt into the projections: alice adds `USER` and posts (cid
    `evil`), and `USER` acks it on `DEVICE`."""
    data = tmp_path / "data"
    make_data(data, 1)
    store = Store.open(str(data))
    try:
        store.execute([SendMessage("bob", "d", "user", "c-evil", BODY, to="alice")])
        first = store.last_lsn() + 1
    finally:
        store.close()
    odd = [(TS, "conv.created", "alice", "d",
            {"conv": GROUP, "kind": "group", "name": EVIL, "open": False}),
           (TS, "member.added", "alice", "d", {"conv": GROUP, "user": "alice", "role": "owner"}),
           (TS, "member.added", "alice", "d", {"conv": GROUP, "user": USER, "role": "member"}),
           (TS, "message.accepted", "alice", "d", {"conv": GROUP, "cid": "evil", "body": "hi"}),
           (TS, "delivery.acked", USER, DEVICE, {"upto": 3})]
    sealed, _ = seal(odd, first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    status, out, err = _homing(capsys, "audit", "rebuild", "--data", str(data))
    assert status == 0, (out, err)
    status, out, err = _homing(capsys, "audit", "verify", "--data", str(data))
    assert status == 0 and json.loads(out)["ok"], (out, err)
    return data


def test_inbox_table_escapes_a_body_any_sender_chose(evil_data, capsys):
    """`audit inbox` printed bodies as they are: a body holding an escape sequence cleared the
    operator's screen, a line break forged an entry. The table now shows each body as `log`'s
    does (`body="..."`, every unprintable character `\\uXXXX`), and the ids of a record
    chained on by hand as `log` does too: one row an entry."""
    data = str(evil_data)
    status, out, err = _homing(capsys, "audit", "inbox", "--json", "--user", "alice",
                               "--data", data)
    assert status == 0, err
    entries = json.loads(out)["inbox"]
    status, out, err = _homing(capsys, "audit", "inbox", "--user", "alice", "--data", data)
    assert status == 0, err
    rows = _rows(out)
    assert len(rows) == len(entries) + 3, out
    assert any(row.endswith('from bob  body="hi 0"') for row in rows), out
    assert any(row.endswith(
        'from bob  body="\\u001b[2J\\u001b[H\\u009b31m\\u2028\\u2029\\u202eevil\\r\\n     9'
        '  msg      forged\\u0000\\u0007"') for row in rows), out
    assert any(f"  {json.dumps(GROUP)}#1  " in row for row in rows), out
    assert rows[-2].startswith(f"unread: dm:alice:bob=2, {json.dumps(GROUP)}="), rows[-2]


def test_inbox_table_escapes_a_user_and_device_chained_on_by_hand(evil_data, capsys):
    """`audit inbox --user U` of a user whose id and device (chained on by hand) hold escape
    sequences: its header and device cursors are escaped as `log`'s table escapes them."""
    status, out, err = _homing(capsys, "audit", "inbox", "--user", USER, "--data",
                               str(evil_data))
    assert status == 0, err
    rows = _rows(out)
    assert rows[0].startswith(f"inbox of {json.dumps(USER)} at lsn"), rows[0]
    assert rows[-1].startswith(f"devices: {json.dumps(DEVICE)}@"), rows[-1]


def test_trace_text_escapes_ids_chained_on_by_hand(evil_data, capsys):
    """`audit trace` printed a message's conversation, recipients and devices as they are: an
    id chained on by hand (`verify` passes it) reached the terminal as an escape sequence, or
    forged a recipient's line. They are escaped now, one line each."""
    args = ("audit", "trace", "--cid", "evil", "--from", "alice", "--data", str(evil_data))
    status, out, err = _homing(capsys, *args, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert list(result["recipients"]) == [USER], result
    assert list(result["recipients"][USER]["devices"]) == [DEVICE], result
    status, out, err = _homing(capsys, *args)
    assert status == 0, err
    rows = _rows(out)
    assert len(rows) == 3, out
    assert rows[0].startswith(f"message {json.dumps(GROUP)} #1 from alice at "), rows[0]
    assert rows[1].startswith(f"  {json.dumps(USER)}: delivered 2027-"), rows[1]
    assert rows[2].startswith(f"      device {json.dumps(DEVICE)}: 2027-"), rows[2]


def test_stats_table_escapes_a_type_of_no_event(evil_data, capsys):
    """`audit stats` counts a record chained on by hand of a type no event has (`verify` fails
    it, `stats` counts it): its table printed that type as it is, escape sequence and all;
    it is escaped now, one line a type."""
    sealed, _ = seal([(TS, EVIL, "alice", "d", {})], _last_lsn(evil_data) + 1, GENESIS)
    _forge(evil_data, [value[32:] for _, value, _ in sealed])
    status, out, err = _homing(capsys, "audit", "stats", "--json", "--data", str(evil_data))
    assert status == 0, err
    by_type = json.loads(out)["by_type"]
    assert by_type[EVIL] == 1, by_type
    status, out, err = _homing(capsys, "audit", "stats", "--data", str(evil_data))
    assert status == 0, err
    rows = _rows(out)
    assert len(rows) == 7 + len(by_type), out
    assert f"  {json.dumps(EVIL)} 1" in rows, out


def test_log_table_escapes_the_same_text(evil_data, capsys):
    """`audit log`'s table (escaped since 2026-12-06) keeps each record on one printable row."""
    status, out, err = _homing(capsys, "audit", "log", "--data", str(evil_data))
    assert status == 0, err
    assert len(_rows(out)) == 1 + _last_lsn(evil_data), out


# ------------------------------------------------ review of 8109eaa: one spelling a value

# Text a sender chooses through the broker (a cid: any text without NUL) that a bare spelling
# made look like another value, or like a pair of its own in `log`'s DATA column.
LOOKALIKE = '"\\u001b[2J"'  # printable: a quote, a backslash, ... spelt as "\x1b[2J" is
FORGED_PAIR = 'x body="I agree"'  # a `body=` of its own before the message's body


def _spelt(cell: str) -> str:
    """The value a cell spells: JSON when it starts with a quote, else the text as it is."""
    return json.loads(cell) if cell.startswith('"') else cell


def test_log_table_tells_a_cid_from_the_escaped_spelling_of_another(tmp_path, capsys):
    """Two messages whose cids differ (one the printable text `"\\u001b[2J"`, the other an
    escape sequence) printed the same DATA in `audit log`'s table, and a cid holding
    `body="..."` showed a body of its own before the message's: text starting with a quote
    or holding `=` is quoted now, as unprintable text is, so each row spells one value."""
    data = tmp_path / "data"
    make_data(data, 1)
    store = Store.open(str(data))
    try:
        store.execute([SendMessage("bob", "d", "user", LOOKALIKE, "same", to="alice"),
                       SendMessage("bob", "d", "user", "\x1b[2J", "same", to="alice"),
                       SendMessage("bob", "d", "user", FORGED_PAIR, "real", to="alice")])
    finally:
        store.close()
    status, out, err = _homing(capsys, "audit", "log", "--type", "message", "--data",
                               str(data))
    assert status == 0, err
    rows = _rows(out)[-3:]
    datas = [row.split("  ")[-1].strip() for row in rows]
    assert datas[0] != datas[1], datas
    assert datas[0] == f"conv=dm:alice:bob cid={json.dumps(LOOKALIKE)} body=\"same\"", datas
    assert datas[2] == 'conv=dm:alice:bob cid="x body=\\"I agree\\"" body="real"', datas


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=12)
       | st.sampled_from(['"', '"a"', "a=b", "=", '"\\u0041"', "\u2028", "\u0085", "\u00a0",
                          "\u200b", "\u202e", "\ufeff", "\ud800", "null", " ", "a b"]))
def test_a_cell_spells_one_text_and_the_fast_row_agrees(text):
    """`_cell` is one to one on text (the bare spelling never starts with a quote nor holds
    `=`, the quoted one is JSON), never unprintable, and `log`'s row takes the same spelling
    whether its fast path or `_cell` spells the columns; DATA's keys and values (inline) too."""
    from broker.audit_cli import _cell, _summary, _table_row
    cell = _cell(text)
    assert cell.isprintable() and (cell.startswith('"') or "=" not in cell), (text, cell)
    assert _spelt(cell) == text, (text, cell)
    rec = {"lsn": 7, "ts": "t", "type": text, "actor": text, "device": text, "data": {}}
    assert _table_row(rec, 3) == (f"  7  t  {cell:<16}  {cell + '/' + cell:<24}  ")
    assert _summary({"name": text, text: 1}, 1000) == f"name={cell} {cell}=1" or text == "name"
