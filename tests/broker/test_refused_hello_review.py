"""`connection_closed` of each refused hello names what the operator greps for (docs/OPERATIONS.md,
"Logs"): the user and device once the token verified (a revoked token), the device alone where
the hello's token says nothing trustworthy (another protocol version: the token is not read)."""

from __future__ import annotations

import trio

import protocol as wire
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until


async def _refused(server: str, hello: wire.Hello) -> wire.Error:
    raw = await RawClient.connect(server)
    try:
        await raw.send(hello)
        return await raw.next()
    finally:
        await raw.aclose()


async def test_a_hello_of_another_version_and_a_revoked_token_close_naming_the_device(tmp_path):
    """A hello offering only protocol version 7 is refused `unsupported_version` and its
    `connection_closed` (reason protocol_error) names its device, user null (the token is not
    verified); a revoked token's names its user and device (reason revoked). The device was
    null for the version refusal until 2026-12-06: an old client could not be found by it."""
    with trio.fail_after(30):
        async with running_broker(tmp_path / "data") as h:
            old = h.token("bob")
            async with h.client("root", role="admin") as admin:
                await trio.sleep(1.1)  # revoked: tokens issued before this second
                await admin.revoke_tokens("bob")
            refused = await _refused(h.server, wire.Hello(versions=(7,), token=h.token("carol"),
                                                          device="old-app", id=0))
            assert refused.name == "unsupported_version"
            refused = await _refused(h.server, wire.Hello(versions=(1,), token=old,
                                                          device="phone", id=0))
            assert refused.name == "unauthorized"

            def closed() -> list[tuple]:
                return [(e.get("user"), e.get("device"), e["reason"]) for e in h.logs
                        if e["event"] == "connection_closed" and e.get("user") != "root"]

            await wait_until(lambda: len(closed()) >= 2)
            assert closed() == [(None, "old-app", "protocol_error"),
                                ("bob", "phone", "revoked")]
