"""`receipts` in pages (PROTOCOL.md §5.2, since 2026-12-07): head office's channel of stores
whose ids have the full 64 characters does not fit one `receipt_list` frame. A `receipts` with
`after` is answered a page of the audience, as many members as fit the max_frame, and the SDK
(and so `homing receipts`) pages by itself: the whole answer, each member once, in the list it
belongs to, equal to what a broker of a big max_frame answers in one reply. Without `after`,
the request is answered as before: whole, or `limit_exceeded`."""

from __future__ import annotations

import functools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from broker.client import ClientError, open_client
from broker.handlers import receipts_page
from broker.handshake import CAPS
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
from tests.faults.conftest import PlayedBroker, RawClient
from tests.harness import running_broker
from tests.procs import as_user, homing, lines

SMALL = {"max_frame_bytes": 4096, "max_body_bytes": 1024}
# Ids of every character a user id may hold, in an order where case and punctuation matter:
# by byte, "+" < "-" < "." < digits < "@" < upper case < "_" < lower case.
PREFIXES = ("a", "A", "0", "z", "Z", "9", "a.", "a-", "a+", "a@", "a_")


def store_ids(n: int) -> list[str]:
    return [f"{PREFIXES[i % len(PREFIXES)]}store-{i:03d}-".ljust(64, "x") for i in range(n)]


async def post_notice(h, stores: list[str], marks: bool = True) -> tuple[str, int]:
    """Head office's channel of `stores` and its notice; with `marks`, the first third of them
    read it, the second third are delivered it only (their device acked), the rest have it not
    yet; without, none has it yet."""
    async with h.client("head-office", role="service") as hq:
        conv = await hq.create_channel("notices", stores[:40])  # a create must fit the frame
        for store in stores[40:]:
            await hq.invite(conv, store)
        seq = (await hq.send("Inventory count on Monday", conv=conv)).seq
    third = len(stores) // 3
    for i, store in enumerate(stores[:2 * third] if marks else ()):
        async with h.client(store) as c:
            if i < third:
                await c.read(conv, seq)
            else:
                await c.ack(c.welcome.head, durable=True)
    return conv, seq


def expected(stores: list[str]) -> dict:
    third = len(stores) // 3
    by_byte = sorted(stores, key=str.encode)
    have_read, got = set(stores[:third]), set(stores[:2 * third])
    return {"delivered": [s for s in by_byte if s in got],
            "read": [s for s in by_byte if s in have_read],
            "unread": [s for s in by_byte if s not in have_read]}


async def pages(raw: RawClient, conv: str, seq: int, after: str = "") -> list:
    """Every page of a raw `receipts` with `after`, as the broker answers them."""
    return await raw_pages(raw, lambda i, a: protocol.Receipts(id=i, conv=conv, seq=seq, after=a),
                           protocol.ReceiptList, after)


async def test_head_office_gets_every_stores_receipt_of_a_channel_too_big_for_one_frame(
        tmp_path):
    """At a 4 KiB max_frame, 120 stores of 64-character ids: the SDK's `receipts` is the whole
    answer, each store once and in its list, in the broker's id order, equal to the one reply
    the same data gets from a broker of the default max_frame. The raw pages each fit the
    frame, cover the audience in order, and name the next page's `after` in `last`. A request
    without `after` is refused `limit_exceeded` as before (an old client never gets a partial
    list), and the welcome names the `receipts_paged` cap."""
    stores = store_ids(120)
    data = tmp_path / "data"
    async with running_broker(data, **SMALL) as h:
        conv, seq = await post_notice(h, stores)
        async with h.client("head-office", role="service") as hq:
            assert protocol.CAP_RECEIPTS_PAGED in hq.welcome.caps
            whole = await hq.receipts(conv, seq)
            again = await hq.receipts(conv, seq)
        raw = await RawClient.connect(h.server, h.token("head-office", "service"))
        got = await pages(raw, conv, seq)
        await raw.send(protocol.Receipts(id=1, conv=conv, seq=seq))
        with trio.fail_after(10):
            err = await raw.reply(1)
        assert isinstance(err, protocol.Error) and err.name == "limit_exceeded", err
        await raw.aclose()
    want = expected(stores)
    assert {"delivered": list(whole.delivered), "read": list(whole.read),
            "unread": list(whole.unread)} == want
    assert (whole.conv, whole.seq, whole.more, whole.last) == (conv, seq, False, None)

    assert len(got) >= 3, [len(p.unread) + len(p.read) for p in got]
    assert again == whole._replace(id=whole.id + len(got))  # a request a page
    covered = []
    for page in got:
        assert len(protocol.encode_frame(protocol.frames.to_wire(page))) <= 4096
        members = sorted({*page.read, *page.unread}, key=str.encode)
        assert set(page.delivered) <= set(members) and page.last in (None, members[-1])
        covered += members
    assert covered == sorted(stores, key=str.encode)
    assert [bool(p.more) for p in got] == [True] * (len(got) - 1) + [False]

    async with running_broker(data) as h, h.client("head-office", role="service") as hq:
        raw = await RawClient.connect(h.server, h.token("head-office", "service"))
        await raw.send(protocol.Receipts(id=1, conv=conv, seq=seq))  # one reply, no `after`
        with trio.fail_after(10):
            one = await raw.reply(1)
        await raw.aclose()
        assert (await hq.receipts(conv, seq))._replace(id=0) == one._replace(id=0)
    assert one == whole._replace(id=1) and not one.more


async def test_a_page_is_read_at_its_own_moment_and_after_need_name_no_member(tmp_path):
    """Two stores on either side of a page boundary read the notice between the two pages:
    the one on the page already read stays unread there, the one on the next page is read;
    each is listed once. An `after` naming no member starts at the first id above it; one
    above every id is an empty last page. A non-ASCII `after` is no user id: `invalid`, the
    session open."""
    stores = store_ids(90)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        conv, seq = await post_notice(h, stores, marks=False)
        raw = await RawClient.connect(h.server, h.token("head-office", "service"))
        await raw.send(protocol.Receipts(id=1, conv=conv, seq=seq, after=""))
        first = await raw.reply(1)
        assert first.more
        rest = sorted(stores, key=str.encode)
        ended = rest.index(first.last)
        before, after = rest[ended], rest[ended + 1]
        for store in (before, after):
            assert store not in first.read
            async with h.client(store) as c:
                await c.read(conv, seq)
        second = (await pages(raw, conv, seq, after=first.last))[0]
        assert before in first.unread and before not in {*second.read, *second.unread}
        assert after in second.read and after in second.delivered

        gap = before[:-1]  # the id cut short: no member, and it sorts just before `before`
        assert gap not in stores
        await raw.send(protocol.Receipts(id=7, conv=conv, seq=seq, after=gap))
        page = await raw.reply(7)
        assert sorted({*page.read, *page.unread}, key=str.encode)[0] == before
        await raw.send(protocol.Receipts(id=8, conv=conv, seq=seq, after="zzz"))
        assert await raw.reply(8) == protocol.ReceiptList(id=8, conv=conv, seq=seq, delivered=(),
                                                          read=(), unread=())

        await assert_bad_after_is_invalid(raw, {"t": "receipts", "conv": conv, "seq": seq})
        await raw.aclose()


async def test_a_small_channels_receipts_is_one_request_and_a_missing_message_not_found(
        tmp_path):
    """A channel that fits one frame: the SDK's `receipts` is one `receipts` request, as
    before; a page of a seq with no message is `not_found`."""
    stores = store_ids(6)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        conv, seq = await post_notice(h, stores)
        async with h.client("head-office", role="service") as hq:
            marks = await hq.receipts(conv, seq)
            again = await hq.receipts(conv, seq)
            assert again.id == marks.id + 1  # each call one request: its reply's id
            with pytest.raises(ClientError) as missing:
                await hq.receipts(conv, seq + 5)
        assert missing.value.name == "not_found"
        assert {"delivered": list(marks.delivered), "read": list(marks.read),
                "unread": list(marks.unread)} == expected(stores)


def test_homing_receipts_prints_every_store_of_a_channel_too_big_for_one_frame(tmp_path):
    """`homing receipts` against `homing serve --max-frame-bytes 4096`: the same JSON as ever,
    now every store of the 120 (it failed `limit_exceeded` before 2026-12-07)."""
    stores = store_ids(120)
    with small_broker(tmp_path / "data") as (b, h):
        conv, seq = trio.run(post_notice, h, stores)
        out = lines(homing("receipts", "--conv", conv, "--seq", str(seq),
                           env=as_user(b, "head-office", "service")))
    assert out == [{"conv": conv, "seq": seq, **expected(stores)}]


# Pages of a broken broker, each answered to every `receipts`: (delivered, read, unread, more,
# last). Each would have kept the SDK's `receipts` asking for ever, or merged a list twice.
STUCK = ((), (), ("a",), True, "a")  # the same page again and again: `last` never advances
BACKWARD = ((), (), ("b",), True, "b")  # then a page whose `last` is before its `after`
NO_LAST = ((), (), ("a",), True, None)  # more, and no `after` to ask it with: the whole again
EMPTY = ((), (), (), True, "c")  # more, and no member on the page
NOT_ITS_LAST = ((), (), ("a",), True, "c")  # `last` after its last member: "b" skipped


@pytest.mark.parametrize("answers", [[STUCK], [BACKWARD, ((), (), ("a",), True, "a")],
                                     [NO_LAST], [EMPTY], [NOT_ITS_LAST]],
                         ids=["stuck", "backward", "no_last", "empty", "not_its_last"])
async def test_the_sdk_refuses_pages_that_do_not_move_on(answers):
    """A broker (here played on the real protocol connection, its welcome with the
    `receipts_paged` cap) whose pages do not move on: `last` the page's `after` again, or
    before it, missing while `more`, after the page's last member, or a page of no member.
    The SDK's `receipts` raises ClientError `internal` naming the page, after a few requests,
    rather than ask for ever (it looped while the broker answered) or merge a list twice."""
    asked: list[protocol.Receipts] = []

    async def answer(played: PlayedBroker, frame) -> None:
        if isinstance(frame, protocol.Receipts):
            asked.append(frame)
            delivered, read, unread, more, last = answers[min(len(asked), len(answers)) - 1]
            await played.send(protocol.ReceiptList(
                id=frame.id, conv=frame.conv, seq=frame.seq, delivered=delivered,
                read=read, unread=unread, more=more, last=last))

    async with played_broker(answer) as server, open_client(
            server, "v1.any.token", "cli", deliver=False, reconnect=False) as client:
        with trio.fail_after(10), pytest.raises(ClientError) as refused:
            await client.receipts("chn:notices", 1)
    assert refused.value.name == "internal", refused.value
    assert "receipts" in refused.value.message and "page" in refused.value.message
    assert len(asked) <= 2, asked
    assert all(r.after is not None for r in asked), asked  # never the whole list again


_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ID = st.builds(lambda first, rest: first + rest, st.sampled_from(_FIRST),
                st.text(_FIRST + "_.@+-", max_size=63))
_LONG = st.builds(lambda first, rest: first + rest, st.sampled_from(_FIRST),
                  st.text(_FIRST, min_size=63, max_size=63))


@st.composite
def audiences(draw):
    """Members (ids of 64 characters, of 1, or mixed) with marks: all delivered, none, or
    some; all read, none, or some of the delivered."""
    ids = draw(st.sampled_from([_LONG, st.sampled_from(_FIRST), _ID]))
    members = sorted(draw(st.sets(ids, min_size=1, max_size=400)))
    how = draw(st.sampled_from(["all", "none", "some"]))
    got = [m for m in members if how == "all" or (how == "some" and draw(st.booleans()))]
    read = [m for m in got if draw(st.booleans())]
    return members, got, read


@settings(max_examples=300, deadline=None)
@given(audiences(), st.sampled_from([1024, 1025, 1100, 4096, 65536]) | st.integers(1024, 70000),
       st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
       st.integers(1, 160).map(lambda n: "chn:" + "c" * (n - 4) if n > 4 else "chn:c"))
def test_a_receipts_page_never_exceeds_the_max_frame(audience, max_frame, rid, seq, conv):
    """The page builder the handler answers a `receipts` with `after` by: whatever the ids'
    lengths and marks, a max_frame down to the least a hello may ask (1024), a 160-character
    conv and the largest id and seq, the page fits the frame (as the connection encodes it),
    holds a first run of the members, each in its lists, and says `more` and `last` exactly
    when members are left; a page that leaves members could not have held much more."""
    members, got, read = audience
    f = protocol.Receipts(id=rid, conv=conv, seq=seq, after="")
    page = receipts_page(f, max_frame, members, got, read)
    size = len(protocol.encode_frame(protocol.frames.to_wire(page))) - 4
    assert size <= max_frame
    protocol.frames.from_wire(protocol.ReceiptList, protocol.frames.to_wire(page))  # valid
    listed = sorted({*page.read, *page.unread})
    assert listed == members[:len(listed)] and listed
    assert set(page.read).isdisjoint(page.unread)
    assert page.delivered == [m for m in listed if m in set(got)]
    assert page.read == [m for m in listed if m in set(read)]
    assert page.more == (len(listed) < len(members))
    assert page.last == (listed[-1] if page.more else None)
    if page.more:  # left off for want of room: less than a member (132) and the margins
        assert size > max_frame - 132 - 4 - 3 * 4 - 66, (size, max_frame)


async def test_pages_of_a_group_skip_its_sender_and_later_joiners_at_every_boundary(tmp_path):
    """A group whose sender's id and whose later joiners' ids sort among the audience's, ids
    that are prefixes of others ("store-1", "store-10", "store-100") and ids of 64 characters,
    paged at the least max_frame a hello may ask (1024 bytes, a few members a page): the pages
    list the audience, each member once, in id order, and neither the sender nor a member who
    joined after the post. An `after` naming the sender or an id that is a prefix of others
    starts at the next audience member above it; one above every id is an empty last page.
    The SDK's `receipts` answers the same members."""
    short = [f"store-{i}" for i in (*range(1, 25), 100, 101)]
    long = [f"store-{i}-".ljust(64, "x") for i in range(40)]
    sender = "store-10"
    late = [f"{s}z" for s in short[::3]] + [f"store-{i}-".ljust(64, "y") for i in range(1, 25, 4)]
    audience = sorted(s for s in short + long if s != sender)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        async with h.client(sender) as c:
            conv = await c.create_group("stores", [s for s in short + long if s != sender])
            seq = (await c.send("Inventory count on Monday", conv=conv)).seq
            for s in late:
                await c.invite(conv, s)
            whole = await c.receipts(conv, seq)
        raw = await RawClient.connect(h.server, h.token(sender), "raw", max_frame=1024)
        got = await pages(raw, conv, seq)
        listed = [m for p in got for m in sorted({*p.read, *p.unread})]
        assert listed == audience, listed
        assert len(got) >= 3, len(got)
        for page in got:
            assert len(protocol.encode_frame(protocol.frames.to_wire(page))) - 4 <= 1024
        for after in (sender, "store-1", "store-10-", "store-2"):
            first = (await pages(raw, conv, seq, after=after))[0]
            assert sorted({*first.read, *first.unread})[0] == min(a for a in audience
                                                                  if a > after), after
        assert [p.unread for p in await pages(raw, conv, seq, after="zzz")] == [()]
        await raw.aclose()
    assert list(whole.unread) == audience and whole.read == whole.delivered == ()


async def test_a_page_reads_its_own_members_not_the_conversations(tmp_path):
    """A channel of 300 stores with 64-character ids, paged at the least max_frame (1024
    bytes, about 12 a page): each page's read takes from the store's member rows no more than
    twice the members it lists and a few more. Until 2026-12-07 (review of the `members`
    pages) a page read as many members as 1024 bytes hold of 1-character ids, 513, here
    every row left: paging a group of 100,000 such ids cost the broker's store 7.6 s in 8,334
    pages, against 0.12 s for the whole answer, its event loop held about 1 ms a page."""
    stores = store_ids(300)
    async with running_broker(tmp_path / "data", **SMALL, changes_per_s_per_user=1000) as h:
        conv, seq = await post_notice(h, stores, marks=False)
        raw = await RawClient.connect(h.server, h.token("head-office", "service"),
                                      max_frame=1024)
        after, reads, listed = "", [], []
        while True:
            with counting_rows() as seen, trio.fail_after(10):
                await raw.send(protocol.Receipts(id=len(reads), conv=conv, seq=seq, after=after))
                page = await raw.reply(len(reads))
            reads.append((seen[0], len(page.unread)))
            listed += page.unread
            if not page.more:
                break
            after = page.last
        await raw.aclose()
    assert listed == sorted(stores, key=str.encode)
    assert len(reads) >= 20, reads
    assert_reads_cost_their_pages(reads)


@pytest.mark.parametrize("ids", [store_ids(300), short_ids(600)], ids=["64_chars", "2_chars"])
async def test_a_page_of_members_who_read_reads_no_more_than_twice_what_it_lists(tmp_path, ids):
    """At the least max_frame (1024 bytes), a message every member of the group read (each
    listed twice, in `delivered` and `read`): each page's read takes from the store no more
    member rows than twice the members it lists and a few more. Until 2026-12-07's review a
    page read members until their ids filled the whole max_frame once: 18 rows for a page of
    6 64-character ids, 514 for one of 142 2-character ids."""
    data = tmp_path / "data"
    conv, seq = seeded_group(data, "head-office", ids, "stores", read=True)
    async with running_broker(data) as h:
        raw = await RawClient.connect(h.server, h.token("head-office"), max_frame=1024)
        reads = await rows_per_page(
            raw, lambda i, a: protocol.Receipts(id=i, conv=conv, seq=seq, after=a),
            lambda page: len(page.read) + len(page.unread))
        await raw.aclose()
    assert sum(n for _, n in reads) == len(ids) and len(reads) >= 3, reads
    assert_reads_cost_their_pages(reads)


async def test_the_sdk_asks_a_broker_without_the_cap_once(tmp_path, monkeypatch):
    """Against a broker whose welcome lacks `receipts_paged` (one from before 2026-12-07,
    played by this broker with its caps taken away), the SDK's `receipts` is one request
    without `after`, as CLIENT.md says: a channel that fits is answered whole (its reply the
    frame the broker sends a client from before), one that does not `limit_exceeded`."""
    import broker.handshake

    monkeypatch.setattr(broker.handshake, "CAPS", tuple(
        c for c in CAPS if c != protocol.CAP_RECEIPTS_PAGED))
    stores = store_ids(120)
    async with running_broker(tmp_path / "data", **SMALL) as h:
        conv, seq = await post_notice(h, stores)
        small, small_seq = await post_notice(h, store_ids(6), marks=False)
        async with h.client("head-office", role="service") as hq:
            assert protocol.CAP_RECEIPTS_PAGED not in hq.welcome.caps
            with pytest.raises(ClientError) as refused:
                await hq.receipts(conv, seq)
            assert refused.value.name == "limit_exceeded", refused.value
            whole = await hq.receipts(small, small_seq)
            again = await hq.receipts(small, small_seq)
    # This broker would have answered a page: the refusal says no `after` was sent.
    assert whole.unread == tuple(sorted(store_ids(6), key=str.encode)) and not whole.more
    assert again.id == whole.id + 1  # one request each


async def test_a_page_cut_by_a_reconnect_is_asked_again_from_where_it_was(tmp_path):
    """The connection drops while the SDK waits for the second page (a broker played on the
    real protocol connection, with the cap both times): after the reconnect the SDK asks that
    page again with the same `after`, not the first page, and the merged answer lists each
    member once."""
    asked: list[str | None] = []
    sessions = 0

    async def broker(stream: trio.SocketStream) -> None:
        nonlocal sessions
        sessions += 1
        played = PlayedBroker(stream)
        await played.next_frame()
        await played.send(protocol.Welcome(1, "s", "hq", 0, 1 << 20, 15, 0, 1, CAPS, id=None))
        while (frame := await played.next_frame()) is not protocol.CLOSED:
            if not isinstance(frame, protocol.Receipts):
                continue
            asked.append(frame.after)
            if frame.after == "b" and sessions == 1:
                await stream.aclose()  # the drop, the second page unanswered
                return
            unread, more = (("a", "b"), True) if not frame.after else (("c", "d"), False)
            await played.send(protocol.ReceiptList(
                id=frame.id, conv=frame.conv, seq=frame.seq, delivered=(), read=(),
                unread=unread, more=more, last="b" if more else None))

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, broker, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with open_client(f"127.0.0.1:{port}", "v1.any.token", "cli",
                               deliver=False) as client:
            with trio.fail_after(20):
                marks = await client.receipts("chn:notices", 1)
        nursery.cancel_scope.cancel()
    assert marks.unread == ("a", "b", "c", "d") and not marks.more, marks
    assert asked == ["", "b", "b"] and sessions == 2, (asked, sessions)
