"""`homing audit verify` against a head digest recorded outside the data directory (an anchor).

The chain alone cannot show records removed from the log's end once the projections are made
to agree, nor records changed by someone who computes the chain again: these tests do both to
a real LMDB data directory, as an attacker with the files and docs/DESIGN.md would.
"""

from __future__ import annotations

import json

from broker.cli import main
from storage.commands import SendMessage
from storage.projections import APPLIED_LSN
from storage.records import chain, decode_body, encode_body, lsn_key, pack_u64
from storage.store import Store

SENDS = 150
CUT = 100


def _make(data) -> None:
    """A data directory of direct messages, its broker stopped."""
    store = Store.open(str(data))
    try:
        for i in range(SENDS):
            store.execute([SendMessage("ann", "d", "user", f"c{i}", f"hello {i}", to="bob")])
    finally:
        store.close()


def _run(capsys, *args: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    status = main(["audit", *args])
    out, err = capsys.readouterr()
    return status, (json.loads(out.splitlines()[0]) if out.strip() else {}), err


def _cut_tail(data, count: int) -> int:
    """Remove the last `count` records and set `meta.applied_lsn` to match; return the end."""
    store = Store.open(str(data))
    try:
        env, log = store._env.env, store._dbs["log"]
        last = store.last_lsn()
        with env.begin(write=True) as txn:
            for lsn in range(last - count + 1, last + 1):
                txn.delete(lsn_key(lsn), db=log)
            txn.put(APPLIED_LSN, pack_u64(last - count), db=store._dbs["meta"])
    finally:
        store.close()
    return last - count


def _rechain_from(data, lsn: int, body: str) -> None:
    """Give message record `lsn` another body and compute the chain again from there."""
    store = Store.open(str(data))
    try:
        env, log = store._env.env, store._dbs["log"]
        last = store.last_lsn()
        with env.begin(write=True) as txn:
            prev = txn.get(lsn_key(lsn - 1), db=log)[:32]
            for n in range(lsn, last + 1):
                ev = decode_body(txn.get(lsn_key(n), db=log)[32:])
                if n == lsn:
                    ev.data["body"] = body
                raw = encode_body(ev)
                prev = chain(prev, raw)
                txn.put(lsn_key(n), prev + raw, db=log)
    finally:
        store.close()


def test_verify_prints_the_head_to_anchor(tmp_path, capsys):
    """verify prints the last record's LSN and digest, which `--anchor` takes back."""
    data = tmp_path / "data"
    _make(data)
    status, report, _ = _run(capsys, "verify", "--data", str(data))
    head = report["head"]
    assert status == 0 and head["lsn"] == report["events"] and len(head["digest"]) == 64
    anchor = f"{head['lsn']}:{head['digest']}"
    status, report, _ = _run(capsys, "verify", "--data", str(data), "--anchor", anchor)
    assert status == 0 and report["ok"] is True
    assert report["anchor"] == {"lsn": head["lsn"], "digest": head["digest"], "ok": True}


def test_an_anchor_shows_the_tail_removed_and_the_projections_rebuilt(tmp_path, capsys):
    """The last records removed, applied_lsn set back and the projections rebuilt pass the
    chain and the projection check; verify with the head recorded before fails, naming the
    first LSN missing and how many."""
    data = tmp_path / "data"
    _make(data)
    _, before, _ = _run(capsys, "verify", "--data", str(data))
    end = _cut_tail(data, CUT)
    assert _run(capsys, "rebuild", "--data", str(data))[0] == 0
    status, report, _ = _run(capsys, "verify", "--data", str(data))
    assert status == 0 and report["ok"] is True  # what the chain alone cannot see
    anchor = f"{before['head']['lsn']}:{before['head']['digest']}"
    status, report, err = _run(capsys, "verify", "--data", str(data), "--anchor", anchor)
    assert status == 1 and report["ok"] is False
    assert report["log"]["ok"] is False and report["log"]["lsn"] == end + 1
    assert f"the log ends at lsn {end}" in report["log"]["reason"]
    assert report["anchor"]["ok"] is False
    assert json.loads(err.splitlines()[-1])["error"] == "corrupt_log"


def test_an_anchor_shows_a_record_changed_and_chained_again(tmp_path, capsys):
    """A body changed in the middle, every digest after it computed again, passes verify;
    with an anchor at or past it, verify fails at the anchor's LSN."""
    data = tmp_path / "data"
    _make(data)
    _, before, _ = _run(capsys, "verify", "--data", str(data))
    middle = before["head"]["lsn"] // 2
    store = Store.open(str(data))
    try:
        assert next(store.log.read(middle, middle)).type == "message.accepted"
    finally:
        store.close()
    _rechain_from(data, middle, "I never said that")
    status, report, _ = _run(capsys, "verify", "--data", str(data))
    assert status == 0 and report["head"]["digest"] != before["head"]["digest"]
    anchor = f"{before['head']['lsn']}:{before['head']['digest']}"
    status, report, _ = _run(capsys, "verify", "--data", str(data), "--anchor", anchor)
    assert status == 1 and report["log"]["lsn"] == before["head"]["lsn"]
    assert "chain" in report["log"]["reason"]
    # The anchor's own record is the one that failed: not held (it was not checked, and
    # `anchor.ok` true at the anchor's LSN passed).
    assert report["ok"] is False and report["anchor"]["ok"] is False, report


def test_an_anchor_that_is_no_lsn_and_digest_is_a_usage_error(tmp_path, capsys):
    """`--anchor` takes LSN:DIGEST, 64 hex digits; anything else is refused as usage (exit 2)."""
    data = tmp_path / "data"
    _make(data)
    for bad in ("12", "x:" + "0" * 64, "3:abc", "-1:" + "0" * 64):
        capsys.readouterr()
        try:
            status = main(["audit", "verify", "--data", str(data), "--anchor", bad])
        except SystemExit as exc:
            status = exc.code
        assert status == 2, bad


def test_a_fault_past_the_anchor_leaves_the_anchor_held(tmp_path, capsys):
    """A record flipped after the anchored LSN fails `log` at its own LSN, and the anchor,
    whose record verified before it, is reported held."""
    data = tmp_path / "data"
    _make(data)
    _, before, _ = _run(capsys, "verify", "--data", str(data))
    lsn = before["head"]["lsn"]
    anchor = f"{lsn // 2}:"
    store = Store.open(str(data))
    try:
        env, log = store._env.env, store._dbs["log"]
        with env.begin(write=True) as txn:
            anchor += txn.get(lsn_key(lsn // 2), db=log)[:32].hex()
            value = bytearray(txn.get(lsn_key(lsn - 1), db=log))
            value[-1] ^= 1
            txn.put(lsn_key(lsn - 1), bytes(value), db=log)
    finally:
        store.close()
    status, report, _ = _run(capsys, "verify", "--data", str(data), "--anchor", anchor)
    assert status == 1 and report["log"]["lsn"] == lsn - 1
    assert report["anchor"]["ok"] is True and "head" not in report
