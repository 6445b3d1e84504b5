"""`Store.execute(commands, max_rows=...)` stops a batch at the rows its commands wrote.

The committer passes `--max-batch-rows`; the store counts a command's inbox entries (one at
least) as it runs it, and once the commands run reached the bound it commits them and returns
their outcomes alone: the rest were not run, and leave nothing in the log or the projections.
Checked with the compiled send (storage/_fold.c) and with the Python rules alone.
"""

from __future__ import annotations

import pytest

from storage import store as store_module
from storage.commands import Ack, CreateConv, SendMessage
from storage.store import Store


@pytest.fixture(params=["compiled", "python"])
def send_path(request):
    """Run the sends through the compiled send, where it is built, or the Python rules."""
    if request.param == "compiled" and store_module.SEND_MESSAGE is None:
        pytest.skip("storage/_fold.c is not built")
    saved = store_module.SEND_MESSAGE
    if request.param == "python":
        store_module.SEND_MESSAGE = None
    try:
        yield request.param
    finally:
        store_module.SEND_MESSAGE = saved


def test_a_batch_stops_once_its_commands_wrote_the_bound(tmp_path, send_path):
    """Posts into a group of 5 at a bound of 12: three run (15 entries: 10 before the last,
    under the bound), the others are not run and not logged; a bound never stops the first
    command, and without one the batch runs whole. A refused command and an ack that moves
    nothing count one row each. A bound below 1 is refused."""
    store = Store.open(str(tmp_path / "d"))
    try:
        (out,) = store.execute([CreateConv("a", "d", "user", "group", "g", False,
                                           ("b", "c", "e", "f"))])
        conv = out.reply["conv"]
        posts = [SendMessage("a", "d", "user", f"p{n}", "x", conv=conv) for n in range(6)]
        ran = store.execute(posts, max_rows=12)
        assert [o.reply["seq"] for o in ran] == [1, 2, 3]
        assert [len(o.effects.inbox_heads) for o in ran] == [5, 5, 5]
        logged = [e.data["cid"] for e in store.read_events() if e.type == "message.accepted"]
        assert logged == ["p0", "p1", "p2"]
        assert len(store.execute(posts[3:], max_rows=1)) == 1  # one command at least
        assert len(store.execute(posts[4:])) == 2  # no bound: all of them
        refused = SendMessage("z", "d", "user", "r", "x", conv=conv)  # not a member
        light = [refused, Ack("a", "d", "user", 0), refused, Ack("b", "d", "user", 0)]
        outcomes = store.execute(light, max_rows=3)
        assert len(outcomes) == 3 and outcomes[0].error is not None
        assert store.verify_log() == store.last_lsn()
        with pytest.raises(ValueError, match="max_rows must be at least 1"):
            store.execute(posts, max_rows=0)  # a batch that ran nothing would come back forever
    finally:
        store.close()
