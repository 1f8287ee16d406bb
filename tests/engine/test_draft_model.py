"""A draft model in the batching engine (DRAFT_MODEL_PATH), with the real small GGUF as its
own draft (every greedy draft should be accepted: the machinery, not a speed-up), another
vocabulary refused at load, the plan that counts what a draft token costs, and a hot swap
to a model the draft cannot serve."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine.base import GenerationRequest, ModelLoadError, SamplingParams
from bot.engine.lookup import plan_drafts
from bot.engine.scheduler import BatchedEngine
from tests.engine.engine_pairs import plain_and, start

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
PROMPT = "### Instruction:\nAnn: Tell me about the sea, the wind and the old lighthouse.\n\n### Response:\n"


def test_the_plan_pays_for_proposing_drafts() -> None:
    """A draft token that costs a target step to propose (a model drafting for itself) never
    pays; one that costs a thirtieth of a step (a 1B drafting for a 70B) does."""
    line = (0.010, 0.0001)  # a GPU: a token more in the batch costs 1% of a step
    assert plan_drafts([(0.9, 4)], line) == [4]
    assert plan_drafts([(0.9, 4)], line, draft_cost=0.010) == [0]
    assert plan_drafts([(0.9, 4)], line, draft_cost=0.010 / 30) == [4]
    assert plan_drafts([(0.5, 4)], line, draft_cost=0.010 / 4) == [1]


def drafting(draft: Path) -> dict[str, object]:
    """The settings of an engine that drafts with `draft`."""
    return {"draft_tokens": 4, "draft_model_path": draft}


@pytest.fixture
async def engines(gguf_path: Path) -> AsyncIterator[tuple[BatchedEngine, BatchedEngine]]:
    async with plain_and(gguf_path, **drafting(gguf_path), draft_always=True) as pair:
        yield pair


@pytest.mark.llama
async def test_greedy_output_is_the_same_and_a_model_drafting_for_itself_is_always_right(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    plain, drafted = engines
    for turn, limit in enumerate((60, 7, 1)):
        without = plain.submit(GenerationRequest(PROMPT, limit, (), GREEDY, f"c{turn}"))
        generation = drafted.submit(GenerationRequest(PROMPT, limit, (), GREEDY, f"c{turn}"))
        assert await generation.text() == await without.text()
        assert generation.stats.completion_tokens == without.stats.completion_tokens
    first = drafted.submit(GenerationRequest(PROMPT, 60, (), GREEDY, "rate"))
    await first.text()
    stats = first.stats
    print(f"draft model = the model: {stats.accepted_tokens}/{stats.drafted_tokens} draft tokens accepted")
    assert stats.drafted_tokens >= 40, stats  # it did draft, at nearly every step
    assert stats.accepted_tokens >= 0.95 * stats.drafted_tokens, stats


@pytest.mark.llama
async def test_sampled_output_with_a_fixed_seed_is_the_same_with_a_draft_model(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    plain, drafted = engines
    for seed in (1, 2):
        sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=seed)
        without = await plain.submit(GenerationRequest(PROMPT, 40, (), sampling, f"s{seed}")).text()
        generation = drafted.submit(GenerationRequest(PROMPT, 40, (), sampling, f"s{seed}"))
        assert await generation.text() == without
    assert generation.stats.drafted_tokens > 0


@pytest.mark.llama
async def test_a_follow_up_turn_and_stop_strings_keep_working_with_a_draft_model(
    engines: tuple[BatchedEngine, BatchedEngine]
) -> None:
    """The draft sequence follows the slot: the follow-up reuses both caches and writes
    what it writes without drafts; a stop string inside an accepted run holds."""
    plain, drafted = engines
    replies = []
    for engine in (plain, drafted):
        first = await engine.submit(GenerationRequest(PROMPT, 40, (), GREEDY, "turns")).text()
        follow_up = PROMPT + first + "\n\n### Instruction:\nAnn: And the wind?\n\n### Response:\n"
        generation = engine.submit(GenerationRequest(follow_up, 40, (), GREEDY, "turns"))
        replies.append((first, await generation.text()))
        assert generation.stats.reused_tokens >= generation.stats.prompt_tokens - 24
    assert replies[0] == replies[1]
    stop = replies[0][0].split()[3]
    without = plain.submit(GenerationRequest(PROMPT, 40, (stop,), GREEDY))
    generation = drafted.submit(GenerationRequest(PROMPT, 40, (stop,), GREEDY))
    assert await generation.text() == await without.text()
    assert generation.stats.stopped_by == "stop"


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF with a vocabulary of 320 tokens (the tiny Llama the trainer's tests use)."""
    from tests.training.conftest import build_tiny_base
    from training.export import export_gguf

    base = build_tiny_base(tmp_path_factory.mktemp("tiny"))
    return export_gguf(base, tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf")


@pytest.mark.llama
async def test_a_draft_model_with_another_vocabulary_is_refused_with_what_to_do(
    gguf_path: Path, other_vocabulary: Path
) -> None:
    with pytest.raises(ModelLoadError) as refused:
        await start(gguf_path, **drafting(other_vocabulary))
    message = str(refused.value)
    assert "tiny.f16.gguf cannot draft" in message and "same vocabulary" in message
    assert "320 tokens" in message, message


@pytest.mark.llama
async def test_a_hot_swap_to_a_model_the_draft_cannot_serve_turns_the_draft_model_off(
    gguf_path: Path, other_vocabulary: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await start(gguf_path, **drafting(gguf_path), draft_always=True)
    try:
        caplog.set_level(logging.WARNING)
        await engine.reload(str(other_vocabulary))
        assert "draft model gemma-3-270m-q4_k_m is off" in caplog.text
        generation = engine.submit(GenerationRequest("Hello", 8, (), GREEDY))
        await generation.text()  # prompt lookup drafts now: no token of the other vocabulary proposed
        assert generation.stats.completion_tokens == 8
        await engine.reload(str(gguf_path))  # back: no draft model any more, drafting by lookup
        assert (await engine.submit(GenerationRequest(PROMPT, 8, (), GREEDY)).text())
    finally:
        await engine.close()
