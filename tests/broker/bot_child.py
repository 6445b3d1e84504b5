"""The bot of docs/CLIENT.md ("A bot answering many customers"), run as written there but for
its `answer`, which stands for the bot's own work: a question whose body starts with "slow"
takes `--slow` seconds, one that starts with "hang" never ends. Run by
tests/broker/test_bot_review.py as a real child process, SIGKILLed and started again.

    python -m tests.broker.bot_child [--limit S] [--slow S] [--ack]  # HOMING_SERVER, HOMING_TOKEN

`--limit` sets the guide's LIMIT_S (default: none at all); `--ack` calls a plain cumulative
`ack` where the guide calls `done` (to measure what `done` costs).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import trio

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLIENT.md"


def guide_code() -> str:
    """The guide's bot, without its last line (`trio.run(main)`)."""
    text = DOC.read_text(encoding="utf-8").split("## A bot answering many customers", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    head, run = code.rstrip().rsplit("\n", 1)
    assert run == "trio.run(main)", run
    return head


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=float, default=math.inf)
    p.add_argument("--slow", type=float, default=0.5)
    p.add_argument("--ack", action="store_true")
    args = p.parse_args()
    code = guide_code()
    if args.ack:
        assert code.count("await client.done(d)") == 1
        code = code.replace("await client.done(d)", "await client.ack(d)")
    bot: dict = {"__name__": "bot"}
    exec(compile(code, str(DOC), "exec"), bot)

    async def answer(d):
        print(f"answering {d.conv}:{d.seq}", flush=True)  # the test counts the repeats
        if d.body.startswith("slow"):
            await trio.sleep(args.slow)
        elif d.body.startswith("hang"):
            await trio.sleep_forever()
        return f"re: {d.body}"

    bot["answer"], bot["LIMIT_S"] = answer, args.limit
    trio.run(bot["main"])


if __name__ == "__main__":
    main()
