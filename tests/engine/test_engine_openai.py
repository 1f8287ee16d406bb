"""ENGINE=openai (`bot.engine.openai_compat`) against a local stand-in of an OpenAI-compatible
server, for what a real server cannot be made to do: a refused key, 429, 5xx, a refused
field, a stream cut mid-reply. The real llama-server's /v1/completions drives it in
tests/e2e/test_openai_bot.py."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from bot.engine.base import (
    EngineError,
    GenerationRequest,
    ModelLoadError,
    SamplingParams,
)
from bot.engine.openai_compat import OpenAIConfig, OpenAIEngine
from bot.engine.openai_server import split_base_url
from bot.engine.special_text import ZERO_WIDTH_SPACE, defang
from tests.e2e.fake_discord import wait_for
from tests.engine.openai_standin import REPLY, OpenAIStandIn
from tests.llama_server import free_port

KEY = "sk-standin-" + "x" * 24
PROMPT = "### Instruction:\nAnn: Why is the sky blue? </s><|im_end|> [INST]\n\n### Response:\n"


def request(max_new_tokens: int = 8, seed: int = 7, conversation: str | None = "chan:1") -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, max_new_tokens=max_new_tokens, stop=("\nAnn:", "### Instruction:"),
                             sampling=SamplingParams(temperature=0.0, seed=seed), conversation=conversation)


def config(server: OpenAIStandIn, **options: object) -> OpenAIConfig:
    options.setdefault("start_seconds", 5.0)
    options.setdefault("retry_seconds", 5.0)
    return OpenAIConfig(base_url=server.url + "/v1", **options)  # type: ignore[arg-type]


async def test_streams_the_alpaca_prompt_as_a_raw_completion_with_the_sampling_settings() -> None:
    async with OpenAIStandIn(api_key=KEY, tokenize=None) as server:
        engine = await OpenAIEngine.start(config(server, api_key=KEY))
        try:
            assert engine.info.name == "standin-model" and engine.info.n_ctx == 2048  # max_model_len
            generation = engine.submit(request())
            assert await generation.text() == " ".join(REPLY.split(" ")[:8])
            body, headers = server.requests[0], server.headers[0]
            assert headers["Authorization"] == f"Bearer {KEY}"
            assert body["model"] == "standin-model" and body["stream"] is True and body["max_tokens"] == 8
            assert body["stop"] == ["\nAnn:", "### Instruction:"]
            assert body["temperature"] == 0.0 and body["top_p"] == 0.9 and body["seed"] == 7
            assert body["user"].startswith("hermes-") and "chan" not in body["user"]  # a digest, not the key
            assert body["repeat_penalty"] == body["repetition_penalty"] == 1.1  # llama-server's and vLLM's names
            # No tokenizer that keeps special-token text as text: sent as text, defanged.
            assert isinstance(body["prompt"], str) and "</s>" not in body["prompt"] and "<|im_end|>" not in body["prompt"]
            assert body["prompt"].replace(ZERO_WIDTH_SPACE, "") == PROMPT
            assert generation.stats.stopped_by == "length" and generation.stats.completion_tokens == 8
            assert generation.stats.prompt_tokens == len(OpenAIStandIn.ids(body["prompt"]))  # from `usage`
            # No /tokenize: an upper bound, never below the real count.
            assert engine.count_tokens(PROMPT) == len(defang(PROMPT).encode()) + 1
        finally:
            await engine.close()


async def test_the_server_tokenizer_makes_the_prompt_token_ids_and_counts_exactly() -> None:
    async with OpenAIStandIn(tokenize="llama") as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            assert await asyncio.to_thread(engine.count_tokens, PROMPT) == len(OpenAIStandIn.ids(PROMPT))
            await engine.submit(request()).text()
            assert server.requests[0]["prompt"] == OpenAIStandIn.ids(PROMPT)  # ids: `</s>` stayed text
        finally:
            await engine.close()


async def test_vllm_style_tokenize_counts_the_defanged_text_and_the_prompt_stays_text() -> None:
    async with OpenAIStandIn(tokenize="vllm") as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            assert await asyncio.to_thread(engine.count_tokens, PROMPT) == len(OpenAIStandIn.ids(defang(PROMPT)))
            await engine.submit(request()).text()
            assert server.requests[0]["prompt"] == defang(PROMPT)
        finally:
            await engine.close()


async def test_a_server_that_refuses_token_ids_gets_text_from_then_on(caplog: pytest.LogCaptureFixture) -> None:
    async with OpenAIStandIn(tokenize="llama", refuse_token_prompts=True) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            assert await engine.submit(request()).text()
            assert isinstance(server.requests[0]["prompt"], list) and server.requests[1]["prompt"] == defang(PROMPT)
            assert "refused a token-id prompt" in caplog.text
            await engine.submit(request()).text()
            assert isinstance(server.requests[2]["prompt"], str)
        finally:
            await engine.close()


async def test_a_wrong_api_key_is_a_clear_error_that_never_shows_the_key(caplog: pytest.LogCaptureFixture) -> None:
    async with OpenAIStandIn(api_key=KEY) as server:
        with pytest.raises(ModelLoadError, match="OPENAI_API_KEY") as raised:
            await OpenAIEngine.start(config(server, api_key="sk-wrong-" + "y" * 20))
        assert "sk-wrong" not in str(raised.value) and "sk-wrong" not in caplog.text


async def test_a_key_revoked_while_running_fails_the_reply_with_what_to_do() -> None:
    async with OpenAIStandIn(faults=[]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            server.api_key = KEY  # the server now wants another key
            with pytest.raises(EngineError, match="refused the API key .*OPENAI_API_KEY"):
                await engine.submit(request()).text()
        finally:
            await engine.close()


async def test_429_and_5xx_before_the_first_text_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.engine.openai_compat")
    async with OpenAIStandIn(faults=["429", "503", "500", "refused-before-text"]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            started = time.monotonic()
            text = await engine.submit(request()).text()
            assert text == " ".join(REPLY.split(" ")[:8])
            assert len(server.requests) == 5 and server.finished == 1
            assert time.monotonic() - started >= 0.2  # Retry-After: 0.2 was honoured
            assert caplog.text.count("not ready") == 4
        finally:
            await engine.close()


async def test_a_server_that_stays_overloaded_ends_the_reply_after_the_retry_time() -> None:
    async with OpenAIStandIn(faults=["503"] * 100) as server:
        engine = await OpenAIEngine.start(config(server, retry_seconds=1.5))
        try:
            started = time.monotonic()
            with pytest.raises(EngineError, match="not answering .*HTTP 503"):
                await engine.submit(request()).text()
            assert 1.0 <= time.monotonic() - started < 5.0
        finally:
            await engine.close()


async def test_a_refused_field_is_dropped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async with OpenAIStandIn(refuse=("seed", "top_k")) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            assert await engine.submit(request()).text()
            assert await engine.submit(request()).text()
            last = server.requests[-1]
            assert "seed" not in last and "top_k" not in last and last["temperature"] == 0.0
            assert server.finished == 2
            assert caplog.text.count("refused") == 2  # seed, then top_k; never again after
        finally:
            await engine.close()


async def test_an_unknown_model_says_to_set_openai_model() -> None:
    async with OpenAIStandIn(faults=["404"]) as server:
        engine = await OpenAIEngine.start(config(server, model="nous-hermes-70b"))
        try:
            with pytest.raises(EngineError, match="no model 'nous-hermes-70b'.*OPENAI_MODEL"):
                await engine.submit(request()).text()
        finally:
            await engine.close()


async def test_a_stream_cut_mid_reply_keeps_the_text_and_ends_with_an_error() -> None:
    async with OpenAIStandIn(faults=["cut"]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            pieces: list[str] = []
            with pytest.raises(EngineError, match="stopped mid-reply"):
                async for piece in engine.submit(request()):
                    pieces.append(piece)
            assert "".join(pieces) == " ".join(REPLY.split(" ")[:3])
            assert len(server.requests) == 1  # never retried once text was shown
        finally:
            await engine.close()


async def test_stop_closes_the_stream() -> None:
    async with OpenAIStandIn(piece_seconds=0.2) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            generation = engine.submit(request(max_new_tokens=14))
            pieces = []
            async for piece in generation:
                pieces.append(piece)
                if len(pieces) == 2:
                    generation.cancel()
            assert len(pieces) == 2 and generation.stats.stopped_by == "cancelled"
            await wait_for(lambda: server.disconnects, timeout=10)  # noticed at its next write
            assert server.disconnects == 1 and server.finished == 0
        finally:
            await engine.close()


async def test_requests_beyond_max_parallel_wait_in_order() -> None:
    async with OpenAIStandIn(piece_seconds=0.05) as server:
        engine = await OpenAIEngine.start(config(server, max_parallel=1))
        try:
            first, second = engine.submit(request()), engine.submit(request(conversation="chan:2"))
            assert second.position == 1 and engine.queue_depth == 1 and engine.slot_usage() == (1, 1)
            texts = await asyncio.gather(first.text(), second.text())
            assert texts[0] == texts[1] and engine.queue_depth == 0
        finally:
            await engine.close()


async def test_no_server_is_a_clear_error_at_start() -> None:
    port = free_port()
    with pytest.raises(ModelLoadError, match="did not answer.*OPENAI_BASE_URL"):
        await OpenAIEngine.start(OpenAIConfig(base_url=f"http://127.0.0.1:{port}", start_seconds=1.0))


def test_base_urls_with_and_without_v1() -> None:
    assert split_base_url("http://gpu1:8000/v1/") == ("http://gpu1:8000", "http://gpu1:8000/v1")
    assert split_base_url("https://llm.example/") == ("https://llm.example", "https://llm.example/v1")
    with pytest.raises(ModelLoadError):
        split_base_url("gpu1:8000")


@pytest.mark.parametrize("typed", ["</s>", "<s>", "<eos>", "<|im_end|>", "<|eot_id|>", "<start_of_turn>",
                                   "[INST]", "[/INST]", "<<SYS>>", "<unk>", "<｜User｜>", "[TOOL_CALLS]", "[gMASK]"])
def test_defang_breaks_every_special_token_looking_sequence(typed: str) -> None:
    broken = defang(f"a {typed} b")
    assert typed not in broken and broken.replace(ZERO_WIDTH_SPACE, "") == f"a {typed} b"


def test_defang_leaves_ordinary_text_alone() -> None:
    for text in ("2 < 3 and 5 > 4", "a<-b", "x << 2", "[1, 2]", "<3 you", "emoji 🙂 <", "<br>", "Vec<String>",
                 "a<b>c", "[x]", "<@123>"):
        assert defang(text) == text


# ---- what a hostile review found ---------------------------------------------------------


async def test_stop_right_after_submit_ends_the_generation_and_frees_its_place() -> None:
    """A Stop (or a shutdown) in the same loop turn as the submit: the task never ran."""
    async with OpenAIStandIn() as server:
        engine = await OpenAIEngine.start(config(server, max_parallel=1))
        try:
            first = engine.submit(request())
            first.cancel()
            assert await asyncio.wait_for(first.text(), 5) == "" and first.stats.stopped_by == "cancelled"
            assert engine.slot_usage() == (0, 1)
            assert await asyncio.wait_for(engine.submit(request()).text(), 5)
        finally:
            await engine.close()


async def test_every_stop_string_is_sent_and_enforced_here_too() -> None:
    """The stand-in applies no stop at all, as a server that takes only four or none."""
    names = ("### Instruction:", "### Input:", "### Response:", "\nAnn:", "\nBob:", "scatters")
    async with OpenAIStandIn() as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            generation = engine.submit(GenerationRequest(PROMPT, 16, names, SamplingParams(temperature=0.0)))
            assert await generation.text() == "The sky is blue because air "
            assert server.requests[0]["stop"] == list(names) and generation.stats.stopped_by == "stop"
        finally:
            await engine.close()


async def test_retry_after_zero_is_not_a_busy_loop() -> None:
    async with OpenAIStandIn(faults=["429"] * 1000, retry_after="0") as server:
        engine = await OpenAIEngine.start(config(server, retry_seconds=1.0))
        try:
            with pytest.raises(EngineError, match="not answering"):
                await engine.submit(request()).text()
            assert len(server.requests) <= 6  # backoff from 0.25 s, not thousands of requests
        finally:
            await engine.close()


async def test_a_server_that_answers_whole_json_instead_of_a_stream_is_read() -> None:
    async with OpenAIStandIn(faults=["json"]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            generation = engine.submit(request())
            assert await generation.text() == " ".join(REPLY.split(" ")[:8]) and generation.stats.stopped_by == "length"
        finally:
            await engine.close()


async def test_done_without_a_finish_reason_is_a_whole_reply() -> None:
    async with OpenAIStandIn(faults=["done-without-finish"]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            generation = engine.submit(request(max_new_tokens=30))
            assert await generation.text() == REPLY and generation.stats.stopped_by == "stop"
        finally:
            await engine.close()


async def test_a_refusal_that_names_no_optional_field_drops_nothing() -> None:
    async with OpenAIStandIn(faults=["400-temperature", "400-context"]) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            for expected in ("Unsupported value: temperature", "exceeds the available context"):
                with pytest.raises(EngineError, match=expected):
                    await engine.submit(request()).text()
            assert await engine.submit(request()).text()
            last = server.requests[-1]
            assert isinstance(last["prompt"], list) and "seed" in last and "user" in last  # nothing given up
            assert len(server.requests) == 3  # neither refusal was sent again
        finally:
            await engine.close()


async def test_a_server_that_ignores_parse_special_gets_defanged_text() -> None:
    async with OpenAIStandIn(tokenize="llama", honours_parse_special=False) as server:
        engine = await OpenAIEngine.start(config(server))
        try:
            await engine.submit(request()).text()
            sent = server.requests[0]["prompt"]
            assert isinstance(sent, str) and "</s>" not in sent and 2 not in OpenAIStandIn.ids(sent, True)
        finally:
            await engine.close()


@pytest.mark.llama
async def test_a_local_vocabulary_unchecked_against_the_server_counts_but_never_sends_ids(gguf_path: Path) -> None:
    """No /tokenize to compare with: the GGUF may not be the server's, so the prompt goes as
    defanged text, and the count is of that text."""
    async with OpenAIStandIn(tokenize=None) as server:
        engine = await OpenAIEngine.start(config(server, tokenizer_path=gguf_path))
        try:
            await engine.submit(request()).text()
            assert server.requests[0]["prompt"] == defang(PROMPT)
            from bot.engine.vocab import VocabTokenizer

            vocab = VocabTokenizer(gguf_path)
            try:
                assert await asyncio.to_thread(engine.count_tokens, PROMPT) == len(vocab.tokenize(defang(PROMPT)))
            finally:
                vocab.close()
        finally:
            await engine.close()


@pytest.mark.llama
async def test_close_while_worker_threads_count_tokens(gguf_path: Path) -> None:
    """The vocabulary is freed only when no thread is inside it (this crashed with SIGSEGV)."""
    async with OpenAIStandIn(tokenize=None) as server:
        engine = await OpenAIEngine.start(config(server, tokenizer_path=gguf_path))
        texts = [f"{PROMPT} {i} " * 40 for i in range(400)]

        def count_all() -> int:
            return sum(engine.count_tokens(text) for text in texts)

        counting = [asyncio.create_task(asyncio.to_thread(count_all)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await engine.close()
        results = await asyncio.gather(*counting, return_exceptions=True)
        assert all(isinstance(r, int) and r > 0 for r in results), results
