"""Prompt-lookup drafts for speculative decoding: guess the next tokens of a reply by finding
its last few tokens earlier in the prompt or the reply, and proposing what followed them
there. Roleplay replies repeat names, places and phrasing from the card and the history;
replies quote code and text from the conversation. No second model is needed.

`PromptLookup` keeps, for each n-gram size, where each n-gram last occurred (with a token
after it), so a draft costs a dictionary lookup per size, not a scan of the context.

`Acceptance` decides whether drafting pays for a conversation: a draft costs the verifying
decode its extra tokens, so a conversation whose drafts are rejected stops drafting (and
tries again now and then); it carries over to the conversation's next turn.

Pure: no llama.cpp here; the scheduler verifies the drafts (bot.engine.scheduler).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # the longest tail matched
MIN_NGRAM = 2  # one-token matches guess wrong more often than they pay (measured)


class PromptLookup:
    def __init__(self, context: Sequence[int], max_draft: int, max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM) -> None:
        self.max_draft = max_draft
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.context: list[int] = []
        self._last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        for token in context:
            self.extend(token)

    def extend(self, token: int) -> None:
        """`token` follows the context: the n-grams ending just before it now have a continuation."""
        end = len(self.context)
        self.context.append(token)
        for n in self.sizes:
            if end >= n:
                self._last[n][tuple(self.context[end - n : end])] = end

    def draft(self, limit: int | None = None) -> list[int]:
        """Up to `limit` (default `max_draft`) tokens that followed the latest earlier
        occurrence of the context's longest matching tail; [] when nothing matches."""
        limit = self.max_draft if limit is None else min(limit, self.max_draft)
        if limit <= 0:
            return []
        length = len(self.context)
        for n in self.sizes:
            if length < n:
                continue
            start = self._last[n].get(tuple(self.context[length - n :]))
            if start is not None:
                return self.context[start : start + limit]
        return []


class Acceptance:
    """Whether a conversation's drafts pay: accepted draft tokens per drafting step, as a
    moving average. Below `min_gain` after `warmup` steps, drafting pauses for `pause`
    steps, then one step probes again; a probe that fails doubles the pause (up to
    `max_pause`), one that pays resets it."""

    def __init__(self, min_gain: float = 0.6, warmup: int = 3, pause: int = 32, weight: float = 0.2,
                 max_pause: int = 512) -> None:
        self.min_gain, self.warmup, self.weight = min_gain, warmup, weight
        self.pause, self.first_pause, self.max_pause = pause, pause, max_pause
        self.gain = 1.0  # optimistic until measured
        self.steps = 0  # drafting steps measured
        self.resting = 0  # steps left without drafting
        self.drafted = 0
        self.accepted = 0

    def wants(self) -> bool:
        """Whether to draft this step (counts a resting step down)."""
        if self.resting > 0:
            self.resting -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        probing = self.gain == self.min_gain and self.steps > self.warmup
        self.gain = (1 - self.weight) * self.gain + self.weight * accepted
        if self.steps >= self.warmup and self.gain < self.min_gain:
            if probing:
                self.pause = min(self.max_pause, self.pause * 2)
            self.resting = self.pause
            self.gain = self.min_gain  # the probe after the pause starts at the threshold
        elif probing:
            self.pause = self.first_pause

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
