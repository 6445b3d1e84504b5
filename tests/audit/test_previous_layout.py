"""`homing audit` on a data directory of a previous release (layout 4, 2026-12-04: no
`created` table; layout 5, 2026-12-05: no `joined` table; layout 6, 2026-12-06: no
highest device mark rows in `delivered`),
as an operator finds it right after upgrading homing and before restarting the broker, or in a
backup taken before the upgrade.
Each test is a defect a review of upgrade and compatibility found (2026-12-05). Real LMDB, real
`homing` child processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lmdb
import pytest

from storage.commands import Ack, CreateConv, MarkRead, SendMessage
from storage.store import LAYOUT, LAYOUT_KEY, Store
from tests.procs import homing_cmd


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*homing_cmd(), *args], capture_output=True, text=True, timeout=120)


# The tables each layout added, since layout 4.
ADDED = {"5": (b"created",), "6": (b"joined",)}


def make_layout_4(path: Path, layout: str = "4") -> int:
    """A data directory as the homing of `layout` left it (messages, a group, an ack, a read
    mark; none of the tables added after it: for layout 4 no `created` and `joined`); returns
    its last LSN."""
    store = Store.open(str(path))
    try:
        store.execute([SendMessage("bob", "d", "user", f"c{i}", f"hi {i}", to="alice")
                       for i in range(3)])
        (made,) = store.execute([CreateConv("alice", "d", "user", "group", "team",
                                            members=("bob",))])
        conv = made.reply["conv"]
        store.execute([SendMessage("bob", "d", "user", "g1", "in the group", conv=conv),
                       Ack("alice", "phone", "user", 2), MarkRead("alice", "phone", "user",
                                                                  "dm:alice:bob", 3)])
        last = store.last_lsn()
    finally:
        store.close()
    env = lmdb.open(str(path), max_dbs=32)
    try:
        with env.begin(write=True) as txn:
            for later, tables in ADDED.items():
                if later > layout:
                    for table in tables:
                        txn.drop(env.open_db(table, txn=txn), delete=True)
            if layout < "7":  # no user's highest device mark (`user \0` in `delivered`)
                delivered = env.open_db(b"delivered", txn=txn)
                for key in [k for k, _ in txn.cursor(db=delivered) if k.endswith(b"\0")]:
                    txn.delete(key, db=delivered)
            txn.put(LAYOUT_KEY, layout.encode(), db=env.open_db(b"layout", txn=txn))
    finally:
        env.close()
    return last


@pytest.mark.parametrize("layout", ["4", "5", "6"])
def test_the_log_readers_read_a_directory_of_the_previous_layout(tmp_path, layout):
    """docs/OPERATIONS.md, Auditing. `log`, `export`, `stats`, `inbox` and `trace` read the
    log (and `trace` the inboxes, unchanged since layout 2), which layout 5 left as it was;
    yet each refused a layout-4 directory, exit 1 `outdated_layout` ("has no 'created'
    table"), because the read-only open asked for every table of layout 5. The homing of
    layout 4 read the same directory (exit 0), so a script running `homing audit export`
    nightly failed from the upgrade until the broker was restarted, and a backup taken before
    the upgrade could not be read at all without starting a broker on it. `verify` and
    `rebuild --check` still say `outdated_layout` (they compare projections). Layout 5 (no
    `joined`, which layout 6 added on 2026-12-06) and layout 6 (no highest device marks,
    which layout 7 added the same day) likewise."""
    data = tmp_path / "data"
    last = make_layout_4(data, layout)
    d = str(data)
    for args in (("log", "--json"), ("export",), ("stats", "--json"),
                 ("inbox", "--user", "alice", "--json"),
                 ("trace", "--conv", "dm:alice:bob", "--seq", "1", "--json")):
        proc = run("audit", *args, "--data", d)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        out = [json.loads(line) for line in proc.stdout.splitlines()]
        if args[0] in ("log", "export"):
            assert [e["lsn"] for e in out] == list(range(1, last + 1)), args
        elif args[0] == "stats":
            assert out[0]["events"] == last
        elif args[0] == "inbox":
            assert out[0]["inbox_head"] == 4 and out[0]["delivered"] == {"phone": 2}
            assert out[0]["unread"] == {"dm:alice:bob": 0, out[0]["inbox"][3]["conv"]: 1}
        else:
            assert out[0]["recipients"]["alice"]["read"] is not None
            assert out[0]["recipients"]["alice"]["devices"].keys() == {"phone"}
    for args in (("verify",), ("rebuild", "--check")):
        proc = run("audit", *args, "--data", d)
        assert proc.returncode == 1, (args, proc.stderr)
        assert json.loads(proc.stderr.splitlines()[-1])["error"] == "outdated_layout"
        assert f"(layout {layout}, this version checks layout {LAYOUT.decode()})" in proc.stderr
