"""Operating `homing serve`: flags whose values the broker cannot run with are usage errors
(exit 2, nothing made), rates below one a second still let something through, and a rebuild's
writing of the rows is covered by systemd's extended start timeout."""

from __future__ import annotations

import json

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.harness import running_broker
from tests.procs import BrokerProcess, homing


def _usage_error(proc) -> dict:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "usage", err
    return err


@pytest.mark.parametrize("option, value, says", [
    # gc.set_threshold takes a C int: past it, an OverflowError traceback and exit 1.
    ("--gc-young-threshold", str(1 << 31), "from 1 to 2147483647"),
    # welcome's heartbeat is a uint of 63 bits: past it the broker started, and every hello
    # ended in `connection_failed` (an internal error) with the client told nothing.
    ("--heartbeat", str(1 << 63), "from 1 to 9223372036854775807"),
    # and far past it, float(3 x heartbeat) overflowed: a traceback, exit 1.
    ("--heartbeat", "1" + "0" * 400, "from 1 to 9223372036854775807"),
])
def test_serve_refuses_a_number_past_what_python_or_the_protocol_take(tmp_path, option, value,
                                                                        says):
    proc = homing("serve", "--data", str(tmp_path / "data"), "--port", "0", option, value,
                  check=False, timeout=20)
    err = _usage_error(proc)
    assert f"argument {option}: " in err["message"] and says in err["message"], err
    assert not (tmp_path / "data").exists()


def test_a_config_built_in_code_checks_the_heartbeat():
    from broker.config import Config

    assert Config(heartbeat_s=(1 << 63) - 1).heartbeat_s == (1 << 63) - 1
    for bad in (0, 1 << 63):
        with pytest.raises(ValueError, match="--heartbeat"):
            Config(heartbeat_s=bad)


@pytest.mark.parametrize("content", [None, b"", b"# only a comment\n\n", b"\xff\xfe bad\n"])
def test_serve_refuses_a_content_policy_it_cannot_load_before_making_anything(tmp_path,
                                                                               content):
    """A --content-policy file that is missing, holds no words or is not UTF-8 was read only
    inside the running broker: a traceback and exit 1 (systemd's Restart= then repeats it for
    good) after the data directory was made. It is a usage error, as any other flag's."""
    policy = tmp_path / "words.txt"
    if content is not None:
        policy.write_bytes(content)
    proc = homing("serve", "--data", str(tmp_path / "data"), "--port", "0",
                  "--content-policy", str(policy), check=False, timeout=20)
    err = _usage_error(proc)
    assert err["message"].startswith(f"--content-policy {policy}: "), err
    assert not (tmp_path / "data").exists()


async def test_a_send_rate_below_one_a_second_lets_one_send_through_each_period(tmp_path):
    """--send-rate and --user-send-rate take rates from 0.001 a second; the bucket's burst was
    the rate itself, so below 1 it never held a whole token and every send was refused, for
    good. Now the burst is one send at least: one goes, the next waits its period."""
    for limit in ("sends_per_s_per_connection", "sends_per_s_per_user"):
        async with running_broker(tmp_path / limit, **{limit: 0.5}) as h:
            async with h.client("alice") as alice:
                first = await alice.send("one", to="bob")
                assert first.seq == 1
                with pytest.raises(ClientError) as refused:
                    await alice.send("two", to="bob")
                assert refused.value.name == "rate_limited"


async def test_a_typing_rate_below_one_a_second_lets_a_notice_through(tmp_path):
    async with running_broker(tmp_path / "data", typing_per_s_per_user=0.5) as h:
        async with h.client("alice") as alice, h.client("bob") as bob:
            sent = await alice.send("hi", to="bob")
            await alice.typing(sent.conv)
            with trio.fail_after(5):
                while not isinstance(notice := await bob.next_push(), wire.TypingNotice):
                    pass
            assert notice.user == "alice" and notice.conv == sent.conv


def test_the_rows_of_a_rebuild_are_written_within_an_extended_start_timeout(tmp_path):
    """After the replay the rebuild still sorts and writes every row and commits them (0.28 s
    after a 0.34 s replay of 300,000 events here): it was covered only by what was left of the
    last 30 s extension, asked up to 5 s before the replay ended, so a log large enough (about
    20 million events with the unit's TimeoutStartSec=90) was killed before READY, and
    restarted into the same rebuild for good. The end of the replay asks for time to write."""
    import os
    import time
    from pathlib import Path

    from tests.broker.test_sdnotify import Listener, broker_env
    from tests.storage.test_layout import older_layout

    sock_dir = Path(f"/tmp/homing-notify-{os.getpid()}-{time.monotonic_ns()}")
    sock_dir.mkdir()
    listener = Listener(sock_dir / "notify")
    bp = BrokerProcess(tmp_path / "data", env=broker_env(listener, None))
    try:
        last = older_layout(bp.data, 20_000)
        bp.spawn()
        listener.wait_for(lambda f: "READY" in f)
        fields = [f for _, f in listener.got]
        before_ready = fields[:fields.index(next(f for f in fields if "READY" in f))]
        extended = [f for f in before_ready if "EXTEND_TIMEOUT_USEC" in f]
        assert extended, fields
        assert extended[-1]["STATUS"] == f"rebuilding projections: writing the rows of " \
                                         f"{last:,} events", extended
        assert int(extended[-1]["EXTEND_TIMEOUT_USEC"]) >= 30_000_000
    finally:
        bp.kill()
        listener.close()
        (sock_dir / "notify").unlink()
        sock_dir.rmdir()
    done = [e for e in bp.log_events() if e["event"] == "projections_rebuild_progress"]
    assert done[-1]["events"] == done[-1]["of"] == last


def _future_event(data) -> int:
    """Append to the log of `data` a well-chained record of an event type this homing does not
    know (one a newer homing wrote, say); return its LSN."""
    import lmdb

    from storage.log import seal
    from storage.records import lsn_key

    with lmdb.open(str(data), max_dbs=32) as env:
        log = env.open_db(b"log")
        with env.begin(write=True) as txn:
            last, record = txn.cursor(db=log).last() and txn.cursor(db=log).item()
            lsn = int.from_bytes(last, "big")
            ((lsn, value, _),), _ = seal([(1, "future.event", "mallory", "d", {})], lsn + 1,
                                         record[:32])
            txn.put(lsn_key(lsn), value, db=log)
    return lsn


def test_serve_on_a_data_directory_it_cannot_read_is_a_data_dir_error_not_a_traceback(
        tmp_path):
    """A data.mdb that is no LMDB file, or a log this homing cannot replay (an event of a newer
    homing, met by the rebuild of an older layout): the start cannot succeed as configured, so
    it is one `data_dir` error and exit 2 (RestartPreventExitStatus=2). Both were a traceback
    and exit 1, which systemd's Restart=on-failure repeated."""
    from tests.storage.test_layout import older_layout

    garbage = tmp_path / "garbage"
    garbage.mkdir(mode=0o700)
    (garbage / "data.mdb").write_bytes(bytes(range(256)) * 400)
    proc = homing("serve", "--data", str(garbage), "--port", "0", check=False, timeout=20)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "data_dir" and err["message"].startswith(f"cannot use {garbage}: ")

    newer = tmp_path / "newer"
    older_layout(newer, 10)
    lsn = _future_event(newer)
    proc = homing("serve", "--data", str(newer), "--port", "0", check=False, timeout=20)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "data_dir", err
    assert f"log corrupt at lsn {lsn}: unknown event type 'future.event'" in err["message"]


def test_a_frame_rejected_before_hello_is_logged_with_its_fatal_field(tmp_path):
    """`frame_rejected` carries `fatal` (docs/OPERATIONS.md, "Logs"); the one logged for a bad
    frame in place of hello left it out, so a query on `fatal` missed every such line."""
    import socket
    import time

    with BrokerProcess(tmp_path / "data") as bp:
        with socket.create_connection(("127.0.0.1", bp.port), timeout=5) as raw:
            raw.sendall(b"\x00\x00\x00\x01\xc0")  # a frame holding nil, not a map
            while raw.recv(65536):
                pass
        deadline = time.monotonic() + 10
        while not (rejected := [e for e in bp.log_events() if e["event"] == "frame_rejected"]):
            assert time.monotonic() < deadline, bp.log_tail()
            time.sleep(0.05)
    (event,) = rejected
    assert event["fatal"] is True and event["code"] == "bad_frame", event
    assert {"conn", "peer", "reason"} <= event.keys(), event


def test_a_tls_client_or_an_http_probe_on_the_plain_port_is_logged_as_what_it_is(tmp_path):
    """A TLS client on the plain port, an HTTP health check: their first bytes read as a
    length prefix, `frame_rejected` said only "frame of 369295616 bytes exceeds max_frame
    65536", and the operator had to work out from the number who had knocked. Now the reason
    says what the bytes look like."""
    import socket
    import time

    knocks = {
        "TLS": bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03]),
        "HTTP": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    }
    with BrokerProcess(tmp_path / "data") as bp:
        for knock in knocks.values():
            with socket.create_connection(("127.0.0.1", bp.port), timeout=5) as raw:
                raw.sendall(knock)
                while raw.recv(65536):
                    pass
        deadline = time.monotonic() + 10
        while len(rejected := [e for e in bp.log_events() if e["event"] == "frame_rejected"]) < 2:
            assert time.monotonic() < deadline, bp.log_tail()
            time.sleep(0.05)
    reasons = [e["reason"] for e in rejected]
    assert [e["code"] for e in rejected] == ["too_large"] * 2, rejected
    assert "exceeds max_frame" in reasons[0] and "look like TLS" in reasons[0], reasons
    assert "exceeds max_frame" in reasons[1] and "look like HTTP" in reasons[1], reasons


def test_a_content_action_without_a_policy_is_a_usage_error(tmp_path):
    """`--content-action mask` without `--content-policy` was accepted and did nothing: an
    operator who meant to mask (or reject) served with no policy at all."""
    proc = homing("serve", "--data", str(tmp_path / "data"), "--port", "0",
                  "--content-action", "mask", check=False, timeout=20)
    err = _usage_error(proc)
    assert err["message"] == "--content-action needs --content-policy", err
    assert not (tmp_path / "data").exists()


async def test_a_content_policy_without_an_action_rejects(tmp_path):
    """`--content-policy` alone (the action's flag now defaults to None, so that it can be
    told apart from an action given without a policy): the documented default, `reject`."""
    words = tmp_path / "words.txt"
    words.write_text("forbidden\n")
    with BrokerProcess(tmp_path / "data", "--content-policy", str(words)) as bp:
        with trio.fail_after(30):
            async with bp.client("alice") as alice:
                with pytest.raises(ClientError) as refused:
                    await alice.send("a forbidden word", to="bob")
                assert refused.value.name == "rejected_content", refused.value
                assert (await alice.send("a fine word", to="bob")).seq == 1


@pytest.mark.parametrize("args, says", [
    # A stop's deadline was now + inf: a connection that never finished held it for ever.
    (["serve", "--shutdown-grace", "inf"], "must be finite and from 0.001 to 3600.0, not inf"),
    (["serve", "--shutdown-grace", "3601"], "must be from 0.001 to 3600.0, not 3601"),
    # Silent connections could hold the --max-handshakes places for good: all others refused.
    (["serve", "--handshake-timeout", "1e400"], "must be finite and from 0.001 to 3600.0"),
    (["serve", "--idle-timeout", "inf"], "must be finite and at least 0.001, not inf"),
    (["serve", "--send-rate", "Infinity"], "must be finite and at least 0.001, not Infinity"),
    (["serve", "--stats-interval", "inf"], "must be finite and at least 0.0, not inf"),
    # nan and negative values were refused already (`not value >= lo`).
    (["serve", "--shutdown-grace", "nan"], "must be finite and from 0.001 to 3600.0, not nan"),
    (["serve", "--shutdown-grace", "-1"], "must be from 0.001 to 3600.0, not -1"),
    (["listen", "--timeout", "inf"], "must be finite and at least 0.001, not inf"),
    (["listen", "--connect-timeout", "inf"], "must be finite and at least 0.001, not inf"),
])
def test_a_time_or_rate_of_inf_is_a_usage_error(tmp_path, args, says):
    """`inf` (any float Python reads as one) passed every time and rate flag."""
    option = args[1]
    where = (["--data", str(tmp_path / "data"), "--port", "0"] if args[0] == "serve"
             else ["--server", "127.0.0.1:1", "--token", "t"])
    proc = homing(args[0], *where, *args[1:], check=False, timeout=20)
    err = _usage_error(proc)
    assert f"argument {option}: {says}" in err["message"], err
    assert not (tmp_path / "data").exists()


def test_the_longest_shutdown_grace_and_handshake_timeout_are_taken():
    from broker.cli import build_parser

    args = build_parser().parse_args(["serve", "--shutdown-grace", "3600",
                                      "--handshake-timeout", "3600"])
    assert args.shutdown_grace == args.handshake_timeout == 3600.0
