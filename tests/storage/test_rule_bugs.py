"""A rule that fails on an exception of its own (a bug of homing's, not of the request) fails
that command alone, as `CommandInternalError` (answered `internal`), logged with the command's
context; the batch's other commands commit.

Found by a review (2026-12-05): `rules.decide` answered a TypeError, ValueError, AttributeError
or UnicodeError out of a rule with `Invalid` ("malformed Ack: ..."), so a client was told its
request was bad when it was not, and could drop it. No request reaches it: the broker checks
every field of a frame before it builds a command (a mutated-frame fuzzer, docs/OPERATIONS.md
"Faults and attacks tried", never saw `internal`), and the rules check every field a request
fills in. So the commands here are ones the rules were not written for, built through the
Store API: an ack whose `convs` (which only the broker fills in) is no list of pairs, and a
create and a mute whose flag has no truth value. Nothing of homing's is replaced.
"""

from __future__ import annotations

import traceback

from structlog.testing import capture_logs

from broker.errors import wire_error
from protocol import ErrorCode
from storage.commands import Ack, CreateConv, SendMessage, SetMute

DM = "dm:alice:bob"


class NoTruth:
    """A flag with no truth value: `bool()` of it raises TypeError."""

    def __bool__(self) -> bool:
        raise TypeError("NoTruth has no truth value")


def test_a_rule_failing_on_its_own_exception_fails_that_command_alone_as_internal(store):
    store.execute([SendMessage("bob", "d", "user", "b1", "hi", to="alice")])
    last = store.last_lsn()
    with capture_logs() as logs:
        outs = store.execute([
            SendMessage("carol", "d", "user", "k1", "one", to="dave"),
            CreateConv("alice", "d1", "user", "group", "g", NoTruth(), (), "mk1"),
            SetMute("alice", "d1", "user", DM, NoTruth()),
            Ack("alice", "d1", "user", 1, 42),
            SendMessage("carol", "d", "user", "k2", "two", to="dave"),
        ])
    bad = outs[1:4]
    assert [type(o.error).__name__ for o in bad] == ["CommandInternalError"] * 3, bad
    for out in bad:
        assert out.reply is None and out.lsn == 0
        assert wire_error(out.error) == (ErrorCode.INTERNAL, "internal error")
        cause = out.error.__cause__
        assert isinstance(cause, TypeError) and cause.__traceback__ is not None
        assert any(f.filename.endswith("rules.py") for f in traceback.extract_tb(
            cause.__traceback__))
    assert [(o.error, o.reply["seq"]) for o in (outs[0], outs[4])] == [(None, 1), (None, 2)]
    assert [e.data.get("cid") for e in store.read_events(last + 1)] == [
        None, None, None, "k1", "k2"]  # the DM's creation, then the two sends: nothing else
    logged = [e for e in logs if e["event"] == "command_internal_error"]
    assert [(e["command"], e["user"], e["device"], e["conv"], e["cid"]) for e in logged] == [
        ("CreateConv", "alice", "d1", None, "mk1"), ("SetMute", "alice", "d1", DM, None),
        ("Ack", "alice", "d1", None, None)], logged
    assert all(e["log_level"] == "error" and isinstance(e["exc_info"], Exception)
               for e in logged)
    assert logged[2]["error"].startswith("TypeError: "), logged[2]
    assert not [e for e in logs if e["event"] != "command_internal_error"], logs
    # The next batch runs as ever; nothing of the failed commands was done.
    assert store.muted("alice", DM) is False and store.delivered("alice", "d1") == 0
    out = store.execute([Ack("alice", "d1", "user", 1, None)])
    assert out[0].error is None and store.delivered("alice", "d1") == 1
