"""Content policy: rejected bodies are never logged; masked bodies are logged masked."""

from __future__ import annotations

import pytest
import trio

from broker.client import ClientError
from tests.harness import running_broker


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# forbidden\nbadword\nvery bad phrase\n")
    return path


async def test_reject_logs_nothing(tmp_path, words, tally):
    """With action reject a matching send gets rejected_content and the log does not grow."""
    async with running_broker(tmp_path / "data", content_policy=words,
                              content_action="reject") as h:
        with trio.fail_after(20):
            async with h.client("alice") as alice, h.client("bob") as bob:
                r = await alice.send("fine", to="bob")
                before = h.broker.store.last_lsn()
                for text in ("a BadWord here", "that is a very bad phrase!", "badword"):
                    with pytest.raises(ClientError) as e:
                        await alice.send(text, to="bob")
                    assert e.value.name == "rejected_content"
                    tally.add("content policy: rejected send")
                store = h.broker.store
                logged = [e for e in store.read_events(before + 1) if e.type != "delivery.acked"]
                assert logged == []  # (acks of the delivery of "fine" may land meanwhile)
                await alice.send("badwords are fine as a longer word", to="bob")
                page = await bob.history(r.conv, order="oldest")
                assert [m.body for m in page.messages] == [
                    "fine", "badwords are fine as a longer word"]


async def test_mask_stores_the_masked_text(tmp_path, words, tally):
    """With action mask the stored and delivered text has the words starred out."""
    async with running_broker(tmp_path / "data", content_policy=words,
                              content_action="mask") as h:
        with trio.fail_after(20):
            async with h.client("alice") as alice, h.client("bob") as bob:
                r = await alice.send("you BADWORD, a very bad phrase", to="bob")
                d = await bob.deliveries().receive()
                want = "you *******, a ***************"
                assert d.body == want
                page = await bob.history(r.conv)
                assert [m.body for m in page.messages] == [want]
                tally.add("content policy: masked send")
