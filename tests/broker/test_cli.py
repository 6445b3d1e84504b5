"""The `homing` command against a real broker process: the scripted scenario of the issue."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time

import pytest
import trio

import protocol as wire
from storage import audit
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess, check_serves_then_stops, homing, homing_cmd, lines
from tests.stalls import held_commits
from tests.waits import wait_until


@pytest.fixture
def broker(tmp_path):
    with BrokerProcess(tmp_path / "data") as b:
        yield b


def as_user(broker, user: str, *flags: str) -> dict:
    token = homing("token", user, "--data", str(broker.data), *flags).stdout.strip()
    return {"HOMING_SERVER": broker.server, "HOMING_TOKEN": token}


def test_scripted_scenario(broker):
    """Direct chat offline, redelivery, idempotent resend, group, receipts, history, refusals."""
    shop, bob, carol = (as_user(broker, u) for u in ("shop", "bob", "carol"))

    # Direct chat with the recipient offline; a resend with the same cid appends nothing.
    first = lines(homing("send", "--to", "bob", "--cid", "c1", "book is back", env=shop))[0]
    assert first["conv"] == "dm:bob:shop" and first["seq"] == 1 and first["cid"] == "c1"
    again = lines(homing("send", "--to", "bob", "--cid", "c1", "book is back", env=shop))[0]
    assert (again["seq"], again["lsn"], again["dup"]) == (1, first["lsn"], True)
    homing("send", "--to", "bob", "--cid", "c2", "second", env=shop)

    # Unacked deliveries come again, with the same inbox_seq; acked ones do not.
    seen = lines(homing("listen", "--count", "2", "--no-ack", "--timeout", "5", env=bob))
    assert [d["body"] for d in seen] == ["book is back", "second"]
    assert set(seen[0]) >= {"inbox_seq", "conv", "seq", "from", "body", "cid", "ts"}
    redelivered = lines(homing("listen", "--count", "2", "--timeout", "5", env=bob))
    assert [d["inbox_seq"] for d in redelivered] == [d["inbox_seq"] for d in seen]
    assert lines(homing("listen", "--timeout", "0.5", env=bob)) == []

    # A group; receipts after bob acks and reads; history oldest first.
    conv = lines(homing("group", "create", "order-1138", "--members", "bob,carol",
                        "--cid", "order-1138", env=shop))[0]["conv"]
    assert conv.startswith("grp:")
    # Run again with its --cid, the create makes nothing new: the same group.
    assert lines(homing("group", "create", "order-1138", "--members", "bob,carol",
                        "--cid", "order-1138", env=shop)) == [{"conv": conv}]
    sent = lines(homing("send", "--conv", conv, "on its way", env=shop))[0]
    got = lines(homing("listen", "--count", "2", "--timeout", "5", env=bob))
    assert [d.get("kind", "msg") for d in got] == ["added", "msg"]
    homing("read", "--conv", conv, "--upto", str(sent["seq"]), env=bob)
    receipts = lines(homing("receipts", "--conv", conv, "--seq", str(sent["seq"]), env=shop))[0]
    assert receipts == {"conv": conv, "seq": sent["seq"], "delivered": ["bob"], "read": ["bob"],
                        "unread": ["carol"]}
    homing("send", "--conv", conv, "thanks", env=carol)
    history = lines(homing("history", "--conv", conv, env=bob))
    assert [(m["seq"], m["from"], m["body"]) for m in history] == [
        (1, "shop", "on its way"), (2, "carol", "thanks")]

    # Refusals: a stranger reading history, a forged token.
    mallory = as_user(broker, "mallory")
    refused = homing("history", "--conv", conv, env=mallory, check=False)
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "forbidden"
    forged = {**shop, "HOMING_TOKEN": shop["HOMING_TOKEN"][:-3] + "xyz"}
    refused = homing("send", "--to", "bob", "hi", env=forged, check=False)
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "unauthorized"


def test_a_script_acks_what_it_handled_and_pages_history_forward(broker):
    """`listen --no-ack` then `ack --upto` once handled: nothing comes again. `history --after`
    pages forward. A cid reused for another conversation is `conflict`, not a `dup` of the
    other message. `listen --count 0` is a usage error."""
    shop, bob = as_user(broker, "shop"), as_user(broker, "bob")
    for i in range(5):
        homing("send", "--to", "bob", "--cid", f"n{i}", f"note {i}", env=shop)
    seen = lines(homing("listen", "--count", "3", "--no-ack", "--timeout", "5", env=bob))
    assert lines(homing("ack", "--upto", str(seen[-1]["inbox_seq"]), env=bob)) == [
        {"acked": seen[-1]["inbox_seq"]}]
    rest = lines(homing("listen", "--timeout", "1", env=bob))
    assert [d["body"] for d in rest] == ["note 3", "note 4"]
    conv = seen[0]["conv"]
    forward = lines(homing("history", "--conv", conv, "--after", "1", "--limit", "2", env=bob))
    assert [m["seq"] for m in forward] == [2, 3]
    assert lines(homing("history", "--conv", conv, "--after", "5", env=bob)) == []
    reused = homing("send", "--to", "carol", "--cid", "n0", "for carol", env=shop, check=False)
    assert reused.returncode == 1 and json.loads(reused.stderr)["error"] == "conflict"
    assert lines(homing("members", conv, env=bob)) == [
        {"conv": conv, "kind": "direct", "name": None, "owners": [], "admins": [],
         "members": ["bob", "shop"]}]
    bad = homing("listen", "--count", "0", env=bob, check=False)
    assert bad.returncode == 2 and json.loads(bad.stderr)["error"] == "usage"


def test_convs_lists_the_users_conversations_with_unread_counts(broker):
    """`homing convs` prints one line per conversation, with its unread count (last seq minus
    read mark: one's own posts count as read); `--unread` only those with unread messages."""
    shop, bob = as_user(broker, "shop"), as_user(broker, "bob")
    for i in range(3):
        homing("send", "--to", "bob", f"note {i}", env=shop)
    group = lines(homing("group", "create", "order-9", "--members", "bob", env=shop))[0]["conv"]
    assert lines(homing("convs", env=bob)) == [
        {"conv": "dm:bob:shop", "kind": "direct", "name": None, "role": "member",
         "last_seq": 3, "read": 0, "unread": 3, "muted": False},
        {"conv": group, "kind": "group", "name": "order-9", "role": "member",
         "last_seq": 0, "read": 0, "unread": 0, "muted": False}]
    assert [c["conv"] for c in lines(homing("convs", "--unread", env=bob))] == ["dm:bob:shop"]
    homing("read", "--conv", "dm:bob:shop", "--upto", "3", env=bob)
    assert lines(homing("convs", "--unread", env=bob)) == []
    assert [(c["role"], c["unread"]) for c in lines(homing("convs", env=shop))] == [
        ("member", 0), ("owner", 0)]


def test_an_owner_hands_a_group_over_before_leaving(broker):
    """`homing role` makes a member an admin, who can then keep the group going: the owner may
    leave, which was a conflict while nobody else could invite. A plain member may not change
    roles, and the last admin may not step down."""
    shop, bob = as_user(broker, "shop"), as_user(broker, "bob")
    conv = lines(homing("group", "create", "order-7", "--members", "bob,carol",
                        env=shop))[0]["conv"]
    refused = homing("leave", conv, env=shop, check=False)
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "conflict"
    assert lines(homing("role", conv, "bob", "admin", env=shop)) == [
        {"conv": conv, "user": "bob", "role": "admin", "ok": True}]
    assert lines(homing("leave", conv, env=shop)) == [{"conv": conv, "ok": True}]
    homing("invite", conv, "dave", env=bob)
    assert lines(homing("members", conv, env=bob)) == [
        {"conv": conv, "kind": "group", "name": "order-7", "owners": [], "admins": ["bob"],
         "members": ["carol", "dave"]}]
    refused = homing("role", conv, "bob", "member", env=bob, check=False)  # the last manager
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "conflict"
    carol = as_user(broker, "carol")
    denied = homing("role", conv, "dave", "admin", env=carol, check=False)
    assert denied.returncode == 1 and json.loads(denied.stderr)["error"] == "forbidden"
    bad = homing("role", conv, "carol", "owner", env=bob, check=False)
    assert bad.returncode == 2 and json.loads(bad.stderr)["error"] == "usage"


def test_a_shop_removes_the_courier_from_an_order_group(broker):
    """`homing remove` takes a member out: it is gone from `members`, and its `listen` shows a
    `removed` delivery from the shop. A plain member may not remove; an owner is not removed."""
    shop, courier = as_user(broker, "shop"), as_user(broker, "courier")
    conv = lines(homing("group", "create", "order-8", "--members", "courier,carol",
                        env=shop))[0]["conv"]
    denied = homing("remove", conv, "carol", env=courier, check=False)
    assert denied.returncode == 1 and json.loads(denied.stderr)["error"] == "forbidden"
    assert lines(homing("remove", conv, "courier", env=shop)) == [
        {"conv": conv, "user": "courier", "ok": True}]
    assert lines(homing("members", conv, env=shop))[0]["members"] == ["carol"]
    told = lines(homing("listen", "--count", "2", env=courier))
    assert [(d["kind"], d["conv"], d["from"]) for d in told] == [
        ("added", conv, "shop"), ("removed", conv, "shop")]
    homing("role", conv, "carol", "admin", env=shop)
    refused = homing("remove", conv, "shop", env=as_user(broker, "carol"), check=False)
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "conflict"


def test_resume_across_a_broker_sigkill(broker):
    """After SIGKILL and restart, acked messages stay acked and unacked ones come again."""
    shop, bob = as_user(broker, "shop"), as_user(broker, "bob")
    homing("send", "--to", "bob", "--stdin", "--cid-prefix", "k", input="a\nb\nc\nd\n", env=shop)
    assert [d["body"] for d in lines(homing("listen", "--count", "2", env=bob))] == ["a", "b"]
    broker.kill()
    broker.start()
    rest = lines(homing("listen", "--count", "2", "--timeout", "5", env=bob))
    assert [d["body"] for d in rest] == ["c", "d"]
    assert lines(homing("listen", "--timeout", "0.5", env=bob)) == []


def test_stdin_without_a_prefix_takes_a_time_ordered_one(broker):
    """`send --stdin` without `--cid-prefix` makes its cids from a fresh SDK cid, so they sort
    with the SDK's time-ordered ones (docs/CLI.md)."""
    shop = as_user(broker, "shop")
    before = time.time_ns()
    sent = lines(homing("send", "--to", "bob", "--stdin", input="a\nb\n", env=shop))
    prefixes = {r["cid"].rsplit("-", 1)[0] for r in sent}
    assert sorted(r["cid"].rsplit("-", 1)[1] for r in sent) == ["1", "2"]
    (prefix,) = prefixes
    assert re.fullmatch(r"[0-9a-f]{32}", prefix), prefix
    assert before <= int(prefix[:16], 16) <= time.time_ns()


def test_sigterm_shuts_down_cleanly(broker):
    """SIGTERM stops the broker with exit status 0 and what it accepted is there after restart."""
    shop, bob = as_user(broker, "shop"), as_user(broker, "bob")
    homing("send", "--to", "bob", "kept", env=shop)
    assert broker.terminate() == 0
    broker.start()
    assert [d["body"] for d in lines(homing("listen", "--count", "1", env=bob))] == ["kept"]


@pytest.mark.parametrize("option, value, says", [
    ("--idle-timeout", "0", "at least 0.001"),
    ("--heartbeat", "0.5", "not a whole number: '0.5'"),  # was "not a number: '0.5'"
    ("--handshake-timeout", "-1", "from 0.001 to 3600.0"),
    ("--window", "0", "at least 1"),
    ("--send-rate", "nan", "at least 0.001"),
    ("--port", "65536", "from 0 to 65535"),
    ("--max-frame-bytes", "1023", "from 1024 to"),
    ("--max-connections", "ten", "not a whole number"),
    ("--shutdown-grace", "ten", "not a number"),
    ("--max-batch", "0", "at least 1"),
])
def test_serve_refuses_an_out_of_range_number_before_starting(tmp_path, option, value, says):
    proc = homing("serve", "--data", str(tmp_path / "data"), option, value, check=False,
                  timeout=20)
    assert proc.returncode == 2 and f"argument {option}: " in proc.stderr, proc.stderr
    assert says in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_serve_refuses_a_frame_limit_below_the_largest_delivery_of_its_body_limit(tmp_path):
    """A send that fits --max-body-bytes must make a deliver frame that fits --max-frame-bytes,
    or it would be accepted and never delivered; the error names both ways out."""
    import protocol as wire
    from broker.config import Config

    need = wire.largest_deliver_frame(2000)
    widest = wire.Deliver(inbox_seq=wire.UINT_MAX, kind="msg", conv="grp:" + "c" * 156,
                          seq=wire.UINT_MAX, sender="u" * 64, body="\u00e9" * 1000,
                          cid="\U0001F600" * 128, ts=wire.UINT_MAX, muted=True)
    assert len(wire.encode_frame(wire.to_wire(widest))) - 4 <= need  # a true bound
    Config(max_body_bytes=2000, max_frame_bytes=need)
    proc = homing("serve", "--data", str(tmp_path / "data"), "--max-body-bytes", "2000",
                  "--max-frame-bytes", str(need - 1), check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "usage" and f"at least {need}" in err["message"]
    assert "--max-body-bytes to at most 1999" in err["message"]
    assert not (tmp_path / "data").exists()


def test_serve_refuses_an_idle_timeout_shorter_than_the_heartbeat(tmp_path):
    """Clients ping every heartbeat, as welcome tells them: a shorter idle timeout would cut
    them off, so serve refuses it before creating anything."""
    proc = homing("serve", "--data", str(tmp_path / "data"), "--heartbeat", "3",
                  "--idle-timeout", "1", check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert err["error"] == "usage" and "shorter than --heartbeat 3" in err["message"]
    assert not (tmp_path / "data").exists()


def test_the_idle_timeout_follows_the_heartbeat_unless_set():
    """Without --idle-timeout it is three heartbeats, as PROTOCOL.md §8 says: `--heartbeat 60`
    alone was refused, since the idle timeout stayed 45 s."""
    from broker.cli import build_parser
    from broker.serve_cli import _serve_config

    def config(*args):
        return _serve_config(build_parser().parse_args(["serve", *args]))

    assert config().idle_timeout_s == 45.0
    assert config("--heartbeat", "60").idle_timeout_s == 180.0
    assert config("--heartbeat", "60", "--idle-timeout", "61").idle_timeout_s == 61.0
    # A copy with another heartbeat: the default follows it, a chosen timeout stays.
    assert config().replace(heartbeat_s=60).idle_timeout_s == 180.0
    assert config("--idle-timeout", "50").replace(heartbeat_s=20).idle_timeout_s == 50.0


def test_every_setting_of_serve_is_a_flag():
    """Every limit is a flag of `homing serve` (OPERATIONS.md, "Limits"): each Config field
    set through its flag comes out changed. `--max-inflight-requests` and `--shutdown-grace`
    were fixed (1024 requests, 10 s) until 2026-12-05. The map size is no limit: the map
    doubles by itself when full."""
    import dataclasses

    from broker.cli import build_parser
    from broker.config import Config
    from broker.serve_cli import _serve_config

    flags = {"data_dir": ["--data", "elsewhere"], "host": ["--host", "::1"],
             "port": ["--port", "7000"], "tls_cert": ["--tls-cert", "c.pem", "--tls-key", "k"],
             "tls_key": ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
             "content_policy": ["--content-policy", "words.txt"],
             "content_action": ["--content-action", "mask"],
             "max_frame_bytes": ["--max-frame-bytes", "2000000"],
             "max_body_bytes": ["--max-body-bytes", "1000"],
             "max_frame_values": ["--max-frame-values", "5000"],
             "handshake_timeout_s": ["--handshake-timeout", "3"],
             "heartbeat_s": ["--heartbeat", "5"], "idle_timeout_s": ["--idle-timeout", "20"],
             "shutdown_grace_s": ["--shutdown-grace", "2.5"], "window": ["--window", "16"],
             "max_pending_pushes": ["--max-pending-pushes", "99"],
             "max_inflight_requests": ["--max-inflight-requests", "8"],
             "catch_up_per_turn": ["--catch-up-per-turn", "4"],
             "auth_fail_rate": ["--auth-fail-rate", "0.5"],
             "auth_fail_addresses": ["--auth-fail-addresses", "99"],
             "sends_per_s_per_connection": ["--send-rate", "7"],
             "sends_per_s_per_user": ["--user-send-rate", "7"],
             "typing_per_s_per_user": ["--typing-rate", "7"],
             "changes_per_s_per_user": ["--change-rate", "7"],
             "reads_per_s_per_user": ["--read-rate", "7"],
             "max_connections": ["--max-connections", "7"],
             "max_handshakes": ["--max-handshakes", "7"],
             "max_connections_per_user": ["--max-connections-per-user", "7"],
             "max_members": ["--max-members", "7"],
             "receipt_audience_max": ["--receipt-audience-max", "7"],
             "max_batch": ["--max-batch", "7"], "max_batch_rows": ["--max-batch-rows", "7"],
             "record_cache": ["--record-cache", "0"],
             "roster_cache_members": ["--roster-cache-members", "7"],
             "table_cache_rows": ["--table-cache-rows", "0"],
             "gc_young_threshold": ["--gc-young-threshold", "7"],
             "stats_interval_s": ["--stats-interval", "7"]}
    not_flags = {"map_size_bytes"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == set(flags) | not_flags, fields ^ (set(flags) | not_flags)
    default = Config()
    for field, args in flags.items():
        config = _serve_config(build_parser().parse_args(["serve", *args]))
        assert getattr(config, field) != getattr(default, field), field
    config = _serve_config(build_parser().parse_args(
        ["serve", "--max-inflight-requests", "8", "--shutdown-grace", "2.5"]))
    assert (config.max_inflight_requests, config.shutdown_grace_s) == (8, 2.5)


def test_a_config_built_in_code_checks_the_frame_value_limit():
    """The CLI holds --max-frame-values to 2,048 .. 2**32 - 1; a Config made in code (tests,
    an embedding) is held to it too, since the compiled counter takes no other limits."""
    from broker.config import Config

    assert Config(max_frame_values=2048).max_frame_values == 2048
    for bad in (0, 2047, 1 << 64):
        with pytest.raises(ValueError, match="--max-frame-values"):
            Config(max_frame_values=bad)


def test_a_config_built_in_code_refuses_what_its_flags_refuse():
    """A Config made in code (an embedding, a test) is held to the ranges of the flags that set
    it: an infinite or NaN time or rate, a zero count, a wait past an hour, an unknown content
    action are refused with the flag's name, as `homing serve` refuses them (a broker that
    would never time out a handshake, or never end a stop). The CLI's own checks agree."""
    from broker.cli import CliError, build_parser
    from broker.config import Config

    bad = {"handshake_timeout_s": ("--handshake-timeout", [math.inf, 0.0, 3601.0, math.nan]),
           "shutdown_grace_s": ("--shutdown-grace", [math.inf, -1.0]),
           "idle_timeout_s": ("--idle-timeout", [math.inf, math.nan]),
           "sends_per_s_per_connection": ("--send-rate", [math.inf, 0.0, math.nan]),
           "sends_per_s_per_user": ("--user-send-rate", [math.inf]),
           "typing_per_s_per_user": ("--typing-rate", [-math.inf]),
           "changes_per_s_per_user": ("--change-rate", [0.0]),
           "reads_per_s_per_user": ("--read-rate", [math.inf, 0.0]),
           "window": ("--window", [0]),
           "max_pending_pushes": ("--max-pending-pushes", [0]),
           "max_inflight_requests": ("--max-inflight-requests", [0]),
           "max_connections": ("--max-connections", [0]),
           "max_handshakes": ("--max-handshakes", [0]),
           "max_connections_per_user": ("--max-connections-per-user", [0]),
           # No upper bound until 2026-12-06: a group past 100,000 could not be listed.
           "max_members": ("--max-members", [0, 100_001]),
           "receipt_audience_max": ("--receipt-audience-max", [0]),
           "max_batch": ("--max-batch", [0]),
           "max_batch_rows": ("--max-batch-rows", [0, -1]),
           "max_body_bytes": ("--max-body-bytes", [0]),
           "roster_cache_members": ("--roster-cache-members", [-1, math.inf]),
           "table_cache_rows": ("--table-cache-rows", [-1, math.inf]),
           # Not checked in code until 2026-12-05 (the flags were): a broker of port 70000
           # failed at its bind, one of frames under 1,024 bytes refused every hello.
           "port": ("--port", [70000, -1]),
           "max_frame_bytes": ("--max-frame-bytes", [900, (1 << 32)]),
           "gc_young_threshold": ("--gc-young-threshold", [0, 1 << 31]),
           "stats_interval_s": ("--stats-interval", [math.inf, 0.5, -1.0]),
           "content_action": ("--content-action", ["drop"])}
    for field, (flag, values) in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=re.escape(flag)):
                Config(**{field: value})
            if isinstance(value, str):
                continue
            text = "inf" if value == math.inf else "-inf" if value == -math.inf else str(value)
            with pytest.raises(CliError):  # the flag refuses it too
                build_parser().parse_args(["serve", flag, text])
    edges = Config(handshake_timeout_s=3600.0, shutdown_grace_s=0.001, stats_interval_s=0.0,
                   sends_per_s_per_connection=0.001, window=1, gc_young_threshold=(1 << 31) - 1,
                   content_action="mask")
    assert (edges.handshake_timeout_s, edges.window) == (3600.0, 1)


def test_a_secret_cut_short_is_refused_and_a_failed_creation_leaves_none(tmp_path):
    """An empty or short secret.key (a full disk while it was made) would let anyone sign
    tokens: serve and token refuse it. Making one that fails half-way leaves no file, so the
    next try makes a whole one."""
    import resource

    short = tmp_path / "short"
    short.mkdir()
    (short / "secret.key").write_bytes(b"")
    for args in (("serve", "--data", str(short), "--port", "0"),
                 ("token", "alice", "--data", str(short))):
        proc = homing(*args, check=False, timeout=20)
        assert proc.returncode == 2, proc.stderr
        assert json.loads(proc.stderr.strip().splitlines()[-1])["error"] == "bad_secret"

    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        [*homing_cmd(), "token", "alice", "--data", str(fresh)], capture_output=True,
        text=True, timeout=20, env=os.environ,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert proc.returncode == 2 and json.loads(proc.stderr)["error"] == "data_dir", proc.stderr
    assert not (fresh / "secret.key").exists() and list(fresh.iterdir()) == []
    token = homing("token", "alice", "--data", str(fresh)).stdout.strip()
    assert len((fresh / "secret.key").read_bytes()) == 32 and token.startswith("v1.")


def test_a_token_signed_with_a_new_secret_is_flagged_and_refused_with_a_hint(broker, tmp_path):
    """`homing token` run where no secret is yet (another directory than the broker's, as from
    another terminal) makes one and says so on stderr; the broker then refuses the token, and
    says how tokens are to be minted. A token from the broker's own secret is not flagged."""
    elsewhere = tmp_path / "elsewhere"
    first = homing("token", "alice", "--data", str(elsewhere))
    warning = json.loads(first.stderr)
    assert warning["warning"] == "secret_created"
    assert str(elsewhere / "secret.key") in warning["message"]
    assert homing("token", "alice", "--data", str(elsewhere)).stderr == ""
    assert homing("token", "alice", "--data", str(broker.data)).stderr == ""

    env = {"HOMING_SERVER": broker.server, "HOMING_TOKEN": first.stdout.strip()}
    proc = homing("convs", env=env, check=False)
    error = json.loads(proc.stderr)
    assert proc.returncode == 1 and error["error"] == "unauthorized", proc.stderr
    assert "not signed with this broker's secret" in error["message"]
    assert "homing token --data" in error["message"]


def test_serve_says_why_it_cannot_start_as_a_json_error(tmp_path):
    """A port in use, a TLS pair that does not load, a data directory that cannot be made:
    one JSON error on stderr and exit 2, not a traceback; nothing created for a port in use or
    a bad TLS pair."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        proc = homing("serve", "--data", str(tmp_path / "a"), "--port", str(port), check=False,
                      timeout=20)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {
        "error": "listen", "code": 0,
        "message": f"cannot listen on 127.0.0.1:{port}: Address already in use"}
    assert not (tmp_path / "a").exists()  # bound first: nothing made (it made DIR and secret)
    # A --host that does not resolve: the same error (it was a traceback, after making DIR).
    proc = homing("serve", "--data", str(tmp_path / "a"), "--host", "no-such-host.invalid",
                  check=False, timeout=30)
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 2 and err["error"] == "listen", proc.stderr
    assert err["message"].startswith("cannot listen on no-such-host.invalid:7717: ")
    assert not (tmp_path / "a").exists()

    proc = homing("serve", "--data", str(tmp_path / "b"), "--tls-cert", str(tmp_path / "no.pem"),
                  "--tls-key", str(tmp_path / "no.key"), check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1])["error"] == "usage"
    assert not (tmp_path / "b").exists()
    (tmp_path / "cert.pem").write_text("a certificate")
    proc = homing("serve", "--data", str(tmp_path / "b"), "--tls-cert", str(tmp_path / "cert.pem"),
                  "--tls-key", str(tmp_path / "no.key"), check=False, timeout=20)
    err = json.loads(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 2 and err["error"] == "usage", proc.stderr
    assert err["message"].startswith(f"--tls-key {tmp_path / 'no.key'}: No such file")  # which
    for interval, says in (("0.5", "must be 0 (none) or at least 1, not 0.5"),
                           ("-1", "must be at least 0.0, not -1")):
        proc = homing("serve", "--data", str(tmp_path / "b"), "--stats-interval", interval,
                      check=False, timeout=20)
        assert proc.returncode == 2 and says in json.loads(proc.stderr)["message"], proc.stderr
    assert not (tmp_path / "b").exists()

    (tmp_path / "file").write_text("not a directory")
    # (port 0: the default 7717 may be a broker of the machine's, the Quick start's, in use)
    proc = homing("serve", "--data", str(tmp_path / "file" / "data"), "--port", "0",
                  check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1])["error"] == "data_dir"


async def test_a_second_signal_during_shutdown_does_not_cut_it_short(tmp_path):
    """SIGTERM, then SIGTERM again while the stop waits for a send's commit (held by a write
    transaction of this test, as a stalled disk would hold it): the second is logged, and
    once the commit goes through the broker still stops cleanly (exit 0), the send durable.
    The stop was held by a silent connection's 1 s linger before: a pause of the test longer
    than that let the stop end before the second signal, on a loaded machine."""
    import signal

    bp = BrokerProcess(tmp_path / "data")
    await bp.astart()
    try:
        def events() -> list[str]:
            return [e.get("event") for e in bp.log_events()]

        with trio.fail_after(60):
            c = await RawClient.connect(bp.server, bp.token("shop"), "d1")
            async with held_commits(bp.data):
                await c.send(wire.Send(id=1, cid="order-9 ready", body="ready", to="bob"))
                await c.send(wire.Ping(id=2))  # answered at once, after the send was taken
                assert isinstance(await c.reply(2), wire.Pong)
                bp.proc.send_signal(signal.SIGTERM)
                await wait_until(lambda: "broker_stopping" in events())
                bp.proc.send_signal(signal.SIGTERM)
                await wait_until(lambda: "signal_during_shutdown" in events() or not bp.alive())
                # The commit is ours, so the stop cannot have ended: the second signal came
                # during it, and did not end the process.
                assert bp.alive(), bp.log_tail()
                assert "broker_stopped" not in events(), bp.log_tail()
            # No third signal (`aterminate` sends one): the stop ends once the commit does.
            assert await trio.to_thread.run_sync(bp.proc.wait, 30) == 0, bp.log_tail()
            await c.aclose()
        names = events()
        assert "signal_during_shutdown" in names and "broker_stopped" in names
        store = bp.open_store(readonly=True)
        try:
            assert [e.data["cid"] for e in audit.iter_events(store)
                    if e.type == "message.accepted"] == ["order-9 ready"]
        finally:
            store.close()
    finally:
        bp.kill()


def test_library_log_records_and_a_low_file_limit_come_out_as_json_events(tmp_path):
    """The standard library's records (trio logs `accept returned EMFILE` there) are rendered
    as our JSON events, one a line; and serve warns at start when the open-file limit stays
    below what --max-connections needs."""
    import resource
    import sys

    script = ("import logging, sys\n"
              "from broker.logs import configure\n"
              "configure('info', 'json', stream=sys.stdout)\n"
              "try:\n"
              "    raise OSError(24, 'Too many open files')\n"
              "except OSError:\n"
              "    logging.getLogger('trio').error('accept returned EMFILE', exc_info=True)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=20, check=True)  # its own process: logging setup is global
    (line,) = run.stdout.splitlines()
    event = json.loads(line)
    assert (event["event"], event["logger"], event["level"]) == (
        "accept returned EMFILE", "trio", "error") and "Too many open files" in event["exception"]

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    serve = subprocess.Popen(
        [*homing_cmd(), "serve", "--data", str(tmp_path / "data"), "--port", "0",
         "--max-connections", "100", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, preexec_fn=low_limit)
    try:
        first = json.loads(serve.stderr.readline())
        assert first["event"] == "open_file_limit_low" and first["limit"] == 64, first
        assert first["wanted"] == 100 + 1000 + 64
    finally:
        serve.kill()
        serve.wait()


def test_serve_warns_when_the_secret_key_is_readable_by_others(tmp_path):
    """A secret.key that other users may read (a copy or a restore loosened it) lets them sign
    any token: serve says so, with the fix, and goes on."""
    data = tmp_path / "data"
    subprocess.run([*homing_cmd(), "token", "someone", "--data", str(data)], check=True,
                   capture_output=True, timeout=30)
    (data / "secret.key").chmod(0o644)
    serve = subprocess.Popen(
        [*homing_cmd(), "serve", "--data", str(data), "--port", "0", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True)
    try:
        events = []
        while not events or events[-1]["event"] != "broker_listening":
            events.append(json.loads(serve.stderr.readline()))
        (warning,) = [e for e in events if e["event"] == "secret_key_exposed"]
        assert warning["mode"] == "0644" and "chmod 600" in warning["hint"], warning
    finally:
        serve.kill()
        serve.wait()


def test_a_log_that_cannot_be_written_does_not_stop_the_broker(tmp_path):
    """With stderr on /dev/full (a log file on a full disk) every log line fails: the broker
    loses the lines and goes on serving, and stops cleanly. It exited with status 1 within two
    seconds of starting, or at the first send that logged."""
    from tests.procs import free_port

    data, port = tmp_path / "data", free_port()
    with open("/dev/full", "w") as full:
        serve = subprocess.Popen(
            [*homing_cmd(), "serve", "--data", str(data), "--port", str(port),
             "--log-level", "debug", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=full)
    check_serves_then_stops(serve, data, port)
