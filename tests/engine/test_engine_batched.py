"""The batching engine with the real small GGUF model: correctness, not speed."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine.base import EngineBusy, GenerationRequest, ModelLoadError, SamplingParams
from bot.engine.scheduler import BatchConfig, BatchedEngine

pytestmark = pytest.mark.llama
GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
TOPICS = ["the sea", "stars", "dogs", "cats", "trains", "rain", "bread", "music"]
PROMPTS = [f"### Instruction:\nAnn: Tell me three facts about {t}.\n\n### Response:\n" for t in TOPICS]


def request(prompt: str, max_new: int = 32, conversation: str | None = None, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt, max_new, stop, GREEDY, conversation)


async def start(gguf_path: Path, **kw: int) -> BatchedEngine:
    return await BatchedEngine.start(BatchConfig(gguf_path, **{"n_ctx": 1024, "n_gpu_layers": 0, "n_parallel": 4, **kw}))


@pytest.fixture
async def batched(gguf_path: Path) -> AsyncIterator[BatchedEngine]:
    engine = await start(gguf_path, n_parallel=8)
    yield engine
    await engine.close()


async def alone_texts(gguf_path: Path, prompts: list[str], max_new: int = 32) -> list[str]:
    """Each prompt generated on its own, in a fresh engine (no shared prefixes)."""
    engine = await start(gguf_path, n_parallel=8)
    try:
        return [await engine.submit(request(p, max_new)).text() for p in prompts]
    finally:
        await engine.close()


async def test_batched_greedy_matches_alone(batched: BatchedEngine, gguf_path: Path) -> None:
    """Six conversations at once write exactly what each writes alone. (From 8 tokens per
    batch on, llama.cpp's CPU backend switches matmul kernels and logits move by up to 0.6,
    so greedy texts of 8 at once may part after a few tokens; see docs/engine.md.)"""
    alone = await alone_texts(gguf_path, PROMPTS[:6])
    generations = [batched.submit(request(p)) for p in PROMPTS[:6]]
    together = await asyncio.gather(*(g.text() for g in generations))
    assert all(g.stats.completion_tokens == 32 for g in generations)
    assert together == alone


async def test_affinity_reuses_each_conversations_prefix(batched: BatchedEngine) -> None:
    histories = {f"c{i}": PROMPTS[i] for i in range(4)}
    for turn in range(3):
        for key, prompt in list(histories.items()):
            generation = batched.submit(request(prompt, 8, conversation=key))
            reply = await generation.text()
            if turn > 0:  # everything but the new turn was already evaluated in its slot
                assert generation.stats.reused_tokens >= generation.stats.prompt_tokens - 20
            histories[key] = prompt + reply + f"\n\n### Instruction:\nAnn: more, turn {turn}\n\n### Response:\n"


async def test_a_conversation_restored_from_ram_continues_exactly(gguf_path: Path) -> None:
    """One slot: conversation "a" is evicted to RAM by "b", then continues; it writes exactly
    what it writes in an engine where it never left its slot."""
    engine = await start(gguf_path, n_parallel=1)
    stayed = await start(gguf_path, n_parallel=1)
    try:
        first = await engine.submit(request(PROMPTS[0], 24, conversation="a")).text()
        assert await stayed.submit(request(PROMPTS[0], 24, conversation="a")).text() == first
        follow_up = PROMPTS[0] + first + "\n\n### Instruction:\nAnn: And one more?\n\n### Response:\n"
        await engine.submit(request(PROMPTS[1], 24, conversation="b")).text()  # evicts "a" to RAM
        assert "a" in engine._ram
        restored = engine.submit(request(follow_up, 32, conversation="a"))
        never_left = stayed.submit(request(follow_up, 32, conversation="a"))
        assert await restored.text() == await never_left.text()
        assert restored.stats.reused_tokens == never_left.stats.reused_tokens >= engine.count_tokens(PROMPTS[0])
    finally:
        await engine.close()
        await stayed.close()


async def test_cancelling_one_leaves_the_others_intact(batched: BatchedEngine, gguf_path: Path) -> None:
    alone = await alone_texts(gguf_path, PROMPTS[:3])
    generations = [batched.submit(request(p, 32)) for p in PROMPTS[:3]]
    pieces = aiter(generations[1])
    await anext(pieces)
    generations[1].cancel()
    results = await asyncio.gather(generations[0].text(), generations[2].text())
    assert list(results) == [alone[0], alone[2]]
    assert generations[1].stats.stopped_by == "cancelled"
    assert generations[1].stats.completion_tokens < 32


async def test_stop_sequences_and_limits(batched: BatchedEngine) -> None:
    full = await batched.submit(request(PROMPTS[0], 40)).text()
    stop = full.split()[len(full.split()) // 2]
    cut = batched.submit(request(PROMPTS[0], 40, stop=(stop,)))
    assert await cut.text() == full[: full.index(stop)]
    assert cut.stats.stopped_by == "stop"
    long = batched.submit(request(PROMPTS[0], 5))
    await long.text()
    assert long.stats.stopped_by == "length" and long.stats.completion_tokens == 5


async def test_queue_answers_busy_when_full(gguf_path: Path) -> None:
    engine = await start(gguf_path, n_parallel=1, max_queue=2)
    try:
        running = engine.submit(request(PROMPTS[0], 40))
        pieces = aiter(running)
        await anext(pieces)
        waiting = [engine.submit(request(p, 4)) for p in PROMPTS[1:3]]
        assert [w.position for w in waiting] == [1, 2]
        with pytest.raises(EngineBusy, match="already waiting"):
            engine.submit(request(PROMPTS[3], 4))
        rest = [p async for p in pieces]
        assert rest and running.stats.stopped_by in {"length", "stop"}
        for w in waiting:
            assert await w.text()
    finally:
        await engine.close()


async def test_prompt_longer_than_the_context_is_an_error(batched: BatchedEngine) -> None:
    from bot.engine.base import EngineError

    with pytest.raises(EngineError, match="exceeds the context"):
        await batched.submit(request("word " * 2000, 32)).text()
    assert await batched.submit(request(PROMPTS[0], 4)).text()  # still serving


async def test_hot_swap_keeps_every_slot_serving(batched: BatchedEngine, gguf_path: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:3_000_000])
    running = [batched.submit(request(p, 24)) for p in PROMPTS[:4]]
    with pytest.raises(ModelLoadError, match="could not load corrupt.gguf"):
        await batched.reload(str(corrupt))
    good = tmp_path / "good.gguf"
    shutil.copy(gguf_path, good)
    during = [batched.submit(request(p, 24)) for p in PROMPTS[4:]]
    info = await batched.reload(str(good))
    assert info.name == "good"
    results = await asyncio.gather(*(g.text() for g in running + during))
    assert all(results), "no generation under way or queued was lost"
    assert await batched.submit(request(PROMPTS[0], 4)).text()


async def test_new_conversations_take_adjacent_slots(gguf_path: Path) -> None:
    """llama.cpp attends over every KV stream between the lowest and the highest sequence
    of a batch: requests with nothing to reuse go next to the busy ones, not to the least
    recently used slots wherever they are."""
    engine = await start(gguf_path, n_parallel=8)
    try:
        for slot, used in zip(engine._slots, [0, 5, 1, 6, 2, 7, 3, 8], strict=True):
            slot.last_used = used  # least recently used first: slots 0, 2, 4, 6 (span 6)
        generations = [engine.submit(request(p, 24)) for p in PROMPTS[:4]]
        streams = [aiter(g) for g in generations]
        for stream in streams:
            await anext(stream)  # all four are generating
        assert sorted(s.seq for s in engine._slots if s.job is not None) == [0, 1, 2, 3]
        for stream in streams:
            async for _ in stream:
                pass
    finally:
        await engine.close()


async def test_event_loop_stays_responsive(batched: BatchedEngine) -> None:
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def probe() -> None:
        nonlocal worst
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - before - 0.01)

    task = asyncio.create_task(probe())
    await asyncio.gather(*(batched.submit(request(p, 24)).text() for p in PROMPTS))
    task.cancel()
    assert worst < 0.5  # generous: a blocked loop would stall for the whole generation


def test_auto_parallel_is_capped_and_logged(gguf_path: Path) -> None:
    """`n_parallel=0`: as many slots as free memory holds, up to the cap (the arithmetic,
    with a faked memory reading, is in test_engine_sizing.py)."""
    from bot.engine.batch_context import BatchContext

    small = BatchContext(BatchConfig(gguf_path, n_ctx=1024, n_gpu_layers=0, max_parallel=3))
    try:
        assert small.n_parallel == 3  # this machine's RAM holds far more than 3 slots of 18 MiB
        assert small.sizing.ram_cache_mb == 8 * 18  # 8 conversations of 1024 tokens × 18 KiB
    finally:
        small.close()


def test_greedy_argmax_picks_what_llama_cpps_greedy_sampler_picks(gguf_path: Path) -> None:
    """The fast path for temperature 0 without penalties (numpy argmax over the logits)
    against llama.cpp's greedy sampler chain, token after token of a real generation."""
    from bot.engine.batch_context import BatchContext

    llama = BatchContext(BatchConfig(gguf_path, n_ctx=512, n_gpu_layers=0, n_parallel=1))
    chain = llama.sampler(request(PROMPTS[0]))
    try:
        tokens = llama.tokenize(PROMPTS[0])
        llama.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        index = len(tokens) - 1
        for position in range(len(tokens), len(tokens) + 24):
            fast = llama.argmax(index)
            assert fast == llama.lib.llama_sampler_sample(chain, llama.ctx, index)
            llama.decode([(fast, position, 0, True)])
            index = 0
    finally:
        llama.lib.llama_sampler_free(chain)
        llama.close()
