"""`homing serve` reads its signing keys once, as it starts, and serves with what it read: a
review of leftovers (2026-12-06), run against a real broker process.

It read `secret.key` to check it (and make it if missing), opened the store, and read it again
for the broker. A store's open may take minutes (a rebuild, a catch-up; here, another
process's write lock on it), and a file changed meanwhile gave a broker of other keys than the
one checked: one deleted, a new key made, every token of the first refused; one cut short, a
traceback and no broker. Now the keys read first are the broker's, and a change after that is
taken up as any change of the files is (`signing_keys_unreadable`, the current key kept).
"""

from __future__ import annotations

import os

import pytest
import trio

from broker import tokens
from broker.client import open_client
from tests.procs import BrokerProcess
from tests.stalls import held_commits


def _cut_short(path) -> None:
    """Replace the key file by one half as long, as a full disk would leave it."""
    tmp = path.with_name("cut.tmp")
    tmp.write_bytes(path.read_bytes()[:16])
    os.replace(tmp, path)


async def _until_listening(bp: BrokerProcess) -> None:
    """Wait until the child `bp` spawned accepts connections (failing if it exits)."""
    while True:
        assert bp.alive(), bp.log_tail()
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", bp.port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


@pytest.mark.parametrize("change", [_cut_short, os.unlink], ids=["cut_short", "deleted"])
async def test_a_key_file_changed_while_the_store_opens_leaves_the_broker_its_key(tmp_path,
                                                                                  change):
    """`secret.key` cut short, or deleted, while `homing serve` waits for its store (after it
    read the key): the broker starts, holds the key it read (`signing_keys_loaded`), accepts
    a token of it, and logs the file it cannot read."""
    data = tmp_path / "data"
    bp = BrokerProcess(data)
    await bp.astart()  # a data directory with its store, then stopped
    assert await bp.aterminate() == 0
    key = data / tokens.SECRET_FILE
    key.chmod(0o644)  # so that serve says when it has read it: `secret_key_exposed`
    token = bp.token("shop")
    try:
        with trio.fail_after(60):
            async with held_commits(data):  # the store's open waits for our write lock
                bp.spawn()
                while not any(e["event"] == "secret_key_exposed" for e in bp.log_events()):
                    assert bp.alive(), bp.log_tail()
                    await trio.sleep(0.05)
                change(key)
            await _until_listening(bp)
            async with open_client(bp.server, token, "d1") as client:
                await client.ping()
                assert client.user == "shop"
            while not any(e["event"] == "signing_keys_unreadable" for e in bp.log_events()):
                await trio.sleep(0.05)
    finally:
        bp.kill()
    loaded = [e["key_id"] for e in bp.log_events() if e["event"] == "signing_keys_loaded"]
    assert loaded[-1] == tokens.key_id(bp.secret), loaded
