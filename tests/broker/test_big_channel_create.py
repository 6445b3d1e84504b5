"""A channel of more stores than one `create` names (docs/CLI.md "Conversations", docs/CLIENT.md
`create_channel` and `invite`): the create is bounded at 1,000 members (PROTOCOL.md §5.2), and
nothing in the docs said so until 2026-12-07, nor how a head office grows its channel past
it. These hold the docs to the bound, and walk the documented way on a real `homing serve`."""
from __future__ import annotations

from pathlib import Path

import trio

from broker.client import ClientError
from protocol.fields import MAX_MEMBERS
from tests.procs import BrokerProcess, as_user, homing, last_error, lines

ROOT = Path(__file__).resolve().parents[2]
HQ = "head-office"


def test_the_docs_name_the_creates_member_bound_and_how_to_grow_past_it():
    """The command reference and the SDK's table both name the bound the protocol checks, and
    send a bigger channel's owner to `invite`."""
    bound = f"{MAX_MEMBERS:,}"
    cli = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    sdk = (ROOT / "docs" / "CLIENT.md").read_text(encoding="utf-8")
    assert f"A create names at most {bound} members" in cli
    assert f"first {bound} members" in cli and "grows by `homing invite`" in cli
    assert f"At most {bound} of them (PROTOCOL.md §5.2)" in sdk
    assert f"created with its first {bound} and grows by `invite`" in sdk
    assert f"not 0 to {bound}`" in cli and f"not 0 to {bound}`" in sdk


def test_a_channel_past_a_creates_bound_is_made_and_grown_as_the_docs_say(tmp_path):
    """`homing channel create` of 1,001 stores exits 1 `invalid` with the message the docs
    quote; one of the first 1,000 is made, the SDK invites 150 more one at a time, sleeping
    `retry_after` when refused past `--change-rate` (on a fast disk some are), and `homing
    members` lists head office and all 1,150 stores."""
    stores = [f"store-{i:04d}-manchester-arndale-centre-unit-{i % 97}" for i in range(1150)]
    with BrokerProcess(tmp_path / "data") as b:
        env = as_user(b, HQ, "service")
        too_many = homing("channel", "create", "notices", "--members",
                          ",".join(stores[:MAX_MEMBERS + 1]), env=env, check=False)
        assert too_many.returncode == 1
        err = last_error(too_many.stderr)
        assert (err["error"], err["code"]) == ("invalid", 7)
        assert err["message"] == ("create: bad value for field 'members': "
                                  f"{MAX_MEMBERS + 1:,} items, not 0 to {MAX_MEMBERS:,}")
        conv = lines(homing("channel", "create", "notices", "--members",
                            ",".join(stores[:MAX_MEMBERS]), env=env))[0]["conv"]

        async def grow() -> None:
            async with b.client(HQ, "hq", role="service", deliver=False) as hq:
                for store in stores[MAX_MEMBERS:]:
                    while True:
                        try:
                            await hq.invite(conv, store)
                            break
                        except ClientError as e:
                            assert e.name == "rate_limited", e
                            await trio.sleep(e.retry_after)

        trio.run(grow)
        listed = lines(homing("members", conv, env=env))[0]
    assert listed["owners"] == [HQ] and listed["admins"] == []
    assert listed["members"] == sorted(stores, key=str.encode)
