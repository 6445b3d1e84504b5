"""`homing audit verify` on a log holding a chained record no replay can read."""

from __future__ import annotations

import json

import msgpack

from broker.cli import main
from storage.commands import SendMessage
from storage.records import chain, lsn_key
from storage.store import Store


def test_verify_reports_a_chained_record_with_a_type_that_is_no_string(tmp_path, capsys):
    """docs/OPERATIONS.md, Auditing: a chained record of an event type this homing does not know
    fails `log` at its LSN. One whose type is a msgpack array or map (unhashable in Python) made
    `verify` die with a TypeError traceback instead of the corrupt_log report."""
    data = tmp_path / "data"
    store = Store.open(str(data))
    try:
        store.execute([SendMessage("ann", "d", "user", "c1", "hi", to="bob")])
        last = store.last_lsn()
        with store._env.env.begin(write=True) as txn:
            prev = txn.get(lsn_key(last), db=store._dbs["log"])[:32]
            body = msgpack.packb([last + 1, 5, ["member.added"], "mallory", "d", {}])
            txn.put(lsn_key(last + 1), chain(prev, body) + body, db=store._dbs["log"])
    finally:
        store.close()
    capsys.readouterr()
    status = main(["audit", "verify", "--data", str(data)])
    out, err = capsys.readouterr()
    report = json.loads(out.splitlines()[0])
    assert status == 1 and report["log"]["ok"] is False and report["log"]["lsn"] == last + 1
    assert json.loads(err.splitlines()[-1])["error"] == "corrupt_log"
