"""Content policy: forbidden words, rejected or masked before a message is logged.

The policy file holds one word or phrase per line; blank lines and lines starting with `#` are
ignored, and a byte order mark at its start too. Matching is case-insensitive on whole words;
the words of a phrase match apart by any whitespace (spaces, tabs, line breaks, however many).
Binary bodies are not inspected.
"""

from __future__ import annotations

import re
from pathlib import Path

ACTIONS = ("reject", "mask")


class ContentPolicy:
    """Applies the forbidden-word list with one action."""

    def __init__(self, words: list[str], action: str = "reject") -> None:
        if action not in ACTIONS:
            raise ValueError(f"content action must be one of {ACTIONS}, not {action!r}")
        self.action = action
        self.words = [" ".join(w.split()) for w in words if w.strip()]
        alternation = "|".join(r"\s+".join(map(re.escape, w.split()))
                               for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    @classmethod
    def load(cls, path: Path, action: str = "reject") -> ContentPolicy:
        """Read a policy file."""
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        words = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not words:
            raise ValueError(f"content policy {path} holds no words")
        return cls(words, action)

    def apply(self, body: str | bytes) -> tuple[str | bytes | None, bool]:
        """(body to log, matched). With action reject a matching body comes back as None."""
        if not isinstance(body, str) or not self._pattern.search(body):
            return body, False
        if self.action == "reject":
            return None, True
        return self._pattern.sub(lambda m: "*" * len(m.group(0)), body), True
