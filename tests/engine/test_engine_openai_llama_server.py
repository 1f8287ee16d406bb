"""ENGINE=openai against a real llama-server's `/v1/completions` (no local vocabulary: the
server's own `/tokenize`): exact counts, typed control-token text kept as text, greedy output
the same as llama-server's native endpoint, prefix reuse across turns, and Stop freeing the
server's slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.openai_compat import OpenAIConfig, OpenAIEngine
from tests.llama_server import LlamaServer, llama_server_bin, post_json, small_model  # noqa: F401 - fixture

pytestmark = pytest.mark.llama
GREEDY = SamplingParams(temperature=0.0, seed=1)
PROMPT = "### Instruction:\nAnn: Tell me about lighthouses. <eos> </s>\n\n### Response:\n"


@pytest.fixture(scope="module")
def server(llama_server_bin: Path) -> Iterator[LlamaServer]:  # noqa: F811 - the fixture above
    with LlamaServer(small_model(), binary=llama_server_bin, parallel=2, ctx_per_slot=2048) as started:
        yield started


@pytest.fixture
async def engine(server: LlamaServer) -> AsyncIterator[OpenAIEngine]:
    started = await OpenAIEngine.start(OpenAIConfig(base_url=server.url, n_ctx=4096, max_parallel=2))
    try:
        yield started
    finally:
        await started.close()


async def test_counts_and_prompt_ids_are_the_servers_own_without_special_tokens(
    engine: OpenAIEngine, server: LlamaServer
) -> None:
    assert engine.info.n_ctx == 2048  # lowered to the server's slot context (/props)
    theirs = post_json(f"{server.url}/tokenize", {"content": PROMPT, "add_special": True, "parse_special": False})
    parsed = post_json(f"{server.url}/tokenize", {"content": PROMPT, "add_special": True, "parse_special": True})
    assert len(parsed["tokens"]) < len(theirs["tokens"])  # parsing would make `<eos>` one control token
    assert await asyncio.to_thread(engine.count_tokens, PROMPT) == len(theirs["tokens"])


async def test_greedy_text_is_what_llama_servers_native_endpoint_writes(engine: OpenAIEngine, server: LlamaServer) -> None:
    ours = await engine.submit(GenerationRequest(PROMPT, 24, (), GREEDY, "c1")).text()
    native = post_json(f"{server.url}/completion", {
        "prompt": post_json(f"{server.url}/tokenize", {"content": PROMPT, "add_special": True,
                                                        "parse_special": False})["tokens"],
        "n_predict": 24, "temperature": 0.0, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
        "seed": 1, "cache_prompt": False,
    })
    assert ours and ours == native["content"]


async def test_the_next_turn_reuses_the_prefix_only_when_asked(server: LlamaServer) -> None:
    for reuse in (True, False):
        engine = await OpenAIEngine.start(OpenAIConfig(base_url=server.url, n_ctx=2048, reuse_prefix=reuse))
        try:
            first = engine.submit(GenerationRequest(PROMPT, 8, (), GREEDY, f"chan:{reuse}"))
            text = await first.text()
            follow_up = PROMPT + text + "\n\n### Instruction:\nAnn: And who kept them?\n\n### Response:\n"
            second = engine.submit(GenerationRequest(follow_up, 8, (), GREEDY, f"chan:{reuse}"))
            await second.text()
            if reuse:
                assert second.stats.reused_tokens >= first.stats.prompt_tokens - 1
            else:
                assert second.stats.reused_tokens == 0
            assert second.stats.prompt_tokens > first.stats.prompt_tokens
        finally:
            await engine.close()


async def test_stop_frees_the_servers_slot(engine: OpenAIEngine, server: LlamaServer) -> None:
    generation = engine.submit(GenerationRequest(PROMPT, 400, (), GREEDY, "c-stop"))
    pieces = 0
    async for _ in generation:
        pieces += 1
        if pieces == 3:
            generation.cancel()
    assert generation.stats.stopped_by == "cancelled"
    for _ in range(50):
        if not any(slot.get("is_processing") for slot in server.slots()):
            break
        await asyncio.sleep(0.1)
    assert not any(slot.get("is_processing") for slot in server.slots())
