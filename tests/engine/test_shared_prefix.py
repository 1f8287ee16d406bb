"""A persona's preamble evaluated once for every channel: the store's bound and order
(pure), where a prompt's preamble ends, and with the real small GGUF, a second channel with
the same persona starting from the first one's preamble and writing what it writes without
the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.prompt import preamble_length, render_chat
from bot.core.conversation import Message
from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.prefix_store import PrefixStore
from bot.engine.scheduler import BatchConfig, BatchedEngine

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
CARD = ("Captain Mara Vell keeps the lighthouse on Gull Island. She is gruff, kind, and knows every "
        "ship that has passed the island in forty years. She speaks in short sentences, loves tea and "
        "storms, distrusts the mainland, and keeps a logbook of weather, ships and birds. ") * 3


def test_the_store_keeps_the_longest_prefix_and_stays_within_its_budget() -> None:
    store = PrefixStore(budget_bytes=100)
    assert store.put([1, 2, 3], b"a" * 40) and store.put([1, 2, 3, 4, 5], b"b" * 40)
    assert store.longest([1, 2, 3, 4, 5, 6]) == ([1, 2, 3, 4, 5], b"b" * 40)
    assert store.longest([1, 2, 9]) is None and store.longest([1, 2]) is None
    assert [1, 2, 3] in store
    store.longest([1, 2, 3, 7])  # [1, 2, 3] used last: [1..5] is now the oldest
    assert store.put([7, 8], b"c" * 40)  # 120 bytes > 100: the least recently used goes
    assert [1, 2, 3, 4, 5] not in store and [1, 2, 3] in store and [7, 8] in store
    assert store.stats.bytes == 80 and store.stats.entries == 2 and store.stats.evicted == 1
    assert store.stats.hits == 2
    assert not store.put([9], b"x" * 101) and [9] not in store  # alone over the budget


def test_preamble_length_is_where_the_first_block_starts() -> None:
    text = render_chat([Message("u1", "Ann", "### Instruction:\nhi")], CARD)
    at = preamble_length(text)
    assert text[:at].strip() == CARD.strip() and text[at:].startswith("### Instruction:\n")
    assert preamble_length(render_chat([Message("u1", "Ann", "hi")], "")) == 0


def prompt(question: str) -> str:
    return render_chat([Message("u1", "Ann", question)], CARD)


def request(question: str, conversation: str) -> GenerationRequest:
    text = prompt(question)
    return GenerationRequest(text, 16, (), GREEDY, conversation, shared_prefix_chars=preamble_length(text))


async def start(gguf_path: Path, prefix_cache_mb: int) -> BatchedEngine:
    return await BatchedEngine.start(BatchConfig(gguf_path, n_ctx=1024, n_gpu_layers=0, n_parallel=2,
                                                 prefix_cache_mb=prefix_cache_mb, draft_tokens=0))


@pytest.mark.llama
async def test_a_second_channel_starts_from_the_first_ones_preamble(gguf_path: Path) -> None:
    shared = await start(gguf_path, 64)
    alone = await start(gguf_path, 64)
    try:
        first = shared.submit(request("Who are you?", "chan:1"))
        await first.text()
        assert first.stats.reused_tokens == 0 and shared.prefix_stats().entries == 1
        second = shared.submit(request("What do you drink?", "chan:2"))
        text = await second.text()
        preamble_tokens = second.stats.reused_tokens
        assert preamble_tokens >= 100 and second.stats.prompt_tokens - preamble_tokens < 30
        assert shared.prefix_stats().hits == 1
        # The same question in an engine where it is the first channel (it splits its prompt
        # at the same place, so the computation is the same): the same words.
        assert await alone.submit(request("What do you drink?", "chan:2")).text() == text
    finally:
        await shared.close()
        await alone.close()


@pytest.mark.llama
async def test_no_store_no_sharing(gguf_path: Path) -> None:
    engine = await start(gguf_path, 0)
    try:
        await engine.submit(request("Who are you?", "chan:1")).text()
        second = engine.submit(request("What do you drink?", "chan:2"))
        await second.text()
        assert engine.prefix_stats().entries == 0 and second.stats.reused_tokens < 32
    finally:
        await engine.close()
