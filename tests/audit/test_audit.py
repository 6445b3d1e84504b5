"""`homing audit` end to end: real broker traffic over loopback, then the audit tools on it."""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
import trio

from broker.audit_cli import ProgressBar, parse_time
from broker.cli import main
from storage.projections import APPLIED_LSN, key2
from storage.records import lsn_key, pack_u64
from storage.store import Store
from tests.harness import running_broker
from tests.procs import homing_cmd, read_terminal
from tests.storage.test_layout import older_layout

HOMING = str(Path(sys.executable).with_name("homing"))
BINARY = bytes(range(250, 256)) + b"\0\1"


def audit(capsys, data: Path, *args: str) -> tuple[int, list[str], str]:
    """Run `homing audit ARGS --data DATA` in-process; return (status, stdout lines, stderr)."""
    capsys.readouterr()
    argv = ["audit", args[0], "--data", str(data), *args[1:]]
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def audit_json(capsys, data: Path, *args: str) -> list[dict]:
    """Run an audit command that must succeed; return its stdout JSON lines."""
    status, lines, err = audit(capsys, data, *args)
    assert status == 0, err
    return [json.loads(line) for line in lines]


async def recv(client, n: int) -> list:
    """Return the next `n` deliveries of `client`."""
    return [await client.deliveries().receive() for _ in range(n)]


async def scenario(tmp_path) -> dict:
    """Alice talks to bob (text and binary) and to a group with bob and carol; bob reads on two
    devices, carol never connects. Returns facts for the assertions; the broker is stopped."""
    facts: dict = {}
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, h.client("alice", "phone") as alice:
            r1 = await alice.send("hello bob", to="bob", cid="c1")
            r2 = await alice.send(BINARY, to="bob", cid="c2")
            group = await alice.create_group("team", ["bob", "carol"])
            g1 = await alice.send("hello team", conv=group, cid="g1")
            async with h.client("bob", "b1") as b1, h.client("bob", "b2") as b2:
                for dev in (b1, b2):
                    got = await recv(dev, 4)  # 2 dm, 1 added, 1 group message
                    await dev.ack(got[-1].inbox_seq)
                    await dev.ping()
                await b1.read(group, g1.seq)
                await b1.read(r1.conv, r2.seq)
            facts.update(dm=r1.conv, group=group, g1=g1, r1=r1, r2=r2)
    facts["data"] = tmp_path / "data"
    # Read once stopped: a device's ack of its own sends is committed when its session ends.
    store = Store.open(str(facts["data"]), readonly=True)
    try:
        facts["last_lsn"] = store.last_lsn()
    finally:
        store.close()
    return facts


async def test_log_json_shape_filters_and_table(tmp_path, capsys):
    """`audit log` prints every event as JSON with its filters, and an aligned table otherwise."""
    f = await scenario(tmp_path)
    events = audit_json(capsys, f["data"], "log", "--json")
    assert [e["lsn"] for e in events] == list(range(1, f["last_lsn"] + 1))
    first = events[0]
    assert set(first) == {"lsn", "ts", "ts_us", "type", "actor", "device", "data"}
    assert first["ts"].endswith("Z") and parse_time(first["ts"]) == first["ts_us"]
    sent = [e for e in events if e["type"] == "message.accepted"]
    assert sent[0]["data"] == {"conv": f["dm"], "cid": "c1", "body": "hello bob"}
    assert base64.b64decode(sent[1]["data"]["body_b64"]) == BINARY
    assert sent[0]["actor"] == "alice" and sent[0]["device"] == "phone"

    grp = audit_json(capsys, f["data"], "log", "--json", "--conv", f["group"])
    assert grp and all(e["data"]["conv"] == f["group"] for e in grp)
    carol = audit_json(capsys, f["data"], "log", "--json", "--user", "carol")
    assert [e["type"] for e in carol] == ["member.added"]
    # --user names the actor, `data.user` or a party of a direct message: alice's two messages
    # to bob are his (only the acks were looked at, bob's own, so the dm parties went untried).
    bobs = audit_json(capsys, f["data"], "log", "--json", "--user", "bob",
                      "--type", "message.accepted")
    assert [e["data"]["cid"] for e in bobs] == ["c1", "c2"], bobs
    acks = audit_json(capsys, f["data"], "log", "--json", "--type", "delivery", "--user", "bob")
    assert {(e["actor"], e["device"]) for e in acks} == {("bob", "b1"), ("bob", "b2")}
    assert all(e["type"] == "delivery.acked" for e in acks)
    window = audit_json(capsys, f["data"], "log", "--json", "--from-lsn", "2", "--to-lsn", "4")
    assert [e["lsn"] for e in window] == [2, 3, 4]
    assert audit_json(capsys, f["data"], "log", "--json", "--since", "1h") == events
    # Both bounds hold the event at them (only bounds far from any event were tried).
    assert audit_json(capsys, f["data"], "log", "--json", "--since", first["ts"]) == events
    assert audit_json(capsys, f["data"], "log", "--json", "--until", events[-1]["ts"]) == events
    assert audit_json(capsys, f["data"], "log", "--json", "--until", "2000-01-01") == []

    status, lines, _ = audit(capsys, f["data"], "log", "--to-lsn", "4")
    assert status == 0 and lines[0].split()[:3] == ["LSN", "TIME", "(UTC)"]
    assert len(lines) == 5 and lines[4].split()[0] == "4"
    assert lines[1].index("conv.created") == lines[0].index("TYPE")
    # Values as JSON spells them, as --json has them: no Python None/False/True in the table.
    status, lines, _ = audit(capsys, f["data"], "log", "--type", "conv.created")
    created = audit_json(capsys, f["data"], "log", "--json", "--type", "conv.created")
    assert status == 0 and len(lines) == len(created) + 1 >= 2
    for line, event in zip(lines[1:], created, strict=True):
        assert not {"None", "False", "True"} & {w.split("=", 1)[-1] for w in line.split()}
        for key, value in event["data"].items():
            if type(value) is not str:
                spelt = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
                assert f"{key}={spelt}" in line or "…" in line, (line, key, value)


async def test_log_table_quotes_text_that_would_break_its_lines(tmp_path, capsys):
    """A conversation's name is any text its creator chose: in the table it is quoted, escaped
    as the JSON does, when it holds a line break or another control character, so it can
    neither add a row of its own making nor send the operator's terminal an escape sequence."""
    forged = "x\n 9  2026-12-06T00:00:00.000000Z  tokens.revoked\r\x1b[2J"
    async with running_broker(tmp_path / "data") as h, h.client("mallory", "m") as mallory:
        await mallory.create_group(forged, [])
        await mallory.create_group("\u202e\x9b2J", [])  # a bidi override, a C1 escape (CSI)
        await mallory.create_group("plain name, \u00e9t\u00e9", [])
        dm = (await mallory.send("\x9b2J\u202ebody", to="bob", cid="b")).conv
    status, lines, _ = audit(capsys, tmp_path / "data", "log", "--type", "conv.created")
    assert status == 0 and len(lines) == 5, lines
    assert 'name="x\\n 9' in lines[1]
    assert 'name="\\u202e\\u009b2J"' in lines[2]
    assert "name=plain name, \u00e9t\u00e9" in lines[3]  # printable text stays bare
    status, body, _ = audit(capsys, tmp_path / "data", "log", "--type", "message", "--conv", dm)
    assert status == 0 and 'body="\\u009b2J\\u202ebody"' in body[1], body
    assert all(line.isprintable() for line in lines + body)


async def test_export_streams_the_log_json_shape(tmp_path, capsys):
    """`audit export` (run as the real command) prints the objects of `log --json`, their keys
    in the same order, with `prev` (first line) and `digest` after them (since 2026-12-06)."""
    f = await scenario(tmp_path)
    logged = audit_json(capsys, f["data"], "log", "--json", "--from-lsn", "3")
    proc = await trio.run_process([HOMING, "audit", "export", "--format", "jsonl", "--from-lsn",
                                   "3", "--data", str(f["data"])], capture_stdout=True,
                                  capture_stderr=True)
    assert proc.stderr == b""
    exported = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    added = [{"prev", "digest"}] + [{"digest"}] * (len(exported) - 1)
    assert [set(o) - set(log) for o, log in zip(exported, logged, strict=True)] == added
    assert [{k: o[k] for k in log} for o, log in zip(exported, logged, strict=True)] == logged
    assert all(list(o)[:len(log)] == list(log) for o, log in zip(exported, logged, strict=True))


async def test_verify_and_rebuild_check_pass_on_a_healthy_directory(tmp_path, capsys):
    """verify and rebuild --check exit 0 with a JSON summary on untouched data."""
    f = await scenario(tmp_path)
    [report] = audit_json(capsys, f["data"], "verify")
    head = report.pop("head")  # since 2026-12-06: the anchor to keep (tests/audit/test_anchor.py)
    assert head["lsn"] == f["last_lsn"] and len(bytes.fromhex(head["digest"])) == 32
    assert report == {"ok": True, "events": f["last_lsn"], "log": {"ok": True},
                      "projections": {"ok": True, "replayed": f["last_lsn"]}}
    [check] = audit_json(capsys, f["data"], "rebuild", "--check")
    assert check["ok"] is True


def _tamper(src: Path, dst: Path, change) -> Path:
    """Copy data directory `src` to `dst` and run `change(txn, dbs)` on it with lmdb directly."""
    shutil.copytree(src, dst)
    env = lmdb.open(str(dst), max_dbs=32)
    dbs = {name: env.open_db(name.encode())
           for name in ("log", "read", "inbox", "msg", "idem", "conv_seq", "created", "meta")}
    with env.begin(write=True) as txn:
        change(txn, dbs)
    env.close()
    return dst


async def test_verify_catches_a_flipped_byte_anywhere_in_an_event(tmp_path, capsys):
    """Flipping any one byte of a stored record (digest or body) fails verify at that LSN."""
    f = await scenario(tmp_path)
    lsn = 5
    with lmdb.open(str(f["data"]), max_dbs=32, readonly=True) as env, env.begin() as txn:
        size = len(txn.get(lsn_key(lsn), db=env.open_db(b"log", txn=txn)))
    for i, offset in enumerate((0, 31, 32, 40, size - 1)):
        def flip(txn, dbs, offset=offset):
            value = bytearray(txn.get(lsn_key(lsn), db=dbs["log"]))
            value[offset] ^= 0x01
            txn.put(lsn_key(lsn), bytes(value), db=dbs["log"])
        bad = _tamper(f["data"], tmp_path / f"flip{i}", flip)
        status, lines, err = audit(capsys, bad, "verify")
        assert status == 1, offset
        assert json.loads(lines[0])["log"]["lsn"] == lsn
        assert json.loads(lines[0])["events"] == lsn - 1  # verified before it (was 0)
        assert json.loads(lines[0])["projections"] == {"ok": None, "skipped": "log is corrupt"}
        assert json.loads(err) == {"error": "corrupt_log", "code": 0,
                                   "message": json.loads(err)["message"]}
        assert f"lsn {lsn}" in json.loads(err)["message"]


async def test_verify_catches_a_removed_event(tmp_path, capsys):
    """Removing a record in the middle fails at its LSN; removing the last fails the projections."""
    f = await scenario(tmp_path)
    middle = _tamper(f["data"], tmp_path / "middle",
                     lambda txn, dbs: txn.delete(lsn_key(6), db=dbs["log"]))
    status, lines, _ = audit(capsys, middle, "verify")
    assert status == 1 and json.loads(lines[0])["log"]["lsn"] == 6

    last = f["last_lsn"]
    tail = _tamper(f["data"], tmp_path / "tail",
                   lambda txn, dbs: txn.delete(lsn_key(last), db=dbs["log"]))
    status, lines, err = audit(capsys, tail, "verify")
    report = json.loads(lines[0])
    assert status == 1 and report["log"] == {"ok": True}
    assert report["projections"]["ok"] is False
    assert json.loads(err)["error"] == "projection_mismatch"


async def test_verify_and_check_name_a_projection_changed_behind_the_brokers_back(
        tmp_path, capsys):
    """A read mark altered in LMDB is reported with table, decoded key, stored and replayed."""
    f = await scenario(tmp_path)

    def lower(txn, dbs):
        txn.put(key2(f["group"], "bob"), pack_u64(0), db=dbs["read"])

    bad = _tamper(f["data"], tmp_path / "bad", lower)
    status, lines, err = audit(capsys, bad, "verify")
    diff = json.loads(lines[0])["projections"]["difference"]
    assert status == 1
    assert diff["table"] == "read" and diff["key"] == [f["group"], "bob"]
    assert diff["stored"] == 0 and diff["replayed"] == f["g1"].seq
    assert "read" in json.loads(err)["message"]

    status, lines, _ = audit(capsys, bad, "rebuild", "--check")
    assert status == 1 and json.loads(lines[0])["difference"] == diff

    gone = _tamper(f["data"], tmp_path / "gone", lambda txn, dbs: txn.delete(
        b"carol\0" + pack_u64(1), db=dbs["inbox"]))
    status, lines, _ = audit(capsys, gone, "rebuild", "--check")
    diff = json.loads(lines[0])["difference"]
    assert status == 1 and diff["table"] == "inbox" and diff["key"] == ["carol", 1]
    assert diff["stored"] is None and diff["replayed"][0] == "added"


TAMPERINGS = {
    # name: (change(txn, dbs, facts), expected difference: table, key, stored, replayed)
    "msg row pointing elsewhere": (
        lambda txn, dbs, f: txn.put(f["dm"].encode() + b"\0" + pack_u64(1), pack_u64(999),
                                    db=dbs["msg"]),
        lambda f: ("msg", [f["dm"], 1], 999, f["r1"].lsn)),
    "idem row added": (
        lambda txn, dbs, f: txn.put(b"alice\0forged", b"\0" * 16 + b"x", db=dbs["idem"]),
        lambda f: ("idem", ["alice", "forged"], [None, None, None], None)),
    "inbox entry rewritten": (
        lambda txn, dbs, f: txn.put(b"bob\0" + pack_u64(1), msgpack.packb(
            ["msg", f["dm"], 2, f["r2"].lsn]), db=dbs["inbox"]),
        lambda f: ("inbox", ["bob", 1], ["msg", f["dm"], 2, f["r2"].lsn],
                   ["msg", f["dm"], 1, f["r1"].lsn])),
    # A create's row (user, cid) -> conv is named by its conversation, not in hex.
    "created row added": (
        lambda txn, dbs, f: txn.put(b"alice\0order-9", f["group"].encode(), db=dbs["created"]),
        lambda f: ("created", ["alice", "order-9"], f["group"], None)),
    "conv seq moved": (
        lambda txn, dbs, f: txn.put(f["group"].encode(), pack_u64(7), db=dbs["conv_seq"]),
        lambda f: ("conv_seq", f["group"], 7, f["g1"].seq)),
    # The projections set back one event (or, the same to a check, the log appended to behind
    # the broker's back): a replay up to applied_lsn alone would agree with them.
    "projections behind the log": (
        lambda txn, dbs, f: txn.put(APPLIED_LSN, pack_u64(f["last_lsn"] - 1), db=dbs["meta"]),
        lambda f: ("meta", "applied_lsn", f["last_lsn"] - 1, f["last_lsn"])),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
async def test_check_names_the_first_difference_in_any_table(tmp_path, capsys, tampering):
    """The big append-only tables are compared by digest first; whatever the table, a change
    is found and named exactly as the row-by-row comparison names it."""
    change, expected = TAMPERINGS[tampering]
    f = await scenario(tmp_path)
    bad = _tamper(f["data"], tmp_path / "bad", lambda txn, dbs: change(txn, dbs, f))
    status, lines, _ = audit(capsys, bad, "rebuild", "--check")
    diff = json.loads(lines[0])["difference"]
    table, key, stored, replayed = expected(f)
    assert status == 1
    if table == "idem":  # a forged row: its value decodes to whatever the bytes say
        assert (diff["table"], diff["key"], diff["replayed"]) == (table, key, replayed)
        assert diff["stored"] is not None
    else:
        assert (diff["table"], diff["key"], diff["stored"], diff["replayed"]) == (
            table, key, stored, replayed)


async def test_checks_refuse_projections_of_an_older_layout_until_rebuilt(tmp_path, capsys):
    """Projections written by an older homing are not compared row by row (every row would
    differ): verify and rebuild --check say so, and a rebuild brings them up to date."""
    f = await scenario(tmp_path)
    with lmdb.open(str(f["data"]), max_dbs=32) as env:
        with env.begin(write=True) as txn:
            txn.put(b"projections", b"1", db=env.open_db(b"layout", txn=txn))
    for args in (("verify",), ("rebuild", "--check")):
        status, lines, err = audit(capsys, f["data"], *args)
        assert status == 1 and lines == []
        error = json.loads(err)
        assert error["error"] == "outdated_layout" and "audit rebuild" in error["message"]
    with lmdb.open(str(f["data"]), max_dbs=32) as env:  # a newer homing's layout: not "older"
        with env.begin(write=True) as txn:
            txn.put(b"projections", b"99", db=env.open_db(b"layout", txn=txn))
    status, _, err = audit(capsys, f["data"], "verify")
    assert status == 1 and "older or newer (layout 99," in json.loads(err)["message"]
    assert audit_json(capsys, f["data"], "rebuild")[0]["ok"] is True
    assert audit_json(capsys, f["data"], "verify")[0]["ok"] is True


async def test_rebuild_repairs_projections_once_the_broker_is_stopped(tmp_path, capsys):
    """rebuild replaces tampered projections atomically; verify passes afterwards."""
    f = await scenario(tmp_path)
    bad = _tamper(f["data"], tmp_path / "bad", lambda txn, dbs: txn.put(
        key2(f["group"], "bob"), pack_u64(0), db=dbs["read"]))
    [done] = audit_json(capsys, bad, "rebuild")
    assert done["ok"] is True and done["rebuilt"] == f["last_lsn"]
    assert audit_json(capsys, bad, "verify")[0]["ok"] is True


async def test_rebuild_refuses_while_a_broker_holds_the_directory(tmp_path):
    """`homing audit rebuild` exits non-zero with a clear message while the broker runs."""
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, h.client("alice") as alice:
            await alice.send("hi", to="bob")
            proc = await trio.run_process(
                [HOMING, "audit", "rebuild", "--data", str(tmp_path / "data")],
                capture_stdout=True, capture_stderr=True, check=False)
            check = await trio.run_process(
                [HOMING, "audit", "rebuild", "--check", "--data", str(tmp_path / "data")],
                capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 2 and proc.stdout == b""
    err = json.loads(proc.stderr)
    assert err["error"] == "locked"
    assert f"running broker (process {os.getpid()})" in err["message"]  # in this test process
    assert check.returncode == 0 and json.loads(check.stdout)["ok"] is True


async def test_inbox_at_lsn_equals_the_live_inbox_of_that_moment(tmp_path, capsys):
    """`audit inbox --at-lsn N` shows what the live store showed when N was the last LSN."""
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, h.client("alice") as alice:
            group = await alice.create_group("g", ["bob"])
            for i in range(3):
                await alice.send(f"early {i}", conv=group)
            await alice.send("dm", to="bob")
            store = h.broker.store
            then_lsn = store.last_lsn()
            then = store.inbox_after("bob", 0, 1000)
            then_unread = store.unread("bob")
            for i in range(4):
                await alice.send(f"late {i}", conv=group)
            await alice.send("later dm", to="bob")
            now = store.inbox_after("bob", 0, 1000)
    data = tmp_path / "data"
    [past] = audit_json(capsys, data, "inbox", "--user", "bob", "--at-lsn", str(then_lsn),
                        "--json")
    assert past["lsn"] == then_lsn and past["unread"] == then_unread
    fields = ("inbox_seq", "kind", "conv", "seq", "lsn")
    assert [tuple(e[k] for k in fields) for e in past["inbox"]] == \
        [(i.inbox_seq, i.kind, i.conv, i.seq, i.lsn) for i in then]
    assert [e.get("body") for e in past["inbox"]] == [i.body for i in then]
    [end] = audit_json(capsys, data, "inbox", "--user", "bob", "--json")
    assert len(end["inbox"]) == len(now) and end["unread"] == {group: 7, "dm:alice:bob": 2}
    [event] = audit_json(capsys, data, "log", "--json", "--from-lsn", str(then_lsn),
                         "--to-lsn", str(then_lsn))
    [at] = audit_json(capsys, data, "inbox", "--user", "bob", "--json", "--at", event["ts"])
    later = audit_json(capsys, data, "log", "--json", "--from-lsn", str(at["lsn"] + 1))
    assert at["lsn"] >= then_lsn and at["ts"] == event["ts"]
    assert all(e["ts_us"] > event["ts_us"] for e in later)
    [early] = audit_json(capsys, data, "inbox", "--user", "bob", "--json", "--at",
                         "2000-01-01")
    assert early["lsn"] == 0 and early["inbox"] == []
    status, lines, _ = audit(capsys, data, "inbox", "--user", "bob", "--at-lsn", str(then_lsn))
    assert status == 0 and lines[0].startswith(f"inbox of bob at lsn {then_lsn}")


async def test_trace_shows_a_delivered_and_read_recipient_and_an_unread_one(tmp_path, capsys):
    """trace: bob got the group message on both devices and read it; carol has done neither."""
    f = await scenario(tmp_path)
    g1 = f["g1"]
    [t] = audit_json(capsys, f["data"], "trace", "--conv", f["group"], "--seq", str(g1.seq),
                     "--json")
    assert set(t) == {"conv", "seq", "from", "lsn", "ts", "recipients"}
    assert (t["conv"], t["seq"], t["from"], t["lsn"]) == (f["group"], g1.seq, "alice", g1.lsn)
    bob, carol = t["recipients"]["bob"], t["recipients"]["carol"]
    assert set(t["recipients"]) == {"bob", "carol"}
    assert set(bob["devices"]) == {"b1", "b2"}
    assert bob["delivered"] == min(bob["devices"].values()) > t["ts"]
    assert bob["read"] is not None and bob["read"] >= bob["delivered"]
    assert carol == {"delivered": None, "devices": {}, "read": None}

    [by_cid] = audit_json(capsys, f["data"], "trace", "--cid", "g1", "--from", "alice", "--json")
    assert by_cid == t
    # "hello bob" is the first entry of bob's inbox: its acks are found as any other's (the
    # entries traced above were later ones, so a search that never looked at entry 1 passed).
    [first] = audit_json(capsys, f["data"], "trace", "--cid", "c1", "--from", "alice", "--json")
    assert set(first["recipients"]["bob"]["devices"]) == {"b1", "b2"}, first
    status, lines, _ = audit(capsys, f["data"], "trace", "--conv", f["group"], "--seq", "1")
    assert status == 0 and lines[0].startswith(f"message {f['group']} #1 from alice")
    status, _, err = audit(capsys, f["data"], "trace", "--conv", f["group"], "--seq", "99")
    assert status == 1 and json.loads(err)["error"] == "not_found"


async def test_stats_counts_events_users_conversations_and_sizes(tmp_path, capsys):
    """stats reports events by type, distinct users and conversations, sizes and time span."""
    f = await scenario(tmp_path)
    [s] = audit_json(capsys, f["data"], "stats", "--json")
    assert s["events"] == f["last_lsn"] == sum(s["by_type"].values())
    assert s["by_type"]["message.accepted"] == 3 and s["by_type"]["conv.created"] == 2
    assert s["users"] == 3 and s["conversations"] == 2
    assert 0 < s["log_bytes"] <= s["disk_bytes"]
    assert s["first_ts"] <= s["last_ts"] and (s["first_lsn"], s["last_lsn"]) == (1, s["events"])
    status, lines, _ = audit(capsys, f["data"], "stats")
    assert status == 0 and lines[0].startswith("events")


def test_a_missing_data_directory_is_a_json_error(tmp_path, capsys):
    """Every audit command refuses a directory that is not a data directory, creating nothing."""
    status, lines, err = audit(capsys, tmp_path / "nope", "rebuild")
    assert status == 2 and lines == [] and json.loads(err)["error"] == "no_data"
    assert not (tmp_path / "nope").exists()


def test_time_arguments_accept_iso_dates_and_durations_ago():
    """TIME is ISO-8601 with or without zone, a bare date, or a duration ago."""
    assert parse_time("1970-01-02") == 86_400_000_000
    assert parse_time("1970-01-01T00:00:01Z") == 1_000_000
    assert parse_time("1970-01-01T01:00:00+01:00") == 0
    assert parse_time("1970-01-01T00:00:00.5") == 500_000
    from datetime import UTC, datetime
    now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert parse_time("2h", now) == parse_time("2026-11-22T08:00:00Z")
    assert parse_time("10m", now) == parse_time("2026-11-22T09:50:00Z")
    with pytest.raises(Exception, match="bad time"):
        parse_time("yesterday")


def test_progress_bar_draws_only_on_a_terminal():
    """The progress bar writes to a tty stream and stays silent on a pipe."""
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar("verify", 100, stream)
        bar(50)
        bar(100)
        bar.close()
    assert "verify" in tty.getvalue() and "100%" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_audit_rebuild_draws_its_progress_on_a_terminal(tmp_path):
    """`homing audit rebuild` on a terminal shows how far the replay got, of how many events:
    first the rebuild its open makes of a directory of an older layout, then its own."""
    last = older_layout(tmp_path / "data", 20_000)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([*homing_cmd(), "audit", "rebuild", "--data", str(tmp_path / "data")],
                              stdout=subprocess.PIPE, stderr=slave, timeout=60)
    finally:
        os.close(slave)
    drawn = read_terminal(master)
    assert proc.returncode == 0 and json.loads(proc.stdout)["rebuilt"] == last
    text = drawn.decode()
    assert "rebuild (new layout) [" in text and f"/{last:,}" in text
    assert "rebuild [" in text


async def test_a_directory_older_than_layouts_is_outdated_and_rebuild_brings_it_up(
        tmp_path, capsys):
    """A directory written before layouts were recorded lacks tables this homing keeps: the
    read-only checks say `outdated_layout` (not `no_data`), and `audit rebuild` (writable)
    brings it up to date."""
    f = await scenario(tmp_path)
    with lmdb.open(str(f["data"]), max_dbs=32) as env:
        with env.begin(write=True) as txn:
            for name in (b"layout", b"conv_seq"):
                txn.drop(env.open_db(name, txn=txn), delete=True)
    for args in (("verify",), ("rebuild", "--check"), ("stats",)):
        status, lines, err = audit(capsys, f["data"], *args)
        assert status == 1 and lines == [], args
        error = json.loads(err)
        assert error["error"] == "outdated_layout" and "audit rebuild" in error["message"]
    assert audit_json(capsys, f["data"], "rebuild")[0]["ok"] is True
    assert audit_json(capsys, f["data"], "verify")[0]["ok"] is True


async def test_verify_reports_a_foreign_key_or_an_unknown_event_type_as_a_corrupt_log(
        tmp_path, capsys):
    """Damage a broker never writes, a log key that is no LSN or a chained record of a type this
    homing does not know, is a corrupt log at its place, not a crash."""
    from storage.log import seal

    f = await scenario(tmp_path)
    last = f["last_lsn"]

    def foreign_key(txn, dbs):
        txn.put(b"\xff" * 5, b"x", db=dbs["log"])

    def unknown_type(txn, dbs):
        prev = txn.get(lsn_key(last), db=dbs["log"])[:32]
        ((lsn, value, _),), _ = seal([(1, "bogus.type", "mallory", "d", {})], last + 1, prev)
        txn.put(lsn_key(lsn), value, db=dbs["log"])

    for name, change, reason in (("key", foreign_key, "not an lsn"),
                                 ("type", unknown_type, "unknown event type")):
        bad = _tamper(f["data"], tmp_path / name, change)
        status, lines, err = audit(capsys, bad, "verify")
        report = json.loads(lines[0])
        assert status == 1 and report["log"]["ok"] is False, name
        assert report["log"]["lsn"] == last + 1 and reason in report["log"]["reason"], report
        assert json.loads(err)["error"] == "corrupt_log"
