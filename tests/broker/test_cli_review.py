"""The `homing` command's contract (docs/CLI.md, docs/OPERATIONS.md) where it failed: a clear
JSON error and the documented exit status, never a traceback or a hang. (A --content-policy
that does not load and a data.mdb that is no LMDB file: tests/broker/test_ops_review.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.procs import BrokerProcess, as_user, free_port, homing, homing_cmd, last_error, lines


def _send_stdin(bp: BrokerProcess, *args: str, user: str = "shop") -> subprocess.Popen:
    # PYTHONFAULTHANDLER: a SIGABRT makes it print every thread's stack (_stuck, below).
    # SIGINT at its default, as in a terminal: a test run started in the background by a shell
    # without job control (`bash .ci/run &`, nohup) inherits SIGINT ignored, and a process that
    # starts with SIGINT ignored keeps it so (Python and trio leave it alone): Ctrl-C is then
    # not ours to see.
    return subprocess.Popen(
        [*homing_cmd(), "send", "--stdin", *args],
        env={**os.environ, **as_user(bp, user, "service"), "PYTHONFAULTHANDLER": "1"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stuck(proc: subprocess.Popen, what: str) -> AssertionError:
    """`what` did not happen: the error to raise, with the process's stacks (SIGABRT)."""
    proc.send_signal(signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        err = b"(no stacks: it did not die of SIGABRT either)"
    return AssertionError(f"{what}; its threads:\n{err.decode(errors='replace')}")


def test_send_stdin_stops_at_a_refusal_while_the_pipe_stays_open(tmp_path):
    """`tail -f events | homing send --stdin`: a refusal stops the command (exit 1, the error)
    at once, not when the next line happens to come (the read of stdin could not be
    cancelled, so the command hung while the pipe stayed quiet)."""
    with BrokerProcess(tmp_path / "data") as bp:
        send = _send_stdin(bp, "--conv", "grp:0123456789abcdef")
        try:
            send.stdin.write(b"first line\n")
            send.stdin.flush()  # and the pipe stays open, as tail -f keeps it
            try:
                send.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise _stuck(send, "send --stdin hung after a refusal") from None
            err = last_error(send.stderr.read().decode())
            assert send.returncode == 1 and err["error"] == "forbidden", err
        finally:
            send.kill()
            send.wait()


def test_ctrl_c_stops_send_stdin_waiting_for_its_next_line(tmp_path):
    """SIGINT (Ctrl-C) ends `homing send --stdin` while it waits for input: exit 130 at once,
    no traceback. (If it does not, the failure shows where each of its threads waited: that
    is how a clean-clone CI run, started with `&`, showed its SIGINT had been ignored.)"""
    with BrokerProcess(tmp_path / "data") as bp:
        send = _send_stdin(bp, "--to", "bob", "--cid-prefix", "k")
        try:
            send.stdin.write(b"one\n")
            send.stdin.flush()
            assert json.loads(send.stdout.readline())["cid"] == "k-1"
            send.send_signal(signal.SIGINT)
            try:
                send.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise _stuck(send, "Ctrl-C did not stop send --stdin") from None
            stderr = send.stderr.read().decode()
            assert send.returncode == 130 and "Traceback" not in stderr, stderr
        finally:
            send.kill()
            send.wait()


@pytest.mark.parametrize("locale", [{"PYTHONIOENCODING": "utf-8"}, {"LANG": "C.UTF-8"},
                                    {"LANG": "C"}])
def test_send_stdin_reports_a_line_that_is_not_text_as_invalid(tmp_path, locale):
    """A line of stdin that does not decode is refused as `invalid` naming its line number
    (exit 1), after the lines before it were sent; it was a traceback (an exception group).
    So in the C and C.UTF-8 locales too (containers, systemd units, cron), where Python reads
    stdin with the surrogateescape handler: there the line became text with lone surrogates,
    and the send failed later without naming the line ("send: cannot encode: ...")."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LC_CTYPE")}
    with BrokerProcess(tmp_path / "data") as bp:
        proc = subprocess.run(
            [*homing_cmd(), "send", "--to", "bob", "--stdin", "--cid-prefix", "u"],
            env={**env, **locale, **as_user(bp, "shop", "service")},
            input=b"fine\nbad \xff byte\n", capture_output=True, timeout=30)
        stderr = proc.stderr.decode()
        assert proc.returncode == 1, stderr
        err = last_error(stderr)
        assert (err["error"], err["code"]) == ("invalid", 7), err
        assert err["message"].startswith("send: line 2 of stdin is not utf-8 text"), err
        assert [r["cid"] for r in lines(proc)] == ["u-1"]


def test_send_refuses_options_that_do_not_go_together(tmp_path):
    """`--cid` names the cid of TEXT and `--cid-prefix` those of --stdin's lines: each with the
    other form is a usage error (exit 2) before connecting. They were ignored, so a script
    that meant its sends to be idempotent got fresh cids, and duplicates when run again."""
    env = {"HOMING_SERVER": f"127.0.0.1:{free_port()}", "HOMING_TOKEN": "v1.any.token"}
    for args, says in (
            (["--stdin", "--cid", "c1"], "--cid goes with TEXT; with --stdin use --cid-prefix"),
            (["--cid-prefix", "p", "text"], "--cid-prefix goes with --stdin; with TEXT use --cid")):
        proc = homing("send", "--to", "bob", *args, "--connect-timeout", "1", env=env,
                      check=False, timeout=20)
        assert proc.returncode == 2, proc.stderr
        err = last_error(proc.stderr)
        assert err == {"error": "usage", "code": 0, "message": says}, err


def test_send_and_create_refuse_an_empty_cid_or_cid_prefix(tmp_path):
    """An empty `--cid` or `--cid-prefix` (`--cid "$ORDER"` with ORDER unset) is a usage error
    (exit 2) before connecting. Each was taken for no cid at all: the send got a fresh one, so
    the script that meant to be idempotent appended its messages again when run again. The
    same holds for `group create` and `channel create`, since their `--cid` (2026-12-05)."""
    env = {"HOMING_SERVER": f"127.0.0.1:{free_port()}", "HOMING_TOKEN": "v1.any.token"}
    for args, option in ((["send", "--to", "bob", "--cid", "", "text"], "--cid"),
                         (["send", "--to", "bob", "--stdin", "--cid-prefix", ""], "--cid-prefix"),
                         (["group", "create", "g", "--cid", ""], "--cid"),
                         (["channel", "create", "c", "--cid", ""], "--cid")):
        proc = homing(*args, "--connect-timeout", "1", env=env,
                      check=False, timeout=20, input="a line\n")
        assert proc.returncode == 2, proc.stderr
        assert last_error(proc.stderr) == {
            "error": "usage", "code": 0,
            "message": f"{option} is empty: give one, or leave {option} out for a fresh one"}


def test_send_stdin_with_stdin_closed_is_a_usage_error():
    """`homing send --stdin <&-`: a usage error before connecting, not an AttributeError
    traceback (sys.stdin is None)."""
    proc = subprocess.run(
        [*homing_cmd(), "send", "--to", "bob", "--stdin", "--connect-timeout", "1"],
        env={**os.environ, "HOMING_SERVER": f"127.0.0.1:{free_port()}",
             "HOMING_TOKEN": "v1.any.token"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
        preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2, proc.stderr
    assert last_error(proc.stderr) == {"error": "usage", "code": 0,
                                       "message": "--stdin: standard input is closed"}


def test_a_reader_that_goes_away_is_not_reported_as_an_unreachable_broker(tmp_path):
    """`homing history ... | head -1`: once stdout's reader is gone the command stops quietly
    (as `homing audit` does), instead of exit 3 `unreachable` "[Errno 32] Broken pipe" and
    Python's "Exception ignored" noise."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop = as_user(bp, "shop", "service")
        homing("send", "--to", "bob", "--stdin", "--cid-prefix", "h",
               input="".join(f"note {i}\n" for i in range(50)), env=shop)
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is printed
        try:
            proc = subprocess.run(
                [*homing_cmd(), "history", "--conv", "dm:bob:shop"],
                env={**os.environ, **shop}, stdout=write_end, stderr=subprocess.PIPE,
                timeout=30)
        finally:
            os.close(write_end)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and stderr == "", (proc.returncode, stderr)


def test_audit_refuses_an_lsn_past_the_largest_as_usage(tmp_path):
    """An LSN too large for the log's keys, or a duration ago of more digits than a float holds,
    is a usage error naming the option, not a traceback (struct.error, OverflowError)."""
    with BrokerProcess(tmp_path / "data") as bp:
        homing("send", "--to", "bob", "hi", env=as_user(bp, "shop"))
    for args in (["log", "--from-lsn"], ["log", "--to-lsn"], ["export", "--from-lsn"],
                 ["inbox", "--user", "bob", "--at-lsn"]):
        proc = homing("audit", *args, str(2**64), "--data", str(tmp_path / "data"),
                      check=False, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        err = last_error(proc.stderr)
        assert err["error"] == "usage" and "bad LSN" in err["message"], err
    proc = homing("audit", "log", "--since", "9" * 400 + "w", "--data", str(tmp_path / "data"),
                  check=False, timeout=30)
    assert proc.returncode == 2 and "too long ago" in last_error(proc.stderr)["message"]
    # The largest LSN is no error: nothing past it, said in nothing (a run that hung would
    # raise at the timeout, the clock's only say here).
    proc = homing("audit", "log", "--json", "--from-lsn", str(2**63 - 1), "--data",
                  str(tmp_path / "data"), timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc


def test_a_server_port_out_of_range_is_a_usage_error():
    """`--server HOST:99999` is not HOST:PORT: a usage error before connecting (exit 2), as
    `--server foo` is. The resolver took the port modulo 65536, so `127.0.0.1:83254` talked to
    a broker on port 17718, and `:99999` was "Connection refused" (exit 3) on port 34463."""
    for server in ("127.0.0.1:99999", "127.0.0.1:0"):
        proc = homing("send", "--server", server, "--to", "bob", "hi", "--connect-timeout",
                      "1", env={"HOMING_TOKEN": "v1.any.token"}, check=False, timeout=20)
        assert proc.returncode == 2, proc.stderr
        err = last_error(proc.stderr)
        assert err == {"error": "usage", "code": 0, "message":
                       f"server must be HOST:PORT with a PORT from 1 to 65535, not {server!r}"}


def test_a_server_host_that_is_no_host_name_is_a_usage_error():
    """A HOST with an empty part (`a..b`) or a part over 63 characters can be no host: a usage
    error before connecting (exit 2). It was a UnicodeError traceback from the resolver's IDNA
    encoding, exit 1."""
    for host in ("a..b", "x" * 64 + ".example"):
        proc = homing("send", "--server", f"{host}:7717", "--to", "bob", "hi",
                      "--connect-timeout", "1", env={"HOMING_TOKEN": "v1.any.token"},
                      check=False, timeout=20)
        assert proc.returncode == 2, proc.stderr
        err = last_error(proc.stderr)
        assert err["error"] == "usage" and err["message"].startswith(
            f"server must be HOST:PORT, not '{host}:7717': '{host}' is no host name"), err


def test_serve_on_a_host_that_is_no_host_name_is_a_listen_error(tmp_path):
    """`homing serve --host a..b` is the `listen` error of a host that does not resolve (exit
    2, nothing made), not a UnicodeError traceback, exit 1."""
    proc = homing("serve", "--data", str(tmp_path / "data"), "--host", "a..b", "--port", "0",
                  check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert last_error(proc.stderr) == {"error": "listen", "code": 0, "message": (
        "cannot listen on a..b:0: not a host name (a part between dots is empty or over 63 "
        "characters)")}
    assert not (tmp_path / "data").exists()


async def test_open_client_refuses_a_host_that_is_no_host_name_with_value_error():
    """The SDK says so with ValueError at once, not a UnicodeError out of open_client."""
    import pytest

    from broker.client import open_client

    with pytest.raises(ValueError, match="is no host name"):
        async with open_client("a..b:7717", "v1.any.token", reconnect_timeout=1):
            pass


async def test_open_client_refuses_a_port_out_of_range_with_value_error():
    """The SDK refuses such an address at once with ValueError, as it refuses one without a
    port, rather than connect to the port modulo 65536."""
    import pytest

    from broker.client import open_client

    with pytest.raises(ValueError, match="PORT from 1 to 65535"):
        async with open_client("127.0.0.1:70000", "v1.any.token", reconnect_timeout=1):
            pass


def test_an_audit_export_larger_than_the_pipe_stops_quietly_when_its_reader_goes(tmp_path):
    """`homing audit export | head -1` over a log whose export is larger than stdout's buffer:
    the broken pipe is met while the command writes, not at the last flush, and it still stops
    quietly with exit 1 (docs/CLI.md). The history case above prints less than a buffer, so
    its pipe broke at `main`'s flush, and the audit commands' own exit status went untried."""
    from storage.commands import SendMessage
    from storage.store import Store

    store = Store.open(str(tmp_path / "data"))
    try:
        store.execute([SendMessage("ann", "d", "user", f"c{i}", "x" * 200, to="bob")
                       for i in range(200)])  # an export of about 60 KB: several buffers
    finally:
        store.close()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*homing_cmd(), "audit", "export", "--data", str(tmp_path / "data")],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and stderr == "", (proc.returncode, stderr)
