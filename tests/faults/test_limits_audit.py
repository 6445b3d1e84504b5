"""The limits audit of 2026-12-06: --max-members is bounded by what a reply's user list holds,
and a conversation past that bound (grown under an older broker) gets a typed refusal."""

from __future__ import annotations

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from broker.config import Config
from protocol.fields import MAX_USER_LIST
from storage import records as r
from storage.store import Store
from tests.faults.conftest import RawClient, replies
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing, last_error


def test_max_members_is_bounded_by_the_users_a_reply_lists():
    """--max-members above MAX_USER_LIST (100,000) is a usage error: the `members` and
    `receipts` replies of such a group could not be sent. Until 2026-12-06 it had no upper
    bound."""
    from broker.cli import CliError, build_parser

    assert Config(max_members=MAX_USER_LIST).max_members == MAX_USER_LIST
    with pytest.raises(ValueError, match="--max-members must be a finite number from 1 to "
                                         "100000, not 100001"):
        Config(max_members=MAX_USER_LIST + 1)
    with pytest.raises(CliError, match="must be from 1 to 100000, not 100001"):
        build_parser().parse_args(["serve", "--max-members", str(MAX_USER_LIST + 1)])
    args = build_parser().parse_args(["serve", "--max-members", str(MAX_USER_LIST)])
    assert args.max_members == MAX_USER_LIST


def _group_past_the_list_bound(data, members: int = MAX_USER_LIST + 1) -> str:
    """A group of owner + `members` members with one post, in `data`, as a broker
    whose --max-members was higher (before 2026-12-06) logged it: its events are appended to
    the log, and the store's projections caught up from them as the broker opens it (the
    rules would take minutes: each invite copies the group's cached member list)."""
    conv = "grp:00000000000000aa"
    store = Store.open(str(data))
    try:
        at = {"conv": conv}
        store.log.append([
            (1, r.CONV_CREATED, "owner", "d1", at | {"kind": "group", "name": "huge",
                                                    "open": False}),
            (1, r.MEMBER_ADDED, "owner", "d1", at | {"user": "owner", "role": "owner"}),
            *((1, r.MEMBER_ADDED, "owner", "d1", at | {"user": f"u{i:06d}", "role": "member"})
              for i in range(members)),
            (2, r.MESSAGE_ACCEPTED, "owner", "d1", at | {"cid": "c1", "body": "to all"})])
    finally:
        store.close()
    return conv


async def test_a_reply_listing_more_users_than_the_protocol_allows_is_limit_exceeded(tmp_path):
    """`members` and `receipts` in a group of more than MAX_USER_LIST members other than the
    asker are answered `limit_exceeded`, the session open (a ping after them is answered) and
    another user served meanwhile. The reply frame could not be encoded: the connection ended
    without a word (`connection_failed`, a traceback in the log)."""
    conv = _group_past_the_list_bound(tmp_path / "data")
    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(60):
            owner = await RawClient.connect(h.server, h.token("owner"), "d1")
            await owner.send(wire.Members(id=1, conv=conv))
            await owner.send(wire.Receipts(id=2, conv=conv, seq=1))
            await owner.send(wire.Ping(id=3))
            got = await replies(owner, [1, 2, 3])
            for request_id in (1, 2):
                err = got[request_id]
                assert isinstance(err, wire.Error) and err.name == "limit_exceeded", err
                assert not err.close and "over the 100,000 a list" in err.message, err
            assert isinstance(got[3], wire.Pong)
            async with h.client("alice") as alice:
                await alice.send("still served", to="bob")
            await owner.aclose()
    refused = [e for e in h.logs if e["event"] == "reply_too_large"]
    assert {(e["frame"], e["users"]) for e in refused} == {
        ("member_list", MAX_USER_LIST + 1), ("receipt_list", MAX_USER_LIST + 1)}


async def test_roster_cache_members_bounds_the_member_lists_kept(tmp_path):
    """--roster-cache-members bounds the members of the lists kept for pushes (it was fixed at
    500,000, about 116 MiB, until 2026-12-06): with 3, a group of 3 is kept and one of 5 is
    not, and both are answered all the same (the group of 5 read from the store each time)."""
    async with running_broker(tmp_path / "data", roster_cache_members=3) as h:
        with trio.fail_after(20):
            async with h.client("alice") as alice:
                small = await alice.create_group("small", ["b", "c"])
                big = await alice.create_group("big", ["b", "c", "d", "e"])
                for _ in range(2):
                    assert await alice.presence(small) == ("alice",)
                    assert await alice.presence(big) == ("alice",)
                    rosters = h.broker.rosters
                    assert small in rosters.cached and big not in rosters.cached
                    assert rosters.members == 3


async def test_a_reply_listing_exactly_as_many_users_as_the_protocol_allows_is_sent(tmp_path):
    """MAX_USER_LIST is a list's most, not a list past it: a group of owner + MAX_USER_LIST
    members is answered its member list and its receipts whole. Only the group one past the
    bound was tried, so a bound refusing its own edge passed."""
    conv = _group_past_the_list_bound(tmp_path / "data", MAX_USER_LIST)
    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(60):
            owner = await RawClient.connect(h.server, h.token("owner"), "d1")
            await owner.send(wire.Members(id=1, conv=conv))
            await owner.send(wire.Receipts(id=2, conv=conv, seq=1))
            got = await replies(owner, [1, 2])
            await owner.aclose()
    assert isinstance(got[1], wire.MemberList) and len(got[1].members) == MAX_USER_LIST, got[1]
    assert isinstance(got[2], wire.ReceiptList) and len(got[2].unread) == MAX_USER_LIST, got[2]
    assert not [e for e in h.logs if e["event"] == "reply_too_large"]


@pytest.mark.parametrize(("max_frame", "members"), [(1 << 20, MAX_USER_LIST + 1),
                                                     (65536, MAX_USER_LIST + 10_000)],
                         ids=["1MiB", "64KiB"])
async def test_the_sdks_paged_receipts_past_the_list_bound_is_limit_exceeded_at_any_frame(
        tmp_path, max_frame, members):
    """The SDK's paged `receipts` of a group of owner + more than MAX_USER_LIST members (grown
    under an older broker) is refused `limit_exceeded`, as the broker refuses the whole answer,
    at any max_frame. Until 2026-12-07 it depended on the page sizes: at 1 MiB (pages of
    100,000 and 1) it merged all 100,001; at 64 KiB (pages of about 8,000) it raised
    `internal` once a page that says `more` took it past 100,000, calling a correct broker's
    page a broker's bug."""
    conv = _group_past_the_list_bound(tmp_path / "data", members)
    async with running_broker(tmp_path / "data", max_frame_bytes=max_frame,
                              max_body_bytes=1024) as h:
        with trio.fail_after(120):
            async with h.client("owner") as owner:
                with pytest.raises(ClientError) as refused:
                    await owner.receipts(conv, 1)
    assert refused.value.name == "limit_exceeded", refused.value
    assert " users or more (its pages so far), over the 100,000 a list" in refused.value.message


async def test_the_sdks_paged_members_past_the_list_bound_is_limit_exceeded(tmp_path):
    """The SDK's paged `members` (since 2026-12-07) of a group of owner + 110,000 members
    (grown under an older broker), paged at 64 KiB (about 8,000 a page): `limit_exceeded` once
    its merged `members` passes MAX_USER_LIST, as the broker refuses the whole answer, and
    not `internal` on a page short of the last."""
    conv = _group_past_the_list_bound(tmp_path / "data", MAX_USER_LIST + 10_000)
    async with running_broker(tmp_path / "data", max_frame_bytes=65536,
                              max_body_bytes=1024) as h:
        with trio.fail_after(120):
            async with h.client("owner") as owner:
                assert wire.CAP_MEMBERS_PAGED in owner.welcome.caps
                with pytest.raises(ClientError) as refused:
                    await owner.members(conv)
    assert refused.value.name == "limit_exceeded", refused.value
    assert refused.value.message.startswith("the member_list answer would list "), refused.value
    assert " users or more (its pages so far), over the 100,000 a list" in refused.value.message


async def test_the_sdks_paged_receipts_of_exactly_the_list_bound_is_whole(tmp_path):
    """An audience of exactly MAX_USER_LIST, paged at 64 KiB (13 pages), is merged whole; so
    is the group's member list (its owner and MAX_USER_LIST members, the most `--max-members`
    takes), which did not fit one frame: `limit_exceeded` until 2026-12-07."""
    conv = _group_past_the_list_bound(tmp_path / "data", MAX_USER_LIST)
    async with running_broker(tmp_path / "data", max_frame_bytes=65536,
                              max_body_bytes=1024) as h:
        with trio.fail_after(120):
            async with h.client("owner") as owner:
                got = await owner.receipts(conv, 1)
                listing = await owner.members(conv)
    assert len(got.unread) == MAX_USER_LIST and got.unread == tuple(sorted(got.unread))
    assert not got.read and not got.delivered and not got.more
    assert listing.members == tuple(f"u{i:06d}" for i in range(MAX_USER_LIST)), len(
        listing.members)
    assert (listing.owners, listing.admins, listing.more) == (("owner",), (), False)


def test_homing_receipts_past_the_list_bound_exits_1_limit_exceeded(tmp_path):
    """`homing receipts` of a group of 110,000 members other than the sender, against `homing
    serve --max-frame-bytes 65536`: exit 1, `limit_exceeded`, as the 2026-12-06 entry of
    docs/CLI.md says. Since it paged (2026-12-07) it exited 1 with `internal`, "a broker's
    bug", once a page short of the last passed 100,000."""
    conv = _group_past_the_list_bound(tmp_path / "data", MAX_USER_LIST + 10_000)
    with BrokerProcess(tmp_path / "data", "--max-frame-bytes", "65536",
                       "--max-body-bytes", "1024") as b:
        proc = homing("receipts", "--conv", conv, "--seq", "1", env=as_user(b, "owner"),
                      check=False)
    assert proc.returncode == 1, proc
    err = last_error(proc.stderr)
    assert err["error"] == "limit_exceeded", err
    assert "106,210 users or more (its pages so far), over the 100,000 a list" in err["message"]
