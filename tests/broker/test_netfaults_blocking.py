"""The blocking client (broker/client_blocking.py) through a misbehaving network
(tests/netproxy.py, in a thread of its own) to a child broker: a shop's request threads send
with their own cids while the path drops everything, then forwards again."""

from __future__ import annotations

import threading

from broker.client_blocking import connect
from tests.netproxy import ThreadedFaultProxy
from tests.procs import BrokerProcess
from tests.waits import HANG_GUARD_S, wait_until_sync


def _timed_out(bp: BrokerProcess, user: str) -> bool:
    return any(e.get("event") == "connection_closed" and e.get("user") == user
               and e.get("reason") == "timeout" for e in bp.log_events())


def test_request_threads_through_a_blackhole_send_each_order_once(tmp_path):
    """Four threads send 10 orders each with their cids; the path holds everything both ways
    (no FIN, no RST) meanwhile: the client drops the link by its heartbeat, the broker times
    the session out, and once the path forwards again every send returns, each order is in
    the conversation once, and the deliveries bob sent meanwhile all arrive, in order."""
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1") as bp, \
            ThreadedFaultProxy(bp.server) as proxy, \
            connect(proxy.address, bp.token("shop"), "web", reconnect_timeout=None) as shop, \
            connect(bp.server, bp.token("bob"), "d1") as bob:
        shop.send("open", to="bob", cid="order-0000")
        proxy.stall("both")
        results: dict = {}
        errors: list = []

        def orders(worker: int) -> None:
            try:
                for i in range(10):
                    cid = f"order-{worker}{i:03}"
                    results[cid] = shop.send(f"order {cid}", to="bob", cid=cid)
            except BaseException as exc:  # the test reads it
                errors.append(exc)

        threads = [threading.Thread(target=orders, args=(w,)) for w in range(1, 5)]
        for t in threads:
            t.start()
        for i in range(20):
            bob.send(f"b{i}", to="shop")
        assert wait_until_sync(lambda: proxy.accepted >= 2)  # the client left that link
        assert wait_until_sync(lambda: _timed_out(bp, "shop"))  # the broker freed it
        proxy.resume()
        for t in threads:
            t.join(HANG_GUARD_S)
        assert not errors and len(results) == 40
        got = []
        while len(got) < 20:
            d = shop.next_delivery(timeout=HANG_GUARD_S)
            assert d is not None
            got.append(d.body)
            shop.ack(d)
        assert got == [f"b{i}" for i in range(20)]
        page = bob.history("dm:bob:shop", limit=200, order="oldest")
        cids = [m.cid for m in page.messages if m.sender == "shop"]
        assert sorted(cids) == sorted(["order-0000", *results])
        assert shop.reconnects >= 1
