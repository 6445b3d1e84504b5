"""`receipts` in pages (PROTOCOL.md §5.2, since 2026-12-07): head office's channel of stores
whose ids have the full 64 characters does not fit one `receipt_list` frame. A `receipts` with
`after` is answered a page of the audience, as many members as fit the max_frame, and the SDK
(and so `homing receipts`) pages by itself: the whole answer, each member once, in the list it
belongs to, equal to what a broker of a big max_frame answers in one reply. Without `after`,
the request is answered as before: whole, or `limit_exceeded`."""

from __future__ import annotations

import pytest
import trio

import protocol
from broker.client import ClientError
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing, lines

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
    out = []
    while True:
        rid = len(out) + 100
        await raw.send(protocol.Receipts(id=rid, conv=conv, seq=seq, after=after))
        with trio.fail_after(10):
            page = await raw.reply(rid)
        assert isinstance(page, protocol.ReceiptList), page
        out.append(page)
        if not page.more:
            return out
        after = page.last


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

        await raw.stream.send_all(protocol.encode_frame(
            {"t": "receipts", "id": 9, "conv": conv, "seq": seq, "after": "störe"}))
        err = await raw.reply(9)
        assert isinstance(err, protocol.Error) and err.name == "invalid" and not err.close, err
        assert "'after'" in err.message, err
        await raw.send(protocol.Ping(id=10))
        assert await raw.reply(10) == protocol.Pong(id=10)
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
    with BrokerProcess(tmp_path / "data", "--max-frame-bytes", "4096",
                       "--max-body-bytes", "1024") as b:

        class H:  # what `post_notice` needs of a harness
            client = b.client

        conv, seq = trio.run(post_notice, H, stores)
        out = lines(homing("receipts", "--conv", conv, "--seq", str(seq),
                           env=as_user(b, "head-office", "service")))
    assert out == [{"conv": conv, "seq": seq, **expected(stores)}]
