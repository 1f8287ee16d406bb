"""Evaluated prompt prefixes that many conversations share (a persona's or card's preamble),
kept once for every channel: a new conversation's slot starts from a copy instead of
evaluating the whole preamble in its first turn.

Each entry is the exact tokens of a prefix and the saved sequence state of a slot that held
exactly those tokens (`llama_state_seq_get_data`), restored into another slot with
`llama_state_seq_set_data`. Bounded by a byte budget, least recently used first out.
Pure bookkeeping; the scheduler saves and restores (bot.engine.scheduler).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PrefixStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0  # conversations that started from a stored prefix
    stored: int = 0  # prefixes saved
    evicted: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], bytes] = collections.OrderedDict()
        self.stats = PrefixStats()

    def share_point(self, preamble: Sequence[int], tokens: Sequence[int], evaluated: int, minimum: int) -> int | None:
        """Where in `tokens` (a prompt) its shared preamble ends, given the preamble's own
        tokens: the tokens both have (never the prompt's last), if at least `minimum`,
        beyond the `evaluated` ones, and not kept yet; else None."""
        if self.budget <= 0:
            return None
        at = min(common_prefix(preamble, tokens), len(tokens) - 1)
        if at < minimum or at <= evaluated or tokens[:at] in self:
            return None
        return at

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def longest(self, tokens: Sequence[int]) -> tuple[list[int], bytes] | None:
        """The longest stored prefix of `tokens` and its state (counted as a hit), or None."""
        best: tuple[int, ...] | None = None
        for key in self._entries:
            if len(key) <= len(tokens) and (best is None or len(key) > len(best)) and tuple(tokens[: len(key)]) == key:
                best = key
        if best is None:
            return None
        self._entries.move_to_end(best)
        self.stats.hits += 1
        return list(best), self._entries[best]

    def put(self, tokens: Sequence[int], state: bytes) -> bool:
        """Keep `state` for `tokens`, evicting the least recently used beyond the budget;
        False (nothing kept) when it alone is over the budget."""
        if len(state) > self.budget:
            return False
        key = tuple(tokens)
        old = self._entries.pop(key, None)
        if old is not None:
            self.stats.bytes -= len(old)
        self._entries[key] = state
        self.stats.bytes += len(state)
        self.stats.stored += 1
        while self.stats.bytes > self.budget:
            _, gone = self._entries.popitem(last=False)
            self.stats.bytes -= len(gone)
            self.stats.evicted += 1
        self.stats.entries = len(self._entries)
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.stats.entries = self.stats.bytes = 0
