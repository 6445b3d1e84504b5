"""What each command weighs in a group commit: the rows it writes, estimated (`--max-batch-rows`).

The committer (broker/committer.py) cuts a batch where its commands' weights would pass
`--max-batch-rows`; it asks `Weights.of` for each command as it takes a batch, on the event
loop, so nothing here reads the store. The estimate shapes the batch; it does not hold the
bound: the store stops a batch once the commands it ran wrote `--max-batch-rows` rows, counted
as they are written, and commits those, and the committer queues the rest again at the head
(`Store.execute`'s `max_rows`, `Committer._put_back`). So a wrong estimate costs a batch cut
short and taken again, never a commit past the bound by more than its last command's rows:
until 2026-12-06 it cost the commit, and right after a restart posts into a channel of 10,000
(each weighing UNKNOWN_POST_WEIGHT) made a commit of 512 of them, 5.1 million inbox entries.
A post writes an inbox entry per member of its conversation, so it weighs:
- two, a direct message (the sender's entry and the recipient's);
- in a group or channel, the entries the last committed post into it wrote (each commit's
  fan-out tells `posted`; a member joining since adds one, `joined`, a member leaving takes
  one off, `left`), else the members of its roster if the broker holds it (broker/roster.py),
  else UNKNOWN_POST_WEIGHT.
The rosters alone are not enough: only receipts, typing and presence read them, never a post.
Weighed by the cached rosters alone, a 10 s flood of `python -m bench.fairness --target
channel` (4 posters, a channel of 304 members) committed its 4 batches of 4,096 posts weighing
2 each: the channel's roster was not cached.
"""

from __future__ import annotations

from typing import Any

from storage.commands import CreateConv, SendMessage

# A post into a group or channel whose size is not known yet: the broker started (or forgot,
# below) since its last post, and its roster is not cached. A guess between a direct message
# (2) and a big channel: at the default --max-batch-rows a batch takes 512 of them, where an
# unknown post weighing 2 let a batch take 4,096 posts into a channel of 300 (2 s of the
# commit thread); each conversation's weight is known once a post into it commits. A batch
# of a bigger one is stopped by the store at the bound and the rest taken again (above).
UNKNOWN_POST_WEIGHT = 64
# Conversations whose post size is kept; past it all are forgotten together and learnt again
# from the next commits (one int each, ROSTER_CACHE_MAX's count).
POST_SIZES_MAX = 50_000


class Weights:
    """The post sizes learnt from commits, and the weight of a command from them."""

    def __init__(self, rosters: Any) -> None:
        self.rosters = rosters  # the broker's RosterCache: its `cached` rosters, never a read
        self.post_sizes: dict[str, int] = {}  # group or channel -> inbox entries of its post

    def of(self, command: object) -> int:
        """The rows `command`'s commit writes, as estimated: for a post, an inbox entry per
        member of its conversation (above); for a create, a member row per member; one for
        anything else."""
        kind = type(command)
        if kind is SendMessage:
            conv = command.conv  # type: ignore[attr-defined]
            if conv is None or conv.startswith("dm:"):
                return 2
            size = self.post_sizes.get(conv)
            if size is None:
                roster = self.rosters.cached.get(conv)
                return UNKNOWN_POST_WEIGHT if roster is None else roster.size
            return size
        if kind is CreateConv:
            return 1 + len(command.members)  # type: ignore[attr-defined]
        return 1

    def posted(self, conv: str, entries: int) -> None:
        """A post into the group or channel `conv` committed, writing `entries` inbox entries
        (one per member)."""
        sizes = self.post_sizes
        if len(sizes) >= POST_SIZES_MAX and conv not in sizes:
            sizes.clear()
        sizes[conv] = entries

    def joined(self, conv: str) -> None:
        """A member joined `conv` (committed: an invite or a join, never a change of role): its
        next post writes one entry more. Until 2026-12-06 a join was not counted: a channel
        whose last post was its owner's alone, joined by 300 since, weighed its posts 1 each,
        and a batch of 1,000 of them wrote 301,000 entries past a bound of 30,000."""
        size = self.post_sizes.get(conv)
        if size is not None:
            self.post_sizes[conv] = size + 1

    def left(self, conv: str) -> None:
        """A member left `conv` (committed): its next post writes one entry fewer."""
        size = self.post_sizes.get(conv)
        if size is not None:
            self.post_sizes[conv] = max(size - 1, 1)  # (the poster's own entry, at least)
