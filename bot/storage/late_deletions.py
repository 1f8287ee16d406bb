"""Deletions that Discord reported before the message they delete was stored.

Discord tells everyone at once: a part of a reply is visible (and can be deleted, by a
person or a moderation bot within milliseconds) while Discord's answer to the bot's POST,
which carries the part's id, is still on its way; a message can be deleted while the bot is
still storing it. A deletion that matches nothing stored is kept here for a while, and the
store erases the message as soon as it stores that id (`Store.delete_message` and the
writes that store Discord ids consult it). Bounded: at most `limit` ids, `keep_seconds` each.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable

KEEP_SECONDS = 600.0  # far longer than any answer takes to come back
LIMIT = 10_000


class LateDeletions:
    """Ids deleted in Discord that the store did not hold yet (Discord ids are unique)."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS, limit: int = LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_seconds, self.limit, self.clock = keep_seconds, limit, clock
        self._deleted: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._deleted)

    def add(self, platform_id: str) -> None:
        self._deleted[platform_id] = self.clock()
        self._deleted.move_to_end(platform_id)
        self._prune()

    def take(self, platform_ids: Iterable[str | None]) -> list[str]:
        """Those of `platform_ids` deleted before they were stored (each returned once)."""
        if not self._deleted:
            return []
        self._prune()
        return [i for i in dict.fromkeys(platform_ids) if i is not None and self._deleted.pop(i, None) is not None]

    def _prune(self) -> None:
        oldest = self.clock() - self.keep_seconds
        while self._deleted and (len(self._deleted) > self.limit or next(iter(self._deleted.values())) < oldest):
            self._deleted.popitem(last=False)
