"""`homing audit rebuild --check` of a log with a hole whose last LSN is past `applied_lsn`."""

from __future__ import annotations

import json

from broker.cli import main
from storage.commands import SendMessage
from storage.records import lsn_key
from storage.store import Store


def _forty_sends_then(data, change) -> int:
    """A store of 40 direct messages whose log `change(txn, log, last_lsn)` then alters behind
    its back, in LMDB directly; the last LSN before the change."""
    store = Store.open(str(data))
    try:
        for i in range(40):
            store.execute([SendMessage("ann", "d", "user", f"c{i}", f"hi {i}", to="bob")])
        env, log = store._env.env, store._dbs["log"]
        last = store.last_lsn()
        with env.begin(write=True) as txn:
            change(txn, log, last)
    finally:
        store.close()
    return last


def _hole_midway(txn, log, last: int) -> None:
    """The record at lsn last // 2 taken out, and those after it moved up one LSN."""
    for lsn in range(last, last // 2 - 1, -1):
        txn.put(lsn_key(lsn + 1), txn.get(lsn_key(lsn), db=log), db=log)
    txn.delete(lsn_key(last // 2), db=log)


def test_check_of_a_log_moved_up_past_a_hole_names_the_hole(tmp_path, capsys):
    """docs/OPERATIONS.md, Auditing: a record missing in the middle stops `rebuild --check`
    with corrupt_log at its LSN. With the records after it moved up one LSN (the log's last
    LSN then past applied_lsn), it answered projection_mismatch on meta.applied_lsn, with
    "replayed": 0 and a replay said to reach an LSN it never read, and no word of the hole."""
    data = tmp_path / "data"
    hole = _forty_sends_then(data, _hole_midway) // 2
    capsys.readouterr()
    status = main(["audit", "rebuild", "--check", "--data", str(data)])
    out, err = capsys.readouterr()
    assert status == 1 and not out.strip(), out
    error = json.loads(err.splitlines()[-1])
    assert error["error"] == "corrupt_log" and f"lsn {hole}:" in error["message"]


def test_verify_of_a_log_cut_behind_its_projections_names_applied_lsn(tmp_path, capsys):
    """docs/OPERATIONS.md, Auditing: the last records removed are caught as `meta.applied_lsn`
    ahead of the log, stored against the log's last LSN, which tells how many went. With more
    than the last event's rows behind, the difference named was the first row in table order
    (`conv_seq` of a conversation, two messages apart), which says neither."""
    data = tmp_path / "data"

    def cut_end(txn, log, last: int) -> None:
        for lsn in range(last - 29, last + 1):
            txn.delete(lsn_key(lsn), db=log)

    last = _forty_sends_then(data, cut_end)
    capsys.readouterr()
    status = main(["audit", "verify", "--data", str(data)])
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert status == 1 and report["log"]["ok"] is True
    assert report["projections"]["difference"]["table"] == "meta"
    assert report["projections"]["difference"]["stored"] == last
    assert report["projections"]["difference"]["replayed"] == last - 30
    assert report["projections"]["replayed"] == last - 30


def test_rebuild_of_a_log_with_a_hole_names_the_hole(tmp_path, capsys):
    """`homing audit rebuild` of a log with a record missing in the middle said `corrupt_log`
    at lsn 1 ("3478 log records for lsns 1 to 3479"): where the hole was, the auditor had to
    find out from the start of the log. It is named at its LSN."""
    data = tmp_path / "data"
    hole = _forty_sends_then(data, _hole_midway) // 2
    capsys.readouterr()
    status = main(["audit", "rebuild", "--data", str(data)])
    error = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert status == 1 and error["error"] == "corrupt_log", error
    assert f"lsn {hole}: record missing (the next is {hole + 1})" in error["message"], error
