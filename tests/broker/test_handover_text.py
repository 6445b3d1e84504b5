"""What the last owner or admin of a group is told when a leave would leave it without one,
through a real broker process: the SDK's user calls `set_role`, the command's user runs
`homing role`, and the refusal names both (it said "with set_role" alone until 2026-12-06)."""

from __future__ import annotations

import pytest

from broker.client import ClientError
from tests.procs import BrokerProcess, as_user, homing, last_error, lines


async def test_a_refused_leave_names_set_role_and_homing_role(tmp_path):
    """`leave` by the last owner of a group with members: the SDK's ClientError and the
    command's JSON error are `conflict`, and each names `set_role` and the `homing role`
    command that would hand the group over; done as it says, the leave is taken."""
    with BrokerProcess(tmp_path / "data") as bp:
        async with bp.client("shop") as client:
            conv = await client.create_group("order 9", ["courier"])
            with pytest.raises(ClientError) as refused:
                await client.leave(conv)
        command = homing("leave", conv, env=as_user(bp, "shop"), check=False)
        error = last_error(command.stderr)
        assert (refused.value.name, command.returncode, error["error"]) == (
            "conflict", 1, "conflict"), (refused.value, command)
        for text in (refused.value.message, error["message"]):
            assert "set_role" in text and f"`homing role {conv} USER admin`" in text, text
        homing("role", conv, "courier", "admin", env=as_user(bp, "shop"))
        assert lines(homing("leave", conv, env=as_user(bp, "shop")))[0]["ok"] is True
