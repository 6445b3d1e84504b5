"""`members` in pages (PROTOCOL.md §5.2, since 2026-12-07): a channel of stores whose ids have
the full 64 characters, or one of 100,000 members at `--max-members 100000`, does not fit one
`member_list` frame, and its owner could not learn who is in it (`limit_exceeded`). A `members`
with `after` is answered a page of the members, as many as fit the max_frame, each in the list
of its role, and the SDK (and so `homing members`) pages by itself: the whole answer, each
member once, in its role, equal to what a broker of a big max_frame answers in one reply.
Without `after`, the request is answered as before: whole, or `limit_exceeded`."""

from __future__ import annotations

import tempfile

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from broker.client import ClientError, open_client
from broker.handlers import members_page
from broker.handshake import CAPS
from storage.commands import CreateConv, SetRole
from storage.store import Store
from tests.broker.paging import (
    assert_bad_after_is_invalid,
    assert_reads_cost_their_pages,
    counting_rows,
    played_broker,
    raw_pages,
    rows_per_page,
    seeded_group,
    short_ids,
    small_broker,
)
from tests.broker.test_receipts_pages import _FIRST, SMALL, store_ids
from tests.faults.conftest import PlayedBroker, RawClient
from tests.harness import running_broker
from tests.procs import as_user, homing, lines

HQ = "head-office"


async def open_conv(h, stores: list[str], kind: str = "channel", admins: bool = True) -> str:
    """Head office's channel (or group) of `stores`; with `admins`, every 7th of them (from
    the 3rd) an admin."""
    async with h.client(HQ, role="service") as hq:
        # A create must fit the frame: the first 40 in it, the others invited.
        conv = await hq.create(kind, "notices" if kind == "channel" else "stores", stores[:40])
        for i, store in enumerate(stores):
            role = "admin" if admins and i % 7 == 2 else "member"
            if i >= 40:
                await hq.invite(conv, store, role)
            elif role == "admin":
                await hq.set_role(conv, store, role)
    return conv


def expected(stores: list[str]) -> dict:
    by_byte = sorted(stores, key=str.encode)
    admins = {s for i, s in enumerate(stores) if i % 7 == 2}
    return {"owners": [HQ], "admins": [s for s in by_byte if s in admins],
            "members": [s for s in by_byte if s not in admins]}


def listed(page) -> list[str]:
    """A page's members, in id order (each role's list is)."""
    return sorted([*page.owners, *page.admins, *page.members], key=str.encode)


async def pages(raw: RawClient, conv: str, after: str = "") -> list:
    """Every page of a raw `members` with `after`, as the broker answers them."""
    return await raw_pages(raw, lambda i, a: protocol.Members(id=i, conv=conv, after=a),
                           protocol.MemberList, after)


async def test_head_office_lists_every_member_of_a_channel_too_big_for_one_frame(tmp_path):
    """At a 4 KiB max_frame, head office and 120 stores of 64-character ids, some admins: the
    SDK's `members` is the whole answer, each member once and in the list of its role, in id
    order, equal to the one reply the same data gets from a broker of the default max_frame.
    The raw pages each fit the frame, cover the members in order, each in one list of one
    page, and name the next page's `after` in `last`. A request without `after` is refused
    `limit_exceeded` as before, and the welcome names the `members_paged` cap."""
    stores = store_ids(120)
    data = tmp_path / "data"
    async with running_broker(data, **SMALL) as h:
        conv = await open_conv(h, stores)
        async with h.client(HQ, role="service") as hq:
            assert protocol.CAP_MEMBERS_PAGED in hq.welcome.caps
            whole = await hq.members(conv)
            again = await hq.members(conv)
        raw = await RawClient.connect(h.server, h.token(HQ, "service"))
        got = await pages(raw, conv)
        await raw.send(protocol.Members(id=1, conv=conv))
        with trio.fail_after(10):
            err = await raw.reply(1)
        assert isinstance(err, protocol.Error) and err.name == "limit_exceeded", err
        await raw.aclose()
    want = expected(stores)
    assert {"owners": list(whole.owners), "admins": list(whole.admins),
            "members": list(whole.members)} == want
    assert (whole.conv, whole.kind, whole.name, whole.more, whole.last) == (
        conv, "channel", "notices", False, None)

    assert len(got) >= 3, [len(listed(p)) for p in got]
    assert again == whole._replace(id=whole.id + len(got))  # a request a page
    covered = []
    for page in got:
        assert len(protocol.encode_frame(protocol.frames.to_wire(page))) - 4 <= 4096
        assert (page.kind, page.name) == ("channel", "notices")
        members = listed(page)
        assert len(set(members)) == len(members) and page.last in (None, members[-1])
        for role in ("owners", "admins", "members"):
            assert list(getattr(page, role)) == [m for m in want[role] if m in members]
        covered += members
    assert covered == sorted([HQ, *stores], key=str.encode)
    assert [bool(p.more) for p in got] == [True] * (len(got) - 1) + [False]

    async with running_broker(data) as h, h.client(HQ, role="service") as hq:
        raw = await RawClient.connect(h.server, h.token(HQ, "service"))
        await raw.send(protocol.Members(id=1, conv=conv))  # one reply, no `after`
        with trio.fail_after(10):
            one = await raw.reply(1)
        await raw.aclose()
        assert (await hq.members(conv))._replace(id=0) == one._replace(id=0)
    assert one == whole._replace(id=1) and not one.more


async def test_a_page_is_read_at_its_own_moment_and_after_need_name_no_member(tmp_path):
    """At the least max_frame a hello may ask (1024 bytes): two stores on either side of a
    page boundary are made admins between the two pages: the one on the page already read is
    a plain member there, the one on the next page an admin; each is listed once. An `after`
    naming no member starts at the first id above it; one above every id is an empty last
    page. A non-ASCII `after` is no user id: `invalid`, the session open."""
    stores = store_ids(60)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        conv = await open_conv(h, stores, admins=False)
        async with h.client(HQ, role="service") as hq:
            raw = await RawClient.connect(h.server, h.token(HQ, "service"), max_frame=1024)
            await raw.send(protocol.Members(id=1, conv=conv, after=""))
            first = await raw.reply(1)
            assert first.more and len(protocol.encode_frame(protocol.frames.to_wire(first))
                                      ) - 4 <= 1024
            rest = sorted([HQ, *stores], key=str.encode)
            ended = rest.index(first.last)
            before, after = rest[ended], rest[ended + 1]
            assert HQ not in (before, after)  # the owner, whose role stays
            for store in (before, after):
                await hq.set_role(conv, store, "admin")
        second = (await pages(raw, conv, after=first.last))[0]
        assert before in first.members and before not in listed(second)
        assert after in second.admins and after not in listed(first)

        gap = before[:-1]  # the id cut short: no member, and it sorts just before `before`
        assert gap not in stores
        await raw.send(protocol.Members(id=7, conv=conv, after=gap))
        assert listed(await raw.reply(7))[0] == before
        await raw.send(protocol.Members(id=8, conv=conv, after="zzz"))
        assert await raw.reply(8) == protocol.MemberList(
            id=8, conv=conv, kind="channel", owners=(), admins=(), members=(), name="notices")

        await assert_bad_after_is_invalid(raw, {"t": "members", "conv": conv})
        await raw.aclose()


async def test_a_plain_member_of_a_big_group_pages_too_and_a_channel_subscriber_may_not(
        tmp_path):
    """Any member of a group sees its members, paged as an owner is (here a plain member at
    the least max_frame); in a channel a plain subscriber's page is `forbidden`, as the whole
    list is: paging shows nobody more than `members` did."""
    stores = store_ids(50)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        group = await open_conv(h, stores, "group", admins=False)
        chn = await open_conv(h, stores[:3])
        raw = await RawClient.connect(h.server, h.token(stores[0]), max_frame=1024)
        got = await pages(raw, group)
        assert [m for p in got for m in listed(p)] == sorted([HQ, *stores], key=str.encode)
        assert len(got) >= 3 and [m for p in got for m in p.owners] == [HQ]
        await raw.send(protocol.Members(id=5, conv=chn, after=""))
        err = await raw.reply(5)
        assert isinstance(err, protocol.Error) and err.name == "forbidden", err
        await raw.aclose()


@pytest.mark.parametrize(("ids", "name"), [(store_ids(300), "\U0001F600" * 128),
                                           (short_ids(600), "g" * 128)],
                         ids=["64_char_ids_emoji_name", "2_char_ids_long_name"])
async def test_a_page_reads_no_more_members_than_its_name_leaves_room_for(tmp_path, ids, name):
    """At the least max_frame (1024 bytes), a group whose name takes much of the frame (128
    characters, of 4 bytes each, or ASCII): each page's read takes from the store no more
    member rows than twice the members it lists and a few more. Until 2026-12-07's review a
    page read as many rows as the whole max_frame's bytes could hold, whatever the name left
    of it: 18 rows for a page of 5 64-character ids, 514 for one of 238 2-character ids."""
    data = tmp_path / "data"
    conv, _ = seeded_group(data, HQ, ids, name)
    async with running_broker(data) as h:
        raw = await RawClient.connect(h.server, h.token(HQ), max_frame=1024)
        reads = await rows_per_page(
            raw, lambda i, a: protocol.Members(id=i, conv=conv, after=a),
            lambda page: len(listed(page)))
        await raw.aclose()
    assert sum(n for _, n in reads) == len(ids) + 1 and len(reads) >= 3, reads
    assert_reads_cost_their_pages(reads)


async def test_a_member_who_loses_sight_of_the_members_between_pages_is_refused_the_next(
        tmp_path):
    """Paging at the least max_frame (1024 bytes): a plain member of a group removed after
    its first page, and an admin of a channel made a plain subscriber after theirs, are
    answered the next page `forbidden`, as any `members` they asked then, and so is a page of
    `receipts`; the session stays open, and the SDK raises it (PROTOCOL.md §5.2)."""
    stores = store_ids(30)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        group = await open_conv(h, stores, "group", admins=False)
        chn = await open_conv(h, stores)  # stores[2] an admin
        async with h.client(HQ, role="service") as hq:
            seqs = {conv: (await hq.send("hi", conv=conv)).seq for conv in (group, chn)}
        for conv, who in ((group, stores[0]), (chn, stores[2])):
            raw = await RawClient.connect(h.server, h.token(who), max_frame=1024)
            await raw.send(protocol.Members(id=1, conv=conv, after=""))
            first = await raw.reply(1)
            assert first.more, first
            async with h.client(HQ, role="service") as hq:
                if conv == group:
                    await hq.remove(conv, who)
                else:
                    await hq.set_role(conv, who, "member")
            await raw.send(protocol.Members(id=2, conv=conv, after=first.last))
            err = await raw.reply(2)
            assert isinstance(err, protocol.Error) and err.name == "forbidden", err
            await raw.send(protocol.Receipts(id=4, conv=conv, seq=seqs[conv], after=first.last))
            err = await raw.reply(4)
            assert isinstance(err, protocol.Error) and err.name == "forbidden", err
            await raw.send(protocol.Ping(id=3))
            assert await raw.reply(3) == protocol.Pong(id=3)
            await raw.aclose()
            async with h.client(who) as c:
                with pytest.raises(ClientError) as refused:
                    await c.members(conv)
                assert refused.value.name == "forbidden", refused.value


def test_homing_members_prints_every_member_of_a_channel_too_big_for_one_frame(tmp_path):
    """`homing members` against `homing serve --max-frame-bytes 4096`: the same JSON as ever,
    now every member of the 121 (it failed `limit_exceeded` before 2026-12-07)."""
    stores = store_ids(120)
    with small_broker(tmp_path / "data") as (b, h):
        conv = trio.run(open_conv, h, stores)
        out = lines(homing("members", conv, env=as_user(b, HQ, "service")))
    assert out == [{"conv": conv, "kind": "channel", "name": "notices", **expected(stores)}]


async def test_the_sdk_asks_a_broker_without_the_cap_once(tmp_path, monkeypatch):
    """Against a broker whose welcome lacks `members_paged` (one from before 2026-12-07,
    played by this broker with the cap taken away), the SDK's `members` is one request
    without `after`: a channel that fits is answered whole, one that does not
    `limit_exceeded`."""
    import broker.handshake

    monkeypatch.setattr(broker.handshake, "CAPS", tuple(
        c for c in CAPS if c != protocol.CAP_MEMBERS_PAGED))
    async with running_broker(tmp_path / "data", **SMALL) as h:
        big = await open_conv(h, store_ids(120))
        small = await open_conv(h, store_ids(6))
        async with h.client(HQ, role="service") as hq:
            assert protocol.CAP_MEMBERS_PAGED not in hq.welcome.caps
            with pytest.raises(ClientError) as refused:
                await hq.members(big)
            assert refused.value.name == "limit_exceeded", refused.value
            whole = await hq.members(small)
            again = await hq.members(small)
    # This broker would have answered a page: the refusal says no `after` was sent.
    assert list(whole.members) == expected(store_ids(6))["members"] and not whole.more
    assert again.id == whole.id + 1  # one request each


@pytest.mark.parametrize("page", [(("a",), "a"), ((), "c"), (("a",), None)],
                         ids=["stuck", "empty", "no_last"])
async def test_the_sdk_refuses_member_pages_that_do_not_move_on(page):
    """A broker (played on the real protocol connection, its welcome with the caps) whose
    `member_list` pages do not move on: the same `last` again and again, `more` with no
    member, or with no `last`. The SDK's `members` raises ClientError `internal` naming the
    page, rather than ask for ever or merge a list twice."""
    asked: list[protocol.Members] = []
    members, last = page

    async def answer(played: PlayedBroker, frame) -> None:
        if isinstance(frame, protocol.Members):
            asked.append(frame)
            await played.send(protocol.MemberList(
                id=frame.id, conv=frame.conv, kind="group", owners=(), admins=(),
                members=members, name="g", more=True, last=last))

    async with played_broker(answer) as server, open_client(
            server, "v1.any.token", "cli", deliver=False, reconnect=False) as client:
        with trio.fail_after(10), pytest.raises(ClientError) as refused:
            await client.members("grp:stores")
    assert refused.value.name == "internal", refused.value
    assert refused.value.message.startswith("members: the broker's page after"), refused.value
    assert len(asked) <= 2 and all(r.after is not None for r in asked), asked


@st.composite
def groups(draw):
    """An owner and up to 600 members, with ids of 64 characters, of 1 or 2, or of any
    length, each member an admin or not (all, none, or some)."""
    rnd = draw(st.randoms(use_true_random=False))
    mode = draw(st.sampled_from(["long", "short", "any"]))

    def one_id() -> str:
        size = {"long": 64, "short": rnd.randint(1, 2), "any": rnd.randint(1, 64)}[mode]
        return rnd.choice(_FIRST) + "".join(rnd.choice(_FIRST + "_.@+-")
                                            for _ in range(size - 1))

    size = draw(st.sampled_from([1, 2, 100, 600]) | st.integers(1, 600))
    people = sorted({one_id() for _ in range(size)})
    owner = rnd.choice(people)
    share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    admins = {m for m in people if m != owner and rnd.random() < share}
    return owner, [m for m in people if m != owner], admins


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups(), st.sampled_from([1024, 1025, 1100, 4096]) | st.integers(1024, 70000),
       st.builds(lambda n, c: c * n, st.integers(1, 128), st.sampled_from("g\u00e9\U0001F600")))
def test_pages_read_from_the_store_list_every_member_once_at_the_cost_of_the_page(
        group, max_frame, name):
    """In process, over a real Store: a group of random ids and roles paged as the broker
    pages it (the store's page read, then the page builder) at a max_frame down to the least
    a hello may ask, its name of up to 128 characters of 1, 2 or 4 bytes (since 2026-12-07's
    review: the name's room is not the ids'): each page fits the frame, the pages list every
    member exactly once, in the list of its role, in id order, `more` and `last` chaining
    them, and a page's read takes no more member rows than twice the members it lists and a
    few more (the whole conversation's rows before: a read costs its page, not the
    conversation)."""
    owner, others, admins = group
    with tempfile.TemporaryDirectory() as data:
        store = Store.open(data)
        try:
            (made,) = store.execute([CreateConv(owner, "d", "user", "group", name, False,
                                                tuple(others))])
            conv = made.reply["conv"]
            outs = store.execute([SetRole(owner, "d", "user", conv, m, "admin") for m in admins])
            assert all(o.error is None for o in outs), outs
            whole = store.members(conv)
            info = store.conv_info(conv)
            got, covered, after, rows_read = [], [], "", []
            while True:
                f = protocol.Members(id=2**63 - 1, conv=conv, after=after)
                with counting_rows() as seen:
                    page = members_page(store, f, max_frame, info)
                size = len(protocol.encode_frame(protocol.frames.to_wire(page))) - 4
                assert size <= max_frame, (size, max_frame)
                protocol.frames.from_wire(protocol.MemberList, protocol.frames.to_wire(page))
                on_page = listed(page)
                assert on_page and (page.last == on_page[-1] if page.more else page.last is None)
                rows_read.append((seen[0], len(on_page)))
                covered += on_page
                got += [(m, role) for role, ms in (("owner", page.owners),
                                                   ("admin", page.admins),
                                                   ("member", page.members)) for m in ms]
                if not page.more:
                    break
                assert size > max_frame - 132 - 3 * 4 - 66 - 4, (size, max_frame)  # was full
                after = page.last
        finally:
            store.close()
    assert covered == [m for m, _ in whole]  # each once, in id order
    assert sorted(got) == whole == sorted(
        [(owner, "owner"), *((m, "admin" if m in admins else "member") for m in others)])
    assert_reads_cost_their_pages(rows_read)
