"""What docs/CLI.md and docs/OPERATIONS.md promise, where the code did otherwise: in the locale
most machines and containers run with, in the commands' side effects, and when a backup is
stopped half-way. Real child processes, real sockets, real LMDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from storage.commands import SendMessage
from storage.store import Store
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, last_error


def test_a_token_refused_for_its_user_id_makes_no_secret(tmp_path):
    """`homing token` with a user id the broker would refuse is a usage error (exit 2). It made
    the data directory and a new secret.key first (and warned `secret_created` about them):
    a typo left a data directory, with a secret no broker knows, wherever --data pointed."""
    data = tmp_path / "data"
    proc = homing("token", "Bad User", "--data", str(data), check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "secret_created" not in proc.stderr, proc.stderr
    err = last_error(proc.stderr)
    assert err["error"] == "usage" and "invalid user id 'Bad User'" in err["message"], err
    assert not data.exists()


def _big_data_dir(path, megabytes: int) -> None:
    """A data directory of about `megabytes` MiB of messages, so that its copy takes a while."""
    body = os.urandom(60_000)
    store = Store.open(str(path))
    try:
        n = 0
        while n * 60_000 < megabytes << 20:
            store.execute([SendMessage("shop", "d", "service", f"c{n + i}", body, to="bob")
                           for i in range(50)])
            n += 50
    finally:
        store.close()


def copying(dest) -> bool:
    """Whether a `homing backup` into `dest` is copying: its `data.mdb` has bytes in it (the
    command makes it empty first, and writes the secret beside it, before the copy begins)."""
    try:
        return (dest / "data.mdb").stat().st_size > 0
    except FileNotFoundError:
        return False


def signal_mid_backup(data, dest, signum, preexec) -> tuple[subprocess.Popen, bytes, bytes]:
    """Run `homing backup DEST --data DATA` (`preexec` in the child before it starts), send it
    `signum` as soon as its copy has begun, and return it ended, with its stdout and stderr."""
    proc = subprocess.Popen([*homing_cmd(), "backup", str(dest), "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
    try:
        deadline = time.monotonic() + 30
        while not copying(dest) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc, out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_backup_stopped_by_a_signal_leaves_no_copy_behind(tmp_path, signum):
    """docs/OPERATIONS.md, "Backups": a copy that cannot be finished is taken away, so that
    nothing half-made is ever taken for a backup. Ctrl-C (SIGINT) or a SIGTERM (`timeout`, a
    scheduler stopping the job) during the copy left DEST holding a `data.mdb`, unsynced, and
    no `secret.key`: restored, a broker would make a new secret, and every token handed out
    would be refused. Now the command exits 130 (143 for SIGTERM) and DEST is gone."""
    data = tmp_path / "data"
    _big_data_dir(data, 160)
    for attempt in range(5):
        dest = tmp_path / f"bk{attempt}"
        proc, out, err = signal_mid_backup(
            data, dest, signum, lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if proc.returncode == 0:  # the copy was done before the signal came: try again
            assert json.loads(out)["backup"] == str(dest)
            continue
        assert proc.returncode == 128 + signum, err.decode()
        assert b"Traceback" not in err, err.decode()
        assert not dest.exists(), sorted(p.name for p in dest.iterdir())
        return
    pytest.fail("every backup finished before the signal reached it")


@pytest.mark.parametrize("args, field", [
    ([b"bad \xff byte"], "body"),
    ([b"--cid", b"c\xff", "hi"], "cid"),
])
def test_an_argument_that_is_not_utf8_is_refused_naming_its_field(tmp_path, args, field):
    """docs/CLI.md: a value the protocol refuses is `invalid` (exit 1) "with a message that
    names the field and says what it takes". An argument holding bytes that are not UTF-8
    (Python hands it over with lone surrogates) was refused as `invalid` with the encoder's
    words alone: "send: cannot encode: 'utf-8' codec can't encode character '\\udcff' in
    position 4: surrogates not allowed", naming no field."""
    with BrokerProcess(tmp_path / "data") as bp:
        proc = subprocess.run([*homing_cmd(), "send", "--to", "bob", *args],
                              env={**os.environ, **as_user(bp, "shop", "service")},
                              capture_output=True, timeout=30)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b"", stderr
    err = last_error(stderr)
    assert (err["error"], err["code"]) == ("invalid", 7), err
    assert err["message"].startswith(f"send: bad value for field '{field}': not UTF-8 text"), err


def test_a_token_into_a_pipe_whose_reader_went_away_exits_quietly(tmp_path):
    """`homing token alice | head -c0`: the reader is gone before the token is written. Client
    commands stop quietly then, exit 1 (docs/CLI.md); `token` blamed its data directory
    (`data_dir`, "cannot use DIR: Broken pipe", exit 2), or, where the pipe broke at the
    interpreter's last flush, printed Python's "Exception ignored ... BrokenPipeError" and
    exited 120."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*homing_cmd(), "token", "alice", "--data", str(tmp_path / "d")],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Exception" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
