"""`homing backup`: a copy taken while a broker writes holds every message acked before it
started, passes `audit verify`, and serves the tokens of the original (docs/OPERATIONS.md,
"Backups"). Real broker processes, real LMDB."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time

from tests.procs import BrokerProcess, homing, homing_cmd, lines


def as_user(bp: BrokerProcess, user: str) -> dict:
    return {"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token(user)}


def test_a_backup_taken_while_sending_is_whole_verified_and_serves(tmp_path):
    """While another sender keeps writing, `homing backup` copies the data directory: the copy
    holds the 200 messages acked before it began (and whatever it caught of the rest, a
    gapless prefix), `audit verify` passes on it, and a broker started on it answers a token
    minted by the original's secret with the same history."""
    with BrokerProcess(tmp_path / "data") as bp:
        before = lines(homing("send", "--to", "bob", "--stdin", "--cid-prefix", "a",
                              input="".join(f"m{i}\n" for i in range(200)),
                              env=as_user(bp, "shop")))
        assert len(before) == 200
        results = tmp_path / "busy.out"
        with open(results, "w") as out:
            busy = subprocess.Popen(
                [*homing_cmd(), "send", "--to", "carol", "--stdin", "--cid-prefix", "b"],
                env={**os.environ, **as_user(bp, "shop")}, text=True,
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL)
        stop = threading.Event()

        def feed() -> None:
            i = 0
            while not stop.is_set():
                busy.stdin.write(f"n{i}\n")
                busy.stdin.flush()
                i += 1
            busy.stdin.close()

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            while not results.stat().st_size:  # writes are going on while the copy is made
                time.sleep(0.01)
            dest = tmp_path / "backup"
            copy = homing("backup", str(dest), "--data", str(bp.data))
        finally:
            stop.set()
            feeder.join()
            busy.wait(timeout=60)
        assert busy.returncode == 0
    result = json.loads(copy.stdout)
    assert copy.stderr == ""
    assert set(result) == {"backup", "last_lsn", "bytes", "secret", "seconds"}
    assert result["backup"] == str(dest) and result["secret"] is True
    assert result["last_lsn"] >= max(r["lsn"] for r in before)
    assert result["bytes"] == (dest / "data.mdb").stat().st_size
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    for name in ("data.mdb", "secret.key"):
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o600
    verified = json.loads(homing("audit", "verify", "--data", str(dest)).stdout)
    assert verified["ok"] and verified["events"] == result["last_lsn"]
    with BrokerProcess(dest) as restored:
        env = {"HOMING_SERVER": restored.server, "HOMING_TOKEN": bp.token("bob")}
        got, page = [], [{"seq": 0}]
        while page:  # page on, as docs/CLI.md says, until nothing is printed
            page = lines(homing("history", "--conv", before[0]["conv"], "--limit", "200",
                                "--after", str(page[-1]["seq"]), env=env))
            got += page
    assert [m["body"] for m in got] == [f"m{i}" for i in range(200)]


def refused(*args: str) -> dict:
    """The one JSON error of a `homing backup` that must be refused (exit 2, nothing printed)."""
    proc = homing("backup", *args, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    return json.loads(proc.stderr)


def test_a_backup_refuses_what_it_must_not_overwrite_or_copy(tmp_path):
    """A DEST that is a file, a directory with files in it, or inside the data directory, a
    --data that holds no data directory, and a secret cut short are refused with one JSON
    error (exit 2) before anything is written."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    (tmp_path / "file").write_text("mine")
    with BrokerProcess(tmp_path / "data") as bp:
        homing("send", "--to", "bob", "hi", env=as_user(bp, "shop"))
        for dest in ("full", "file"):
            err = refused(str(tmp_path / dest), "--data", str(bp.data))
            assert err["error"] == "data_dir" and "is not an empty directory" in err["message"]
        err = refused(str(bp.data / "inner" / "bk"), "--data", str(bp.data))
        assert err["error"] == "data_dir" and "inside the data directory" in err["message"]
        assert not (bp.data / "inner").exists()
    assert (tmp_path / "full" / "keep").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"
    for data, says in ((tmp_path / "nothing", "does not exist"),
                       (tmp_path / "full", "is not a homing data directory")):
        err = refused(str(tmp_path / "new"), "--data", str(data))
        assert err["error"] == "no_data" and says in err["message"]
    (bp.data / "secret.key").write_bytes(b"short")
    err = refused(str(tmp_path / "new"), "--data", str(bp.data))
    assert err["error"] == "bad_secret"
    assert not (tmp_path / "new").exists()


def test_a_backup_goes_where_it_says(tmp_path):
    """A relative DEST, under parents that do not exist yet, is made (as `mkdir -p`) and
    printed as an absolute path, so that a script logging the line knows where it is."""
    with BrokerProcess(tmp_path / "data") as bp:
        homing("send", "--to", "bob", "hi", env=as_user(bp, "shop"))
    proc = subprocess.run([*homing_cmd(), "backup", "backups/day-1", "--data", str(bp.data)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backup"] == str(tmp_path / "backups" / "day-1")
    assert (tmp_path / "backups" / "day-1" / "data.mdb").stat().st_size == result["bytes"]

