"""Defects found reviewing the 2026-12-05 session's changes. Real child processes, real sockets,
real LMDB."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from broker import tokens
from tests.procs import free_port, homing_cmd


def _stdout_closed() -> None:
    os.close(1)  # as `>&-` does: the child starts with no fd 1, and Python's sys.stdout is None


def test_token_and_serve_with_stdout_closed_exit_cleanly(tmp_path):
    """`homing token alice >&-` made its token and exited 0, as a print to a closed stdout does
    nothing; `homing serve` (a supervisor that starts it with fd 1 closed) stopped cleanly by
    SIGTERM exited 0. `main` now flushes stdout to tell a reader gone away, and with no stdout
    (sys.stdout None) that flush raised AttributeError: a traceback and exit 1 for both."""
    data = tmp_path / "data"
    proc = subprocess.run([*homing_cmd(), "token", "alice", "--data", str(data)],
                          stderr=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=_stdout_closed)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (data / tokens.SECRET_FILE).exists()

    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [*homing_cmd(), "serve", "--data", str(data), "--port", str(port),
             "--log-format", "json"],
            stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_stdout_closed)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.03)
        serve.send_signal(signal.SIGTERM)
        status = serve.wait(30)
    finally:
        serve.kill()
        serve.wait()
    stderr = (tmp_path / "serve.log").read_text()
    assert status == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_a_backup_whose_sigterm_is_ignored_goes_on(tmp_path):
    """A backup started with SIGTERM ignored (`trap '' TERM` in the script that runs it, a
    supervisor that shields its jobs) is not stopped by one, as Python leaves an ignored SIGINT
    ignored: the handler that makes SIGTERM end the copy cleanly was installed over SIG_IGN, so
    such a SIGTERM took away a copy the caller meant to survive it, and exited 143."""
    import json

    from tests.broker.test_docs_review import _big_data_dir, signal_mid_backup

    data = tmp_path / "data"
    _big_data_dir(data, 160)
    dest = tmp_path / "bk"
    proc, out, err = signal_mid_backup(data, dest, signal.SIGTERM,
                                       lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert (dest / "data.mdb").stat().st_size == result["bytes"]
