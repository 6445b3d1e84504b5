"""`homing backup`: a copy taken while a broker writes holds every message acked before it
started, passes `audit verify`, and serves the tokens of the original (docs/OPERATIONS.md,
"Backups"). Real broker processes, real LMDB."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

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
    assert set(result) == {"backup", "last_lsn", "head", "bytes", "secret", "previous_secret",
                           "seconds"}
    assert result["backup"] == str(dest) and result["secret"] is True
    assert result["previous_secret"] is False and not (dest / "secret.prev.key").exists()
    assert result["last_lsn"] >= max(r["lsn"] for r in before)
    assert result["bytes"] == (dest / "data.mdb").stat().st_size
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    for name in ("data.mdb", "secret.key"):
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o600
    verified = json.loads(homing("audit", "verify", "--data", str(dest)).stdout)
    assert verified["ok"] and verified["events"] == result["last_lsn"]
    # The copy's head is the one its verify prints: an anchor for later verifies of the log,
    # which has gone on past it (the sends during the copy) and still holds it.
    assert verified["head"] == result["head"] and result["head"]["lsn"] == result["last_lsn"]
    anchor = f"{result['head']['lsn']}:{result['head']['digest']}"
    later = json.loads(homing("audit", "verify", "--data", str(bp.data), "--anchor", anchor).stdout)
    assert later["ok"] and later["anchor"]["ok"] and later["events"] >= result["last_lsn"]
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




# A `homing backup` run whose imports are done, held until its stdin gives the word: runs
# started so take their first steps within about a millisecond of each other, not the tens
# of milliseconds by which the starts of interpreters vary.
_HELD_BACKUP = ("import sys, broker.cli, broker.backup_cli, storage.errors, storage.store\n"
                "sys.stdout.write('r'); sys.stdout.flush(); sys.stdin.buffer.read(1)\n"
                "sys.exit(broker.cli.main(sys.argv[1:]))\n")


def test_backups_into_the_same_dest_at_once_leave_one_whole_copy(tmp_path):
    """Several `homing backup` runs into the same new DEST at once (a scheduler's retry, or
    yesterday's job overrunning into today's with a DEST named by the date): one copies, the
    others are refused (`data_dir`, exit 2) and leave the copy alone. When two saw DEST empty,
    the loser's copy found `data.mdb` taken, and it "took away" what the winner was writing
    (and DEST, if it had made it): both failed, or the winner crashed on its vanished
    `data.mdb` with a traceback and left DEST holding `secret.key` alone (13 of 40 pairs run
    by a script).
    Rounds of 8 runs let go at once are run until two race so (a loser refused at the copy, not
    at the check): two did in 12 of 20 rounds here, about 2.5 s a round (pairs started as the
    command is raced in 1 of 20 at best, and took up to a minute to)."""
    from tests.broker.test_docs_review import _big_data_dir

    data = tmp_path / "data"
    _big_data_dir(data, 1)
    homing("token", "bob", "--data", str(data))  # a secret, so that a copy has two files
    for attempt in range(60):
        dest = tmp_path / f"bk{attempt}"
        runs = [subprocess.Popen([sys.executable, "-c", _HELD_BACKUP, "backup", str(dest),
                                  "--data", str(data)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(8)]
        for run in runs:  # each ready
            assert run.stdout.read(1) == "r", run.communicate()
        for run in runs:
            run.stdin.write("go")
            run.stdin.flush()
        ended = [(run.wait(60), *run.communicate()) for run in runs]
        assert sorted(code for code, _, _ in ended) == [0] + [2] * 7, ended
        (_, out, _), = [e for e in ended if e[0] == 0]
        assert json.loads(out)["backup"] == str(dest)
        assert sorted(p.name for p in dest.iterdir()) == ["data.mdb", "secret.key"], ended
        errs = [json.loads(err) for code, _, err in ended if code == 2]
        assert all(err["error"] == "data_dir" for err in errs), errs
        raced = [err for err in errs if "is not an empty directory" not in err["message"]]
        if raced:  # two saw it empty
            assert all("another process began writing into it" in err["message"]
                       for err in raced), raced
            break
    else:
        pytest.fail("no two backups ever raced past the check of an empty DEST")
    verified = json.loads(homing("audit", "verify", "--data", str(dest)).stdout)
    assert verified["ok"] and verified["events"] == json.loads(out)["last_lsn"]


def test_a_backup_killed_once_its_copy_is_whole_has_its_secret(tmp_path):
    """A backup SIGKILLed (the OOM killer, `kill -9`, a scheduler's last resort) after its
    `data.mdb` was whole but before the command printed its line leaves a DEST that `audit
    verify` passes and a broker serves, so it is taken for a backup: it must then hold the
    secret, or every token handed out is refused by a broker restored from it (one makes a new
    secret). The secret was written last, after the copy's fsync, which took 70 ms of a
    0.45 s backup of 165 MiB here (seconds on a slower disk): killed in that time, the copy
    verified and had no `secret.key`."""
    from tests.broker.test_docs_review import _big_data_dir

    data = tmp_path / "data"
    _big_data_dir(data, 64)
    homing("token", "bob", "--data", str(data))
    whole = json.loads(homing("backup", str(tmp_path / "ref"), "--data", str(data)).stdout)
    for attempt in range(5):
        dest = tmp_path / f"bk{attempt}"
        proc = subprocess.Popen([*homing_cmd(), "backup", str(dest), "--data", str(data)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while proc.poll() is None:
                if (dest / "data.mdb").exists() and (
                        (dest / "data.mdb").stat().st_size >= whole["bytes"]):
                    break
                time.sleep(0.0002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(60)
        if proc.returncode != -signal.SIGKILL:  # done before it was killed: try again
            continue
        verified = homing("audit", "verify", "--data", str(dest), check=False)
        assert verified.returncode == 0, verified.stderr  # it looks like a backup ...
        assert json.loads(verified.stdout)["events"] == whole["last_lsn"]
        assert (dest / "secret.key").read_bytes() == (data / "secret.key").read_bytes()
        return
    pytest.fail("every backup was done before it could be killed")


def test_a_backup_stopped_by_a_signal_stops_copying(tmp_path):
    """Ctrl-C (SIGINT) or SIGTERM during a backup stops the copy there (and takes it away,
    exit 130 or 143). LMDB's copy is one call into C, and Python runs its signal handlers
    only once such a call returns: a backup of 165 MiB signalled as its copy began wrote
    all 165 MiB into DEST, then took them away (3 of 3 runs), so a Ctrl-C on a large data
    directory went on reading it and writing the copy to the end, minutes on a slow disk."""
    from tests.broker.test_docs_review import _big_data_dir, copying

    data = tmp_path / "data"
    _big_data_dir(data, 160)
    whole = json.loads(homing("backup", str(tmp_path / "ref"), "--data", str(data)).stdout)
    for signum in (signal.SIGINT, signal.SIGTERM):
        dest = tmp_path / f"bk{signum}"
        proc = subprocess.Popen([*homing_cmd(), "backup", str(dest), "--data", str(data)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        largest = 0
        try:
            while not copying(dest) and proc.poll() is None:
                time.sleep(0.0002)
            proc.send_signal(signum)
            while proc.poll() is None:
                try:
                    largest = max(largest, (dest / "data.mdb").stat().st_size)
                except FileNotFoundError:
                    pass
                time.sleep(0.0002)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 128 + signum, proc.stderr.read().decode()
        assert not dest.exists()
        assert largest < whole["bytes"] // 2, (signum, largest, whole["bytes"])
