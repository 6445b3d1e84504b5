"""`homing audit` and `homing backup` on damaged, older or odd data directories, and a backup
killed mid-copy: typed JSON errors, never a traceback; nothing applied that verify skipped; no
reader slot left pinning the broker's pages. Each test is a defect a review found (2026-12-04,
night). Real LMDB, real `homing` child processes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import lmdb
import pytest

from storage.commands import SendMessage
from storage.errors import CorruptProjection
from storage.lmdb_env import READER_CHECK_S
from storage.log import seal
from storage.records import GENESIS, lsn_key
from storage.store import Store
from tests.procs import homing, homing_cmd


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*homing_cmd(), *args], capture_output=True, text=True, timeout=120)


def make_data(path: Path, n: int = 5) -> int:
    """A data directory with `n` messages from bob to alice; returns its last LSN."""
    store = Store.open(str(path))
    try:
        store.execute([SendMessage("bob", "d", "user", f"c{i}", f"hi {i}", to="alice")
                       for i in range(n)])
        return store.last_lsn()
    finally:
        store.close()


def poke(path: Path, change) -> None:
    """Change the data directory behind homing's back, with lmdb directly."""
    env = lmdb.open(str(path), max_dbs=32)
    try:
        with env.begin(write=True) as txn:
            change(txn, lambda name: env.open_db(name.encode(), txn=txn))
    finally:
        env.close()


def assert_one_json_error(proc: subprocess.CompletedProcess, status: int, name: str) -> None:
    """docs/CLI.md: on failure the last line of stderr is one JSON error, exit as documented."""
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads(last)["error"] == name, proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)


# ---------------------------------------------------------------- 1. records before LSN 1


def forge_before_lsn_1(txn, db) -> None:
    """A `member.added` of mallory into alice and bob's DM, sealed as LSN 0 (chained from
    GENESIS), put under the 8-byte key of LSN 0, which sorts before LSN 1."""
    ((lsn, value, _),), _ = seal([(1, "member.added", "mallory", "d", {
        "conv": "dm:alice:bob", "user": "mallory", "role": "member"})], 0, GENESIS)
    txn.put(lsn_key(lsn), value, db=db("log"))


def test_verify_fails_a_record_put_before_lsn_1_which_rebuild_would_apply(tmp_path):
    """docs/OPERATIONS.md, Auditing: "a log key that is no LSN ... fails `log` at its LSN".
    A record put under LSN 0 (LSNs start at 1) is skipped by verify, log and export (they all
    start with set_range(lsn_key(1))), yet `audit rebuild` (and `serve` on a layout change)
    folds the whole log cursor and applies it: here it makes mallory a member of a DM and
    hands her its messages, after a verify that said ok."""
    data = tmp_path / "data"
    make_data(data)
    poke(data, forge_before_lsn_1)
    verify = run("audit", "verify", "--data", str(data))
    report = json.loads(verify.stdout)
    rebuild = run("audit", "rebuild", "--data", str(data))
    store = Store.open(str(data), readonly=True)
    try:
        members = [u for u, _ in store.members("dm:alice:bob")]
    finally:
        store.close()
    assert (verify.returncode, report["ok"]) == (1, False), (
        f"verify passed a forged record before LSN 1: {verify.stdout}; after `audit rebuild`"
        f" ({rebuild.stdout.strip()}) the DM's members are {members}")


def test_verify_fails_a_short_log_key_before_lsn_1_and_rebuild_does_not_crash(tmp_path):
    """A 1-byte log key sorts before LSN 1: verify says ok (docs: a key that is no LSN fails
    `log`), and `audit rebuild` then dies with a traceback instead of a JSON error."""
    data = tmp_path / "data"
    make_data(data)
    poke(data, lambda txn, db: txn.put(b"\x00", b"x", db=db("log")))
    verify = run("audit", "verify", "--data", str(data))
    rebuild = run("audit", "rebuild", "--data", str(data))
    assert verify.returncode == 1 and json.loads(verify.stdout)["log"]["ok"] is False, (
        verify.stdout, rebuild.stderr[-300:])


# ---------------------------------------------------------------- 2. tracebacks on a bad log

DAMAGE = {
    # a log key that is no LSN, after the last record (the documented "not an lsn" case)
    "foreign key": lambda txn, db: txn.put(b"\xff" * 5, b"x", db=db("log")),
    # record 3 cut short: its body no longer decodes
    "cut record": lambda txn, db: txn.put(
        lsn_key(3), txn.get(lsn_key(3), db=db("log"))[:40], db=db("log")),
}
READERS = {
    "log": ("audit", "log"),
    "export": ("audit", "export"),
    "stats": ("audit", "stats"),
    "inbox": ("audit", "inbox", "--user", "alice"),
    "trace": ("audit", "trace", "--conv", "dm:alice:bob", "--seq", "5"),
    "rebuild --check": ("audit", "rebuild", "--check"),
    "rebuild": ("audit", "rebuild"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("action", sorted(READERS))
def test_a_damaged_log_is_a_json_error_not_a_traceback(tmp_path, damage, action):
    """docs/CLI.md: on failure the last line of stderr is one JSON object {"error", "code",
    "message"}; `corrupt_log` is one of audit's names. Every audit action but verify lets
    CorruptLog (or msgpack's ValueError) escape as a Python traceback, exit 1."""
    data = tmp_path / "data"
    make_data(data)
    poke(data, DAMAGE[damage])
    proc = run(*READERS[action], "--data", str(data))
    assert "Traceback" not in proc.stderr, proc.stderr.strip().splitlines()[-1]
    assert json.loads(proc.stderr.strip().splitlines()[-1])["error"] == "corrupt_log"
    assert proc.returncode == 1


def test_audit_rebuild_of_a_file_that_is_not_lmdb_is_no_data(tmp_path):
    """A data.mdb that is not an LMDB file: verify (read-only open) says `no_data`, exit 2, as
    docs/OPERATIONS.md says of an unusable data directory; `audit rebuild` (writable open)
    lets StorageError out as a traceback, exit 1."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.mdb").write_bytes(b"not lmdb" * 1000)
    verify = run("audit", "verify", "--data", str(data))
    assert_one_json_error(verify, 2, "no_data")
    rebuild = run("audit", "rebuild", "--data", str(data))
    assert_one_json_error(rebuild, 2, "no_data")


# ---------------------------------------------------------------- 3. backup


def test_a_backup_copies_a_directory_of_the_previous_layout(tmp_path):
    """docs/OPERATIONS.md, Upgrading: "take a backup before upgrading if you may need to go
    back". A directory written by the homing of layout 3 has no `revoked` table; `homing
    backup` opens it through the audits' open_readonly and refuses it with `outdated_layout`,
    exit 1: an error and status docs/CLI.md and "Backups" do not list for backup (whose
    refusals are exit 2), and a copy that needs none of the tables is not made."""
    from storage.store import LAYOUT_KEY

    data = tmp_path / "data"
    last = make_data(data)

    def as_layout_3(txn, db):
        txn.drop(db("revoked"), delete=True)
        txn.put(LAYOUT_KEY, b"3", db=db("layout"))

    poke(data, as_layout_3)
    proc = run("backup", str(tmp_path / "bk"), "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["last_lsn"] == last


def test_a_backup_copies_a_directory_written_before_layouts_were_recorded(tmp_path):
    """A directory without a `layout` table (every read-only audit ends there with
    `outdated_layout`) is copied through its log alone, whole, as the docs of 2026-12-04 say;
    the copy says the same as the original."""
    data = tmp_path / "data"
    last = make_data(data)
    poke(data, lambda txn, db: txn.drop(db("layout"), delete=True))
    assert run("audit", "stats", "--data", str(data)).returncode == 1
    proc = run("backup", str(tmp_path / "bk"), "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["last_lsn"] == last
    proc = run("audit", "stats", "--data", str(tmp_path / "bk"))
    assert_one_json_error(proc, 1, "outdated_layout")


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -Urm (a read-only mount)")
def test_a_backup_into_an_empty_directory_on_a_read_only_filesystem_is_data_dir(tmp_path):
    """An empty DEST on a read-only mount: the copy fails (EROFS) and `_take_away` then
    unlinks files that were never made, which on a read-only mount is EROFS too (not
    ENOENT, which missing_ok ignores): a traceback, exit 1, instead of `data_dir`, exit 2."""

    data = tmp_path / "data"
    make_data(data)
    ro = tmp_path / "ro"
    (ro / "empty").mkdir(parents=True)
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"exec {' '.join(homing_cmd())} backup {ro}/empty --data {data}")
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert "Read-only file system" in proc.stderr, proc.stderr
    assert_one_json_error(proc, 2, "data_dir")


# ---------------------------------------------------------------- 4. a killed reader


def _readers(data: Path) -> str:
    env = lmdb.open(str(data), readonly=True, max_dbs=32)
    try:
        return env.readers()
    finally:
        env.close()


def test_a_backup_killed_mid_copy_does_not_pin_the_brokers_pages(tmp_path):
    """docs/OPERATIONS.md, Backups, Cost: "while it runs, the broker's writers cannot reuse
    the pages they free". A backup killed mid-copy (SIGKILL, the OOM killer; SIGTERM and
    SIGINT end it cleanly since 2026-12-05) leaves its LMDB reader slot behind; nothing in
    homing ever called `reader_check`, so the slot outlived it and the running broker could
    reuse no freed page until it restarted: the data file grew by every page each commit
    rewrote."""
    import signal
    import time

    from tests.broker.test_docs_review import copying
    from tests.procs import BrokerProcess

    data = tmp_path / "data"
    store = Store.open(str(data))
    try:
        for base in range(0, 30_000, 5000):
            store.execute([SendMessage("bob", "d", "user", f"c{i}", "x" * 400, to="alice")
                           for i in range(base, base + 5000)])
    finally:
        store.close()
    with BrokerProcess(data) as bp:
        env = {"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token("alice")}
        for attempt in range(5):
            dest = tmp_path / f"bk{attempt}"
            backup = subprocess.Popen([*homing_cmd(), "backup", str(dest), "--data", str(data)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            while not copying(dest) and backup.poll() is None:
                time.sleep(0.0005)
            backup.send_signal(signal.SIGKILL)
            backup.wait(30)
            if backup.returncode == -signal.SIGKILL and not backup.stdout.read():
                break
        else:
            pytest.skip("the copy was always done before it could be stopped")
        # The broker goes on committing, for longer than the writer's READER_CHECK_S (it frees
        # dead readers' slots before a write at most that often: 20 commits can all come sooner
        # on a fast machine).
        killed, i = time.monotonic(), 0
        while i < 20 or time.monotonic() - killed < READER_CHECK_S + 1:
            i += 1
            homing("ack", "--upto", str(i), env=env)
            time.sleep(0.1)
        stale = _readers(data)
    # LMDB keeps every page freed after the slot's snapshot until `reader_check` frees it
    # (a development script: 50 commits grew a file by 19 MB with such a slot, by 0 without).
    assert str(backup.pid) not in stale, (
        f"reader slots of the broker's environment after the backup (pid {backup.pid}) was "
        f"stopped mid-copy and 20 commits more:\n{stale}")


# ---------------------------------------------------------------- 5. a data.mdb cut to nothing


@pytest.mark.parametrize("size", [0, 100, 4096])
@pytest.mark.parametrize("action", [("audit", "verify"), ("audit", "stats"), ("backup",)])
def test_a_data_file_cut_to_nothing_is_no_data_saying_so(tmp_path, size, action):
    """A backup killed right after it made its empty `data.mdb` (docs/OPERATIONS.md,
    Backups), or a copy cut inside LMDB's two meta pages: `no_data` (exit 2) said `Bad file
    descriptor` (an empty file) or `File is not an LMDB file`, naming nothing wrong with the
    file; it now says it is empty, or truncated, as it does of a file cut further on."""
    data = tmp_path / "data"
    make_data(data)
    dest = tmp_path / "bk"
    dest.mkdir()
    (dest / "data.mdb").write_bytes((data / "data.mdb").read_bytes()[:size])
    shutil.copy(data / "secret.key", dest) if (data / "secret.key").exists() else None
    args = [*action, str(tmp_path / "bk2")] if action == ("backup",) else list(action)
    proc = run(*args, "--data", str(dest))
    assert_one_json_error(proc, 2, "no_data")
    error = json.loads(proc.stderr.strip().splitlines()[-1])
    assert set(error) == {"error", "code", "message"} and error["code"] == 0
    said = "is empty (0 bytes)" if size == 0 else f"is truncated: {size} bytes"
    assert f"{dest}/data.mdb {said}" in error["message"], error
    assert not (tmp_path / "bk2").exists()


@pytest.mark.parametrize("action", [("audit", "rebuild"), ("serve", "--port", "0")])
def test_an_empty_data_file_is_not_made_a_new_data_directory(tmp_path, action):
    """A backup killed after it wrote `secret.key` beside its empty `data.mdb`, before the copy
    began: a writable open made LMDB write a new, empty environment into the file, so `audit
    rebuild` said `{"ok": true, "rebuilt": 0}` (and `verify` then passed it) and `serve`
    served it, welcoming every token of the old broker into an empty history. Both now
    refuse it, as the read-only actions do."""
    data = tmp_path / "data"
    make_data(data)
    dest = tmp_path / "bk"
    dest.mkdir()
    (dest / "data.mdb").write_bytes(b"")
    (dest / "secret.key").write_bytes(b"k" * 32)
    try:
        proc = subprocess.run([*homing_cmd(), *action, "--data", str(dest)],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`homing {' '.join(action)}` ran on an empty data.mdb")
    assert_one_json_error(proc, 2, "no_data" if action[0] == "audit" else "data_dir")
    assert f"{dest}/data.mdb is empty (0 bytes)" in proc.stderr, proc.stderr
    assert (dest / "data.mdb").stat().st_size == 0


# ---------------------------------------------------------------- a log cut behind its projections


def _cut_the_log(data: Path, n: int) -> int:
    """Remove the log's last `n` records behind homing's back (the projections, and their
    `meta.applied_lsn`, stay); return the log's last LSN before the cut."""
    last = make_data(data)
    poke(data, lambda txn, db: [txn.delete(lsn_key(lsn), db=db("log"))
                                for lsn in range(last - n + 1, last + 1)])
    return last


def test_a_log_cut_behind_its_projections_is_refused_for_writing(tmp_path):
    """The projections' `applied_lsn` ahead of the log's last LSN: its last records were
    removed behind homing's back. A writable open (the broker, `audit rebuild`) appended over
    them, reusing LSNs that inbox entries and `msg` rows name; only `audit verify` noticed.
    Writable opens now refuse it (CorruptLog after the log's end); read-only ones report it."""
    from storage.errors import CorruptLog

    data = tmp_path / "data"
    last = _cut_the_log(data, 2)
    with pytest.raises(CorruptLog) as refused:
        Store.open(str(data)).close()
    assert refused.value.lsn == last - 1, refused.value
    assert f"the log ends at lsn {last - 2}" in str(refused.value)
    assert f"applied up to lsn {last}" in str(refused.value)
    try:
        proc = subprocess.run([*homing_cmd(), "serve", "--port", "0", "--data", str(data)],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("`homing serve` served a log cut behind its projections")
    assert_one_json_error(proc, 2, "data_dir")
    assert f"log corrupt at lsn {last - 1}: the log ends at lsn {last - 2}" in proc.stderr
    assert_one_json_error(run("audit", "rebuild", "--data", str(data)), 1, "corrupt_log")
    verify = run("audit", "verify", "--data", str(data))  # read-only: opens, names it
    assert_one_json_error(verify, 1, "projection_mismatch")
    report = json.loads(verify.stdout)
    assert report["log"] == {"ok": True} and report["projections"]["ok"] is False, report
    store = Store.open(str(data), readonly=True)  # and the log still reads to its end
    try:
        assert [e.lsn for e in store.read_events()] == list(range(1, last - 1))
    finally:
        store.close()


def _behind(data, copy) -> tuple[int, list, dict]:
    """Three messages in `data`, a backup of it in `copy`, two more in `data`: return `data`'s
    last LSN, its records past the backup (to put under the copy's projections) and its
    projections."""
    make_data(data, 3)
    copy.mkdir()
    store = Store.open(str(data))
    try:
        k, _ = store.backup(str(copy))
        store.execute([SendMessage("bob", "d", "user", f"d{i}", "x", to="alice")
                       for i in range(2)])
        return store.last_lsn(), list(store.log.read_raw(k + 1)), store.dump_projections()
    finally:
        store.close()


def test_projections_behind_the_log_are_caught_up_for_writing(tmp_path):
    """The mirror case (the log past `applied_lsn`, as `audit verify` reports it: here a
    backup's projections under the original's later log) opens for writing, its projections
    caught up first; until 2026-12-05 they were served as they were, and the next batch
    applied on top of them (the next message got seq 4 of a conversation of 5)."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    last, tail, expected = _behind(data, copy)
    poke(copy, lambda txn, db: [txn.put(lsn_key(lsn), value, db=db("log"))
                                for lsn, value in tail])
    assert_one_json_error(run("audit", "verify", "--data", str(copy)), 1,
                          "projection_mismatch")
    store = Store.open(str(copy))
    try:
        assert store.dump_projections() == expected
        (outcome,) = store.execute([SendMessage("bob", "d", "user", "after", "x", to="alice")])
        assert outcome.error is None and outcome.lsn == last + 1 and outcome.reply["seq"] == 6
    finally:
        store.close()
    assert run("audit", "verify", "--data", str(copy)).returncode == 0


def test_audit_rebuild_remakes_a_damaged_row_of_projections_behind_the_log(tmp_path):
    """Projections behind the log with a damaged row the missing events read: `serve` (and any
    writable open) stops at it, naming the row, and `homing audit rebuild`, the remedy, remakes
    every row without catching up first; until 2026-12-05 its open caught up, met the row and
    died with a struct.error traceback, so that the directory could not be rebuilt."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    _last, tail, expected = _behind(data, copy)
    poke(copy, lambda txn, db: [txn.put(lsn_key(lsn), value, db=db("log"))
                                for lsn, value in tail]
         + [txn.put(b"alice", b"\x01", db=db("inbox_head"))])
    with pytest.raises(CorruptProjection) as failed:
        Store.open(str(copy))
    assert (failed.value.table, failed.value.key) == ("inbox_head", b"alice")
    proc = run("audit", "rebuild", "--data", str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["ok"] is True
    store = Store.open(str(copy))
    try:
        assert store.dump_projections() == expected
    finally:
        store.close()
