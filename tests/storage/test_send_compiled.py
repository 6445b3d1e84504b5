"""The compiled send (storage/_fold.c, `send_message`) against the Python rules.

`Store.execute` hands each SendMessage to the compiled common case first; whatever it does not
take (an error, a retried cid, a conversation to create, an odd type) goes through `decide`.
Two stores run the same batches, one with the compiled send and one without: their outcomes,
log records and projections must be equal byte for byte. Skipped where the extension is not
built.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from contextlib import contextmanager
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import storage.rules as rules_module
import storage.store as store_module
from broker.committer import _last_lsn
from storage.commands import CreateConv, SendMessage
from storage.rules import Limits
from storage.store import Store

from .test_model import USERS, command_spec, make_command

pytestmark = pytest.mark.skipif(store_module.SEND_MESSAGE is None,
                                reason="storage._fold is not built")

MAX_BODY = 256
NOW = 1_795_000_000_000_000


class Sub(str):
    """A str subclass: the rules take it, the compiled send leaves it to them."""


ids = st.sampled_from([*USERS, "", "bad id", "x" * 64, "y" * 65, "-lead", "a.b@c+d-e_f", "é",
                       5, None, Sub("ann")])
roles = st.sampled_from(["user", "user", "service", "admin", "bogus", None, Sub("user")])
cids = st.sampled_from(["c0", "c1", "c2", "c3", "", "nul\0", "y" * 128, "z" * 129, "ünï", 7,
                        Sub("c4"), "\ud800", "é" * 128, "\U0001F600" * 100,
                        "\U0001F600" * 101, "\U0001F600" * 128])
bodies = st.sampled_from(["hi", b"\x00bin", "x" * MAX_BODY, "x" * (MAX_BODY + 1),
                          "é" * (MAX_BODY // 2), "é" * (MAX_BODY // 2 + 1), b"b" * (MAX_BODY + 1),
                          "\ud800", 5, None, Sub("sub"), "x" * 40_000])
conv_refs = st.one_of(st.integers(0, 7), st.sampled_from(
    ["grp:none", "chn:none", "dm:ann:bob", "dm:bob:ann", "nul\0", "", "\ud800", 3, None,
     "grp:" + "é" * 156, "grp:" + "x" * 157]))

# A valid send (a direct message between two of USERS, or a post to a known conversation) with
# one field replaced by a drawn value, which is often odd: so each check is met alone, in a
# send that would otherwise succeed (and so reach the compiled send).
FIELDS = {"user": ids, "device": ids, "role": roles, "cid": cids, "body": bodies,
          "conv": conv_refs, "to": ids}
odd_send = st.tuples(st.just("odd"), st.integers(0, 1), st.integers(0, 2), st.integers(0, 7),
                     st.booleans(),
                     st.sampled_from(sorted(FIELDS)).flatmap(
                         lambda name: st.tuples(st.just(name), FIELDS[name])))


def make(spec, convs: list[str], n: int):
    """A command from `command_spec`, or a send with one odd field (the n-th command of the
    run: its cid is new unless the cid is the odd field)."""
    if spec[0] != "odd":
        return make_command(spec, convs)
    _, u, v, c, direct, (name, value) = spec
    fields = {"user": USERS[u], "device": "d1", "role": "user", "cid": f"n{n}", "body": "hi",
              "conv": None if direct else convs[c % len(convs)],
              "to": USERS[v] if direct else None}
    if name == "conv" and isinstance(value, int):
        value = convs[value % len(convs)]
    fields[name] = value
    return SendMessage(**fields)


class CountingIds:
    """Stands in for `secrets` in the rules: new conversation ids count up, so two runs of the
    same batches name their conversations alike."""

    def __init__(self) -> None:
        self.n = 0

    def token_hex(self, nbytes: int) -> str:
        self.n += 1
        return f"{self.n:0{2 * nbytes}x}"


@contextmanager
def counting_ids():
    saved = rules_module.secrets
    rules_module.secrets = CountingIds()
    try:
        yield
    finally:
        rules_module.secrets = saved


@contextmanager
def python_rules_only():
    saved = store_module.SEND_MESSAGE
    store_module.SEND_MESSAGE = None
    try:
        yield
    finally:
        store_module.SEND_MESSAGE = saved


class Given(NamedTuple):
    """A command `run` passes as it is, whatever it is (a tuple, a subclass)."""

    command: object


def outcome_view(outcomes) -> list:
    return [(o.reply, type(o.error), str(o.error) if o.error else None, effects_view(o.effects),
             o.lsn, reply_view(o.reply)) for o in outcomes]


def reply_view(reply) -> list | None:
    """`reply`'s keys in their order, each with its value's type: `==` of two dicts sees
    neither, and the `command_done` debug line shows the reply as it is (a new message's
    compiled reply is made by `Outcome.reply`, the rules' by `decide`)."""
    return None if reply is None else [(k, type(v), v) for k, v in reply.items()]


def effects_view(fx) -> tuple:
    """`fx`'s fields, its receipts and membership changes as lists: the compiled send leaves
    them as one shared empty tuple (store.NO_CHANGES), the rules as lists of their own."""
    return (fx.inbox_heads, list(fx.receipts), list(fx.membership), fx.conv, fx.seq, fx.lsn,
            fx.message)


def stored(store: Store) -> tuple[list, list]:
    with store._env.read() as txn:
        log = list(txn.cursor(db=store._dbs["log"]))
    return log, store.dump_projections()


def run(batches, python_only: bool, max_body: int = MAX_BODY) -> tuple[list, tuple[list, list]]:
    """Execute `batches` (lists of specs, or of ready commands) on a fresh store; return every
    outcome and what was stored."""
    with tempfile.TemporaryDirectory(prefix="homing-send-") as d, counting_ids():
        store = Store.open(d, map_size=1 << 22, limits=Limits(max_body_bytes=max_body))
        try:
            # Conversations to send into: direct ones of the first three users, a group and a
            # channel (ann owns both; bob and cat are members), so most sends reach the
            # compiled send.
            setup = [SendMessage(a, "d1", "user", f"setup-{b}", "hi", to=b)
                     for a, b in (("ann", "bob"), ("ann", "cat"), ("bob", "cat"))]
            setup += [CreateConv("ann", "d1", "user", kind, kind, False, ("bob", "cat"))
                      for kind in ("group", "channel")]
            convs = [o.reply["conv"] for o in store.execute(setup, now_us=NOW - 1)]
            seen = []
            made = 0
            for n, specs in enumerate(batches):
                commands = [s.command if isinstance(s, Given) else
                            s if isinstance(s, SendMessage) else make(s, convs, made + i)
                            for i, s in enumerate(specs)]
                made += len(specs)
                if python_only:
                    with python_rules_only():
                        outcomes = store.execute(commands, now_us=NOW + n)
                else:
                    outcomes = store.execute(commands, now_us=NOW + n)
                # what the committer takes for `committed_lsn`: the highest LSN of the batch,
                # the log's last when the batch appended any (a batch's LSNs rise)
                last = max((o.lsn for o in outcomes), default=0)
                assert _last_lsn(outcomes) == last
                assert last in (0, store.log.tail()[0])
                for out in outcomes:
                    conv = (out.reply or {}).get("conv")
                    if conv and conv not in convs:
                        convs.append(conv)
                seen.append(outcome_view(outcomes))
            return seen, stored(store)
        finally:
            store.close()


any_command = st.one_of(command_spec, odd_send, odd_send)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(any_command, min_size=1, max_size=12), min_size=1, max_size=6))
def test_compiled_send_equals_the_python_rules(batches):
    """Random batches of valid and odd commands: same outcomes, same log bytes, same rows."""
    compiled = run(batches, python_only=False)
    python = run(batches, python_only=True)
    assert compiled[0] == python[0]
    assert compiled[1][0] == python[1][0]  # the log, digest chain included
    assert compiled[1][1] == python[1][1]  # every projection row


def test_the_digest_chain_ends_alike_at_every_block_boundary():
    """Records of every size from below one BLAKE2b block (128 bytes) to past three, one byte
    apart, and a large one: the compiled send seals them in place (hashlib's BLAKE2b over its
    own buffer), and its digest chain is the Python seal's byte for byte."""
    sends = [SendMessage("ann", "d1", "user", f"b{n}", "x" * n, to="bob")
             for n in [*range(0, 420), 20_000]]
    batches = [sends[:200], sends[200:]]
    compiled = run(batches, python_only=False, max_body=len(sends[-1].body))
    python = run(batches, python_only=True, max_body=len(sends[-1].body))
    assert all(error is None for batch in compiled[0] for _, _, error, _, _, _ in batch)
    assert compiled[1][0] == python[1][0]


class SubSend(SendMessage):
    """A SendMessage subclass: `Store.execute` leaves it to the rules."""

    __slots__ = ()


class OtherBody(SendMessage):
    """A subclass whose `body` is not its 5th item: read by position, it would be that item."""

    __slots__ = ()

    @property
    def body(self) -> str:
        return "from the attribute"


def _send(**fields) -> SendMessage:
    return SendMessage(**{"user": "ann", "device": "d1", "role": "user", "cid": "k",
                          "body": "hi", "to": "bob", **fields})


# One send into an existing direct conversation, built every way a command can be: each must
# end as with the Python rules alone (what they do with a tuple that is not a command is theirs
# to say; that the compiled send, which reads a SendMessage by position, does the same).
BUILT = {
    "positional": lambda: SendMessage("ann", "d1", "user", "k", "hi", None, "bob"),
    "keywords, out of order": lambda: SendMessage(to="bob", body="hi", cid="k", role="user",
                                                  device="d1", user="ann"),
    "_replace": lambda: _send(cid="other")._replace(cid="k", body="hi"),
    "_make": lambda: SendMessage._make(["ann", "d1", "user", "k", "hi", None, "bob"]),
    "a subclass": lambda: SubSend(*_send()),
    "a subclass with its own body": lambda: OtherBody(*_send()),
    "a plain 7-tuple": lambda: tuple(_send()),
    "a 7-item list": lambda: list(_send()),
    "a 6-tuple": lambda: tuple(_send())[:6],
}


@pytest.mark.parametrize("how", sorted(BUILT))
def test_a_send_built_any_way_ends_alike(how):
    batches = [[Given(BUILT[how]()), Given(BUILT[how]()), _send(cid="after")]]
    compiled, python = run(batches, python_only=False), run(batches, python_only=True)
    assert compiled == python
    if how in ("positional", "keywords, out of order", "_replace", "_make"):
        ((first, again, _),) = compiled[0]
        assert first[2] is None and first[0]["dup"] is False and first[0]["cid"] == "k"
        assert again[2] is None and again[0]["dup"] is True


EMOJI = "\U0001F600"
# Each limit the send checks, at it and just past it, in a send that would otherwise succeed.
AT_THE_LIMITS = {
    "body at the limit": {"body": "x" * MAX_BODY},
    "body one byte over": {"body": "x" * (MAX_BODY + 1)},
    "body at the limit in two-byte characters": {"body": "é" * (MAX_BODY // 2)},
    "body over it in two-byte characters": {"body": "é" * (MAX_BODY // 2) + "x"},
    "binary body at the limit": {"body": b"b" * MAX_BODY},
    "binary body one byte over": {"body": b"b" * (MAX_BODY + 1)},
    "cid of 128 characters": {"cid": "c" * 128},
    "cid of 129 characters": {"cid": "c" * 129},
    "cid of 400 bytes": {"cid": EMOJI * 100},
    "cid of 401 bytes": {"cid": EMOJI * 100 + "c"},
    "cid of 128 four-byte characters": {"cid": EMOJI * 128},
    "device id of 64 characters": {"device": "d" * 64},
    "device id of 65 characters": {"device": "d" * 65},
    "device id with every allowed symbol": {"device": "d_.@+-"},
    "device id starting with a symbol": {"device": "_d"},
    "device id with a space": {"device": "d 1"},
    "a service": {"role": "service"},
    "an admin": {"role": "admin"},
    "an unknown role": {"role": "owner"},
}


@pytest.mark.parametrize("name", sorted(AT_THE_LIMITS))
@pytest.mark.parametrize("where", ["direct", "group", "channel"])
def test_sends_at_each_limit_end_alike(name, where):
    """The same send, at or just past one limit, ends alike both ways."""
    fields = {"user": "ann", "device": "d1", "role": "user", "cid": "n1", "body": "hi",
              "to": "bob" if where == "direct" else None,
              # the group and the channel `run` creates, named by CountingIds
              "conv": {"direct": None, "group": f"grp:{1:016x}", "channel": f"chn:{2:016x}"}[where]}
    fields.update(AT_THE_LIMITS[name])
    batches = [[SendMessage(**fields)]]
    compiled, python = run(batches, python_only=False), run(batches, python_only=True)
    assert compiled == python
    (((reply, _error_type, error, _fx, _lsn, _view),),) = compiled[0]
    refused = ("over", "129", "401", "65", "four-byte", "with a symbol", "with a space",
               "unknown")
    if any(word in name for word in refused):
        assert error is not None
    else:
        assert error is None and reply["dup"] is False


def test_the_common_sends_take_the_compiled_way():
    """Sends into existing conversations (direct, group, channel by its owner) are all taken by
    the compiled send, so the equality above is not only of fallbacks."""
    with tempfile.TemporaryDirectory(prefix="homing-send-") as d:
        store = Store.open(d, map_size=1 << 22)
        try:
            group, channel = (o.reply["conv"] for o in store.execute([
                CreateConv("ann", "d1", "user", "group", "g", False, ("bob",)),
                CreateConv("ann", "d1", "user", "channel", "c", False, ("bob",))]))
            store.execute([SendMessage("ann", "d1", "user", "first", "hi", to="bob")])
            sends = [SendMessage("ann", "d1", "user", "a", "x" * 200, to="bob"),
                     SendMessage("bob", "d2", "user", "b", b"\x01\x02", to="ann"),
                     SendMessage("bob", "d2", "user", "c", "in the group", conv=group),
                     SendMessage("ann", "d1", "user", "d", "on the channel", conv=channel),
                     SendMessage("cat", "d1", "admin", "e", "moderation", conv=group),
                     SendMessage("bob", "d3", "service", "f", "a bot", conv=channel)]
            taken = []
            tables = store._tables
            tail = store.log.tail()

            def work(txn):
                tables.begin(txn)
                for n, cmd in enumerate(sends):
                    taken.append(store_module.SEND_MESSAGE(
                        tables, cmd, NOW, 65536, tail[0] + 1 + n, tail[1], {}) is not None)
                raise RuntimeError("abort")  # look only: nothing is committed

            with pytest.raises(RuntimeError):
                store._env.write(work)
            tables.rollback()
            assert taken == [True] * len(sends)
        finally:
            store.close()


def test_a_ctrl_c_while_the_compiled_send_reads_a_row_stops_the_batch():
    """A Ctrl-C that lands while the compiled send reads a row in Python (a BufTable's
    `__missing__`) stops the batch with KeyboardInterrupt, nothing written. The send took it
    for a failed read, cleared it and left the send to the rules: the interrupt was lost, and
    `homing bench replay` building its log went on for minutes after Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="homing-send-") as d:
        store = Store.open(d, map_size=1 << 22)
        try:
            store.execute([SendMessage("ann", "d1", "user", "first", "hi", to="bob")])
            before = store.log.tail()
            inside = []

            def ctrl_c(frame, event, arg):
                # Ctrl-C at the first row the compiled send reads: SIGINT as the terminal
                # sends it, turned into KeyboardInterrupt by Python's own handler.
                if event == "c_call" and arg is store_module.SEND_MESSAGE:
                    inside.append(True)
                elif event == "call" and inside and frame.f_code.co_name == "__missing__":
                    sys.setprofile(None)
                    signal.raise_signal(signal.SIGINT)

            # (a shell's background job, as CI may start the tests, ignores SIGINT)
            handler = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                with pytest.raises(KeyboardInterrupt):
                    sys.setprofile(ctrl_c)
                    try:
                        store.execute([SendMessage("ann", "d1", "user", "second", "hi",
                                                   to="bob")])
                    finally:
                        sys.setprofile(None)
            finally:
                signal.signal(signal.SIGINT, handler)
            assert inside and store.log.tail() == before
            (after,) = store.execute([SendMessage("ann", "d1", "user", "third", "hi", to="bob")])
            assert after.error is None and after.lsn == before[0] + 1
        finally:
            store.close()


def test_a_tuple_among_commands_fails_alone_and_the_batch_commits():
    """A plain tuple where a command is expected (the fields of a SendMessage, in order) is a
    bug of the caller's: the rules fail on it (CommandInternalError), alone; the batch's sends
    commit and `execute` returns their outcomes. Its `command_internal_error` line, written once
    the batch committed, read `cmd.user`: AttributeError from `execute`, a durable batch said
    failed (until 2026-12-06)."""
    with tempfile.TemporaryDirectory(prefix="homing-send-") as d:
        store = Store.open(d, map_size=1 << 22)
        try:
            outcomes = store.execute([_send(cid="a"), tuple(_send(cid="b")), _send(cid="c")])
            assert [type(o.error).__name__ for o in outcomes] == [
                "NoneType", "CommandInternalError", "NoneType"]
            first, refused, last = (o.lsn for o in outcomes)  # the first creates the conv
            assert refused == 0 and 0 < first < last == store.log.tail()[0]
            assert _last_lsn(outcomes) == last
        finally:
            store.close()
