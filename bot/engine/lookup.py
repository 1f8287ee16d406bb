"""Prompt-lookup drafts for speculative decoding: guess the next tokens of a reply by finding
its last few tokens earlier in the prompt or the reply, and proposing what followed them
there. Roleplay replies repeat names, places and phrasing from the card and the history;
replies quote code and text from the conversation. No second model is needed.

`PromptLookup` keeps, for each n-gram size, where each n-gram last occurred (with a token
after it), so a draft costs a dictionary lookup per size, not a scan of the context.

Whether a draft pays depends on the conversation and on the machine. `Acceptance` keeps a
conversation's record (the chance that a draft token is accepted; a conversation whose
drafts are rejected pauses drafting and tries again now and then; it carries over to the
conversation's next turn). `StepCost` learns what a decode step costs here, a fixed part
and a part per token in the batch (on a GPU a token more is nearly free; on a CPU with
many conversations at once it is not). `plan_drafts` then takes, across the step's
conversations, the drafts whose expected accepted tokens add more throughput than their
verification costs, best first.

Pure: no llama.cpp here; the scheduler verifies the drafts (bot.engine.scheduler).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MAX_NGRAM = 3  # the longest tail matched
MIN_NGRAM = 2  # one-token matches guess wrong more often than they pay (measured)


class DraftSource(Protocol):
    """Where a generation's drafts come from: this module's `PromptLookup`, or a draft
    model (bot.engine.draft_model.ModelDrafts)."""

    seconds_per_token: float  # what proposing a token costs (0 for a lookup)

    def extend(self, token: int) -> None: ...

    def draft(self, limit: int) -> list[int]: ...


class PromptLookup:
    seconds_per_token = 0.0  # a dictionary lookup

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
        self.chance = 0.6  # moving average of the share of drafted tokens accepted
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
        self.chance = (1 - self.weight) * self.chance + self.weight * accepted / drafted
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


class StepCost:
    """Seconds a decode step takes for n tokens, as `fixed + per_token * n`: a least-squares
    line over recent steps (exponentially weighted). Before the steps vary in size, a token
    is assumed to cost `prior_share` of a step's time per token, which lets drafting start
    and so measure."""

    def __init__(self, decay: float = 0.98, prior_share: float = 0.3) -> None:
        self.decay, self.prior_share = decay, prior_share
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._n = d * self._n + tokens
        self._t = d * self._t + seconds
        self._nn = d * self._nn + tokens * tokens
        self._nt = d * self._nt + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None before any step."""
        if self._w == 0:
            return None
        n, t = self._n / self._w, self._t / self._w
        variance = self._nn / self._w - n * n
        if variance > 0.25:
            per_token = (self._nt / self._w - n * t) / variance
            if 0 < per_token and per_token * n <= t:  # a rising line with a fixed part >= 0: trust it
                return t - per_token * n, per_token
        per_token = self.prior_share * t / max(1.0, n)
        return t - per_token * n, per_token


def plan_drafts(candidates: list[tuple[float, int]], cost: tuple[float, float] | None,
                draft_cost: float = 0.0) -> list[int]:
    """How many of its draft tokens each sequence verifies this step. `candidates`: per
    generating sequence, (the chance a draft token of it is accepted, the draft tokens it
    has). The i-th draft of a sequence is worth chance**i expected tokens; drafts are taken
    best first while they raise the step's tokens per second:
    value / (per_token + draft_cost) > (tokens so far) / (time so far), where `draft_cost`
    is what proposing a draft token costs (a draft model's decode; 0 for a lookup)."""
    taken = [0] * len(candidates)
    if cost is None:
        return taken
    fixed, per_token = cost
    per_draft = max(per_token, 1e-9) + max(draft_cost, 0.0)
    items = sorted(((chance ** i, j) for j, (chance, length) in enumerate(candidates) for i in range(1, length + 1)),
                   reverse=True)
    tokens = float(len(candidates))  # each sequence's own next token
    seconds = fixed + per_token * len(candidates)
    for value, j in items:
        if value <= 0 or value * seconds <= per_draft * tokens:
            break
        taken[j] += 1
        tokens += value
        seconds += per_draft
    return taken


@dataclass
class Drafter:
    """One generation's drafting: where its drafts come from and its conversation's record."""

    source: DraftSource
    acceptance: Acceptance


class Speculation:
    """The engine's drafting policy: each conversation's `Acceptance` (kept across turns, the
    most recent `limit`), what a step costs here (`StepCost`), and per step which drafts to
    verify.

    Drafts only while one sequence generates: with one KV stream per slot llama.cpp splits a
    batch into micro-batches that take the same number of tokens from every sequence, so one
    sequence's drafts beside others' single tokens cost a decode pass per draft (measured: 8
    conversations, 70 ms a step without drafts, 126 with)."""

    def __init__(self, draft_tokens: int, limit: int = 4096, always: bool = False) -> None:
        self.draft_tokens, self.limit = draft_tokens, limit
        self.always = always  # draft `draft_tokens` every step, paying or not (to measure the machinery)
        self.cost = StepCost()
        self._records: collections.OrderedDict[str, Acceptance] = collections.OrderedDict()

    def drafter(self, prompt: Sequence[int], conversation: str | None,
                source: DraftSource | None = None) -> Drafter | None:
        """A generation's drafting: prompt lookup over `prompt`, or `source` (a draft model)."""
        if self.draft_tokens <= 0:
            return None
        record = Acceptance() if conversation is None else self._records.pop(conversation, None) or Acceptance()
        if conversation is not None:
            self._records[conversation] = record
            while len(self._records) > self.limit:
                self._records.popitem(last=False)
        return Drafter(source or PromptLookup(prompt, self.draft_tokens), record)

    def plan(self, offers: Sequence[tuple[Drafter | None, int]]) -> list[list[int]]:
        """The draft tokens each ready sequence verifies this step. `offers`: per sequence,
        its drafter and how many tokens it may still take (limit, context, batch). The
        number is planned first, so a draft model proposes only tokens that pay."""
        if len(offers) != 1:
            return [[] for _ in offers]
        drafter, room = offers[0]
        room = min(room, self.draft_tokens)
        if drafter is None or room <= 0:
            return [[]]
        if self.always:
            return [drafter.source.draft(room)]
        if not drafter.acceptance.wants():
            return [[]]
        count = plan_drafts([(drafter.acceptance.chance, room)], self.cost.line(),
                            drafter.source.seconds_per_token)[0]
        return [drafter.source.draft(count)[:count]] if count else [[]]

    def observe(self, sequences: int, tokens: int, seconds: float) -> None:
        """A decode step and its verification took `seconds` (learned from one-sequence steps)."""
        if sequences == 1:
            self.cost.observe(tokens, seconds)

    def new_model(self) -> None:
        self.cost = StepCost()
