"""`homing` commands whose request is safe to make twice ride through the broker's rates: a
request refused `rate_limited` is made again after the pause the broker says, within
--connect-timeout (docs/CLI.md, "Rate limits"); `leave`, not safe to repeat, fails as before."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time

import pytest
import trio
import trio.testing

from broker import client_cli
from broker.client_errors import ClientError
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, lines

RATE = "0.25"  # one request every 4 s, a burst of one: the second of two at once is refused


def run_together(*commands: tuple[dict, list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the `homing` commands at once (each `(env, args)`), and wait for all of them."""
    procs = [subprocess.Popen([*homing_cmd(), *args], env={**os.environ, **env}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for env, args in commands]
    done = []
    for p, (_, args) in zip(procs, commands, strict=True):
        out, err = p.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


def refusals(bp: BrokerProcess) -> int:
    """The broker's count of requests answered rate_limited (`homing health`)."""
    return lines(homing("health", env=as_user(bp, "ops", "monitor")))[0]["rate_limited"]


def test_reads_sends_and_changes_are_made_again_past_the_rate(tmp_path):
    """Two `homing read`s at once past --read-rate both mark and print as documented, and so
    do two sends past --user-send-rate and two changes past --change-rate (until 2026-12-07
    the one refused exited 1 `rate_limited`; `send --stdin` alone sent again)."""
    with BrokerProcess(tmp_path / "data", "--read-rate", RATE, "--user-send-rate", RATE,
                       "--change-rate", RATE) as bp:
        shop, bob = as_user(bp, "shop", "service"), as_user(bp, "bob")
        conv = lines(homing("send", "--to", "bob", "--cid", "n1", "notice", env=shop))[0]["conv"]
        time.sleep(4.5)  # the user's send bucket full again
        before = refusals(bp)
        started = time.monotonic()
        procs = run_together(
            (bob, ["read", "--conv", conv, "--upto", "1"]),
            (bob, ["read", "--conv", conv, "--upto", "1"]),
            (shop, ["send", "--to", "bob", "--cid", "n2", "second"]),
            (shop, ["send", "--to", "bob", "--cid", "n3", "third"]),
            (bob, ["mute", conv]),
            (bob, ["group", "create", "stores", "--cid", "g1"]))
        assert all(p.returncode == 0 and p.stderr == "" for p in procs), [
            (p.args, p.returncode, p.stderr) for p in procs]
        out = [lines(p) for p in procs]
        assert out[0] == out[1] == [{"conv": conv, "read": 1}], out
        assert sorted(o[0]["seq"] for o in out[2:4]) == [2, 3], out
        assert out[4] == [{"conv": conv, "muted": True}], out
        assert out[5][0]["conv"].startswith("grp:"), out
        assert refusals(bp) - before >= 3  # one of each pair was refused, then made again
        assert time.monotonic() - started < 30

        convs = {c["conv"]: c for c in lines(homing("convs", env=bob))}
        assert (convs[conv]["read"], convs[conv]["muted"]) == (1, True), convs


def test_a_wait_past_connect_timeout_and_a_leave_fail_at_once(tmp_path):
    """A request the broker would let through only past --connect-timeout is not made again:
    the `rate_limited` error at once, saying so; `leave` (a second one is refused `forbidden`)
    is never made again and fails `rate_limited` as before."""
    with BrokerProcess(tmp_path / "data", "--read-rate", RATE, "--change-rate", RATE) as bp:
        shop, bob = as_user(bp, "shop", "service"), as_user(bp, "bob")
        conv = lines(homing("send", "--to", "bob", "notice", env=shop))[0]["conv"]
        grp = lines(homing("group", "create", "stores", "--members", "bob", "--open",
                           env=shop))[0]["conv"]
        homing("read", "--conv", conv, "--upto", "1", env=bob)  # each bucket spent
        homing("join", grp, env=bob)  # (bob is a member: nothing done, but a change counted)

        started = time.monotonic()
        late = homing("read", "--conv", conv, "--upto", "1", "--connect-timeout", "1",
                      env=bob, check=False)
        err = json.loads(late.stderr)
        assert late.returncode == 1 and (err["error"], err["code"]) == ("rate_limited", 9), err
        assert "past --connect-timeout 1" in err["message"], err
        assert time.monotonic() - started < 3.5  # not after a pause of 4 s

        left = homing("leave", grp, env=bob, check=False)
        err = json.loads(left.stderr)
        assert left.returncode == 1 and err["error"] == "rate_limited", err
        assert "connect-timeout" not in err["message"], err


def test_send_stdin_goes_on_while_the_rate_lets_lines_through(tmp_path):
    """--connect-timeout bounds the time with nothing accepted, not each line's wait: 12 lines
    in flight at 2 a second, with --connect-timeout 2, are all sent, the last some 5 s after
    its first refusal."""
    with BrokerProcess(tmp_path / "data", "--user-send-rate", "2") as bp:
        text = "".join(f"line {i}\n" for i in range(1, 13))
        proc = homing("send", "--to", "bob", "--stdin", "--cid-prefix", "s", "--pipeline", "12",
                      "--connect-timeout", "2", input=text, env=as_user(bp, "shop", "service"),
                      check=False)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert sorted(r["seq"] for r in lines(proc)) == list(range(1, 13))


def test_send_stdin_counts_the_bound_from_a_line_not_from_a_quiet_pipe(tmp_path):
    """A line refused after the pipe was quiet for longer than --connect-timeout is sent
    again: the time stdin waited is not time spent refused."""
    with BrokerProcess(tmp_path / "data", "--user-send-rate", "0.4") as bp:  # one per 2.5 s
        send = subprocess.Popen(
            [*homing_cmd(), "send", "--to", "bob", "--stdin", "--cid-prefix", "q",
             "--connect-timeout", "1"], env={**os.environ, **as_user(bp, "shop", "service")},
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        send.stdin.write("first\n")
        send.stdin.flush()
        assert json.loads(send.stdout.readline())["seq"] == 1
        time.sleep(2)  # quiet for longer than --connect-timeout; the next line is refused
        out, err = send.communicate("second\n", timeout=60)  # and allowed some 0.5 s later
        assert send.returncode == 0 and err == "", err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [2]


@pytest.mark.parametrize("past", [False, True])
def test_the_bound_is_exact_a_try_at_connect_timeout_is_made_one_past_it_is_not(monkeypatch,
                                                                               past):
    """The bound at its edge, on trio's mock clock (the broker's `retry_ms` and the spread
    drawn are fixed here, which a real broker's refill does not allow): a next try that would
    come exactly --connect-timeout after the first is made, one a float's step past it is not
    (docs/CLI.md: "more than that after the request's first try"), the error then at once,
    naming the numbers. The request stands for the broker's answers: a refusal the SDK raises
    from a `rate_limited` error with `retry_ms` 800, then the answer."""
    monkeypatch.setattr(client_cli.random, "random", lambda: 0.5)
    said = 0.8
    wait = said * (1 + 0.25 * 0.5)
    args = argparse.Namespace(connect_timeout=math.nextafter(wait, 0) if past else wait)
    tries: list[float] = []

    async def request() -> str:
        tries.append(trio.current_time())
        if len(tries) == 1:
            raise ClientError(9, "rate_limited", "too many membership changes: slow down",
                              retry_after=said)
        return "made"

    async def command() -> str:
        return await client_cli._while_rate_limited(args, request)

    clock = trio.testing.MockClock(autojump_threshold=0)
    if not past:
        assert trio.run(command, clock=clock) == "made"
        assert [t - tries[0] for t in tries] == [0, wait]
        return
    with pytest.raises(ClientError) as caught:
        trio.run(command, clock=clock)
    assert len(tries) == 1 and caught.value.name == "rate_limited", tries
    assert caught.value.retry_after == said
    assert caught.value.message == (
        f"too many membership changes: slow down (not sent again: the next try, in {wait:.3g} "
        f"s, would come after {wait:.3g} s with nothing accepted, past "
        f"--connect-timeout {args.connect_timeout:g})"), caught.value.message
