"""Prompt-lookup speculative decoding in the batching engine: the drafter and its acceptance
record (pure), the acceptance rule against the textbook one, and, with the real small GGUF,
the same tokens with and without speculation (greedy, and sampled with a fixed seed), stop
strings and the token limit, and a follow-up turn on the KV cache a speculative reply left."""

from __future__ import annotations

import collections
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.lookup import Acceptance, PromptLookup, StepCost, plan_drafts
from bot.engine.scheduler import BatchedEngine
from tests.engine.engine_pairs import plain_and, start

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=1234)
QUOTE = ("The old lighthouse keeper, Mara Vell, climbed the ninety-nine steps of the tower on "
         "Gull Island every evening at dusk, lit the great lamp, and wrote the weather in her logbook.")
RECAP = (f"### Instruction:\nAnn: Here is the scene so far:\n\n{QUOTE}\n\nRepeat the scene above word for word.\n\n"
         "### Response:\n")


# ---- the drafter (pure) ----------------------------------------------------------------


def test_lookup_drafts_what_followed_the_longest_matching_tail() -> None:
    lookup = PromptLookup([5, 6, 7, 8, 9, 1, 2, 6, 7], max_draft=3)
    assert lookup.draft() == [8, 9, 1]  # "6 7" was followed by "8 9 1"
    lookup.extend(8)
    assert lookup.draft() == [9, 1, 2]  # "6 7 8" → "9 1 2"
    assert lookup.draft(limit=1) == [9]
    assert PromptLookup([1, 2, 3, 4], max_draft=4).draft() == []  # the tail never occurred before


def test_lookup_prefers_the_latest_occurrence_and_never_matches_itself() -> None:
    lookup = PromptLookup([3, 1, 10, 3, 1, 20, 3, 1], max_draft=2)
    assert lookup.draft() == [20, 3]
    alone = PromptLookup([4, 4, 4], max_draft=3)
    assert alone.draft() == [4]  # "4 4" once before, followed by "4"; never itself
    assert PromptLookup([7, 1, 2, 7], max_draft=3).draft() == []  # a one-token match is not enough


def test_acceptance_pauses_a_conversation_whose_drafts_are_rejected_and_probes_again() -> None:
    record = Acceptance(min_gain=0.6, warmup=3, pause=5)
    steps = 0
    while record.wants():
        record.record(4, 0)
        steps += 1
        assert steps < 20
    assert record.resting == 4 and record.rate == 0.0  # this step was the first of the pause
    assert [record.wants() for _ in range(5)] == [False] * 4 + [True]
    record.record(4, 0)  # the probe fails: twice the pause
    assert [record.wants() for _ in range(11)] == [False] * 10 + [True]
    for _ in range(10):
        record.record(4, 3)  # this probe finds drafts that pay: drafting goes on
        assert record.wants()
    assert record.pause == 5 and record.rate > 0.4


def test_step_cost_learns_a_fixed_part_and_a_part_per_token() -> None:
    cost = StepCost()
    assert cost.line() is None
    cost.observe(1, 0.030)
    fixed, per_token = cost.line()  # one size seen: the prior share
    assert per_token == pytest.approx(0.3 * 0.030) and fixed == pytest.approx(0.7 * 0.030)
    for tokens in [1, 5, 3, 1, 5, 2] * 5:
        cost.observe(tokens, 0.020 + 0.008 * tokens)
    fixed, per_token = cost.line()
    assert fixed == pytest.approx(0.020, rel=0.05) and per_token == pytest.approx(0.008, rel=0.05)


def test_plan_takes_drafts_while_they_raise_tokens_per_second() -> None:
    gpu = (0.030, 0.0003)  # a token more is nearly free: every draft that may be accepted pays
    cpu = (0.002, 0.008)  # nearly all of a step is per token: only drafts that are nearly sure pay
    assert plan_drafts([(0.9, 4), (0.6, 4)], gpu) == [4, 4]
    assert plan_drafts([(0.9, 4), (0.3, 4)], gpu) == [4, 2]  # 0.3**3 of a token is not worth even that
    assert plan_drafts([(0.5, 4)], cpu) == [0]
    assert plan_drafts([(0.99, 4)], cpu) == [4]
    middle = plan_drafts([(0.8, 6)], (0.020, 0.008))
    assert 0 < middle[0] < 6  # the first drafts pay, the far ones (0.8**i small) do not
    assert plan_drafts([(0.9, 4)], None) == [0] and plan_drafts([(0.9, 0)], gpu) == [0]


def test_a_cost_line_that_does_not_rise_never_makes_drafts_free() -> None:
    cost = StepCost()
    for tokens, seconds in [(1, 0.030), (5, 0.028)] * 5:  # noise: bigger steps measured faster
        cost.observe(tokens, seconds)
    fixed, per_token = cost.line()
    assert per_token > 0 and fixed >= 0  # the prior share, not a free token
    assert plan_drafts([(0.0, 16)], cost.line()) == [0] and plan_drafts([(0.0, 4)], (0.03, 0.0)) == [0]


def test_sample_then_compare_is_the_speculative_sampling_rule_for_a_certain_draft() -> None:
    """The textbook rule (accept draft x with probability min(1, p(x)/q(x)), else sample from
    max(0, p - q) normalized), written out here with q certain of its token, gives the same
    distribution as what `_verify` does: sample from p, keep the draft when it is the sample."""
    rng = random.Random(3)
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    tokens = range(len(p))

    def textbook(draft: int) -> int:
        q = [1.0 if t == draft else 0.0 for t in tokens]
        if rng.random() < min(1.0, p[draft] / q[draft]):
            return draft
        residual = [max(0.0, p[t] - q[t]) for t in tokens]
        return rng.choices(list(tokens), weights=residual)[0]

    def ours(draft: int) -> int:
        return rng.choices(list(tokens), weights=p)[0]  # the sample is the output either way

    n = 40_000
    for draft in (0, 3):
        for rule in (textbook, ours):
            counts = collections.Counter(rule(draft) for _ in range(n))
            for t in tokens:
                assert abs(counts[t] / n - p[t]) < 0.01, (rule.__name__, draft, t)


# ---- the engine, with the real small model -------------------------------------------------


@pytest.fixture
async def engines(gguf_path: Path) -> AsyncIterator[tuple[BatchedEngine, BatchedEngine]]:
    async with plain_and(gguf_path, draft_tokens=4) as pair:
        yield pair


@pytest.mark.llama
async def test_greedy_output_is_token_for_token_the_same_with_speculation(
    engines: tuple[BatchedEngine, BatchedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own plan decides; its step costs are fixed at a GPU's shape (30 ms a
    step, 0.3 ms a token more), where drafts pay, so that it drafts on any host."""
    monkeypatch.setattr(StepCost, "line", lambda self: (0.03, 0.0003))
    plain, speculative = engines
    without = plain.submit(GenerationRequest(RECAP, 48, (), GREEDY, "a"))
    with_drafts = speculative.submit(GenerationRequest(RECAP, 48, (), GREEDY, "a"))
    assert await with_drafts.text() == await without.text()
    stats = with_drafts.stats
    assert stats.completion_tokens == without.stats.completion_tokens
    assert stats.accepted_tokens >= 10, stats  # it did speculate, and the model agreed
    assert without.stats.drafted_tokens == 0


@pytest.mark.llama
async def test_sampled_output_with_a_fixed_seed_is_the_same_with_speculation(
    engines: tuple[BatchedEngine, BatchedEngine], gguf_path: Path
) -> None:
    """Sampling each position in order from the same logits with the same chain draws the
    same random numbers: the reply without speculation is the reference. Drafting at every
    step (whether the engine's cost plan would pay for it depends on this host's timings)."""
    plain, _ = engines
    speculative = await start(gguf_path, draft_tokens=4, draft_always=True)
    try:
        drafted = 0
        for seed in (1, 2, 3):
            sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=seed)
            without = await plain.submit(GenerationRequest(RECAP, 40, (), sampling, f"s{seed}")).text()
            generation = speculative.submit(GenerationRequest(RECAP, 40, (), sampling, f"s{seed}"))
            assert await generation.text() == without
            drafted += generation.stats.drafted_tokens
        assert drafted > 0
    finally:
        await speculative.close()


@pytest.mark.llama
async def test_stop_strings_and_the_token_limit_hold_inside_accepted_drafts(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    plain, speculative = engines
    for stop, limit in ((("Gull Island",), 48), ((), 7), ((), 1)):
        without = plain.submit(GenerationRequest(RECAP, limit, stop, GREEDY))
        with_drafts = speculative.submit(GenerationRequest(RECAP, limit, stop, GREEDY))
        text = await with_drafts.text()
        assert text == await without.text()
        assert with_drafts.stats.completion_tokens == without.stats.completion_tokens <= limit
        assert with_drafts.stats.stopped_by == without.stats.stopped_by
        if stop:
            assert "Gull Island" not in text and with_drafts.stats.stopped_by == "stop"


@pytest.mark.llama
async def test_the_next_turn_reuses_the_cache_a_speculative_reply_left(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    """Rejected drafts leave the KV cache: the follow-up reuses the slot and writes what it
    writes without speculation."""
    plain, speculative = engines
    replies = []
    for engine in (plain, speculative):
        first = await engine.submit(GenerationRequest(RECAP, 40, (), GREEDY, "turns")).text()
        follow_up = RECAP + first + "\n\n### Instruction:\nAnn: Now say who Mara Vell is.\n\n### Response:\n"
        generation = engine.submit(GenerationRequest(follow_up, 40, (), GREEDY, "turns"))
        replies.append((first, await generation.text()))
        assert generation.stats.reused_tokens >= generation.stats.prompt_tokens - 24
    assert replies[0] == replies[1]


@pytest.mark.llama
async def test_two_conversations_at_once_draft_nothing_and_write_the_same(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    """Beside another sequence a draft costs a decode pass of its own (llama.cpp's equal
    micro-batches with one KV stream per slot): none are made while two generate."""
    plain, speculative = engines
    prompts = [RECAP, RECAP.replace("Repeat", "Now repeat")]
    expected = [await plain.submit(GenerationRequest(p, 24, (), GREEDY, f"p{i}")).text() for i, p in enumerate(prompts)]
    together = [speculative.submit(GenerationRequest(p, 24, (), GREEDY, f"t{i}")) for i, p in enumerate(prompts)]
    texts = [await g.text() for g in together]
    assert sum(g.stats.drafted_tokens for g in together) < 8  # at most the steps one ran alone
    assert texts == expected


@pytest.mark.llama
async def test_drafts_that_do_not_pay_stop(gguf_path: Path) -> None:
    """A reply with nothing to quote: the few drafts tried are mostly rejected, and the
    conversation stops drafting instead of paying for them at every step."""
    engine = await start(gguf_path, draft_tokens=4)
    try:
        prompt = "### Instruction:\nAnn: Invent a brand new word and define it.\n\n### Response:\n"
        generation = engine.submit(GenerationRequest(prompt, 64, (), SAMPLED, "noquote"))
        await generation.text()
        stats = generation.stats
        assert stats.drafted_tokens < 4 * stats.completion_tokens / 2, stats
    finally:
        await engine.close()
