"""The llama.cpp engine with the real small GGUF model: streaming, stops, cancel, reuse, swap."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from bot.core.conversation import Message
from bot.core.prompt import build_prompt
from bot.engine.base import (
    EngineBusy,
    GenerationRequest,
    ModelLoadError,
    SamplingParams,
)
from bot.engine.llama import LlamaConfig, LlamaEngine

pytestmark = pytest.mark.llama
GREEDY = SamplingParams(temperature=0.0, seed=1)
PROMPT = "### Instruction:\nAnn: Write a long story about a lighthouse keeper.\n\n### Response:\n"


def request(prompt: str = PROMPT, max_new: int = 48, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt, max_new, stop, GREEDY)


async def test_streams_pieces_without_blocking_the_loop(engine: LlamaEngine) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    pieces = [piece async for piece in engine.submit(request())]
    task.cancel()
    assert len(pieces) > 5
    assert "".join(pieces).strip()
    assert ticks > 10, "the event loop kept running while the model generated"
    stats = engine.last_stats
    assert stats is not None and stats.completion_tokens > 5 and stats.tokens_per_second > 0


async def test_greedy_is_deterministic_and_stop_sequences_cut(engine: LlamaEngine) -> None:
    full = await engine.submit(request(max_new=40)).text()
    again = await engine.submit(request(max_new=40)).text()
    assert full == again
    words = full.split()
    assert len(words) > 6
    stop = words[len(words) // 2]
    cut = await engine.submit(request(max_new=40, stop=(stop,))).text()
    assert cut == full[: full.index(stop)]
    assert stop not in cut


async def test_cancel_keeps_what_was_written_and_the_engine_serves_on(engine: LlamaEngine) -> None:
    generation = engine.submit(request(max_new=300))
    pieces = []
    async for piece in generation:
        pieces.append(piece)
        if len(pieces) == 4:
            break  # leaving the loop cancels
    for _ in range(200):  # the worker sees it at its next token
        if generation.stats.stopped_by:
            break
        await asyncio.sleep(0.05)
    assert generation.stats.stopped_by == "cancelled"
    assert generation.stats.completion_tokens < 300
    assert await engine.submit(request(max_new=5)).text()


async def test_cancel_while_queued(engine: LlamaEngine) -> None:
    first = engine.submit(request(max_new=30))
    second = engine.submit(request(max_new=30))
    assert second.position == 1
    second.cancel()
    assert await first.text()
    assert await second.text() == ""
    assert second.stats.stopped_by == "cancelled"


async def test_follow_up_turn_reuses_the_evaluated_prefix(engine: LlamaEngine) -> None:
    first = engine.submit(request(max_new=16))
    answer = await first.text()
    follow_up = PROMPT + answer + "\n\n### Instruction:\nAnn: And then?\n\n### Response:\n"
    second = engine.submit(request(follow_up, max_new=8))
    await second.text()
    n_first = engine.count_tokens(PROMPT)
    assert second.stats.reused_tokens >= n_first
    assert second.stats.prompt_tokens - second.stats.reused_tokens < second.stats.prompt_tokens / 2
    other = engine.submit(request("### Instruction:\nBo: hi\n\n### Response:\n", max_new=4))
    await other.text()
    # Only the shared "### Instruction:\n" header (and BOS) is reused for another prompt.
    assert other.stats.reused_tokens <= engine.count_tokens("### Instruction:\n")


async def test_real_tokenizer_budget(engine: LlamaEngine) -> None:
    history = [Message("u", "Ann", "tell me about the sea " * 30) for _ in range(20)]
    built = build_prompt(history, engine.count_tokens, n_ctx=1024, max_new_tokens=64)
    assert built.n_tokens + 64 <= 1024
    assert len(built.messages) < 20
    generation = engine.submit(GenerationRequest(built.text, 64, built.stop, GREEDY))
    await generation.text()
    assert generation.stats.prompt_tokens == built.n_tokens


async def test_hot_swap_to_a_good_file_and_a_corrupt_one(engine: LlamaEngine, gguf_path: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:4_000_000])  # a truncated download
    running = engine.submit(request(max_new=24))
    with pytest.raises(ModelLoadError, match="could not load corrupt.gguf"):
        await engine.reload(str(corrupt))
    assert await running.text(), "the generation under way finished"
    assert engine.info.name == gguf_path.stem
    assert await engine.submit(request(max_new=4)).text(), "the old model keeps serving"

    copy = tmp_path / "models" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_path, copy)
    during = engine.submit(request(max_new=24))
    info = await engine.reload(str(copy))
    assert info.name == "copy" and engine.info.path == str(copy)
    assert await during.text(), "a generation queued before the swap is not lost"
    assert await engine.submit(request(max_new=4)).text()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "model file not found"), (b"PK\x03\x04zipfile", "is not a GGUF file")],
)
async def test_bad_files_give_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        await LlamaEngine.start(LlamaConfig(path, n_gpu_layers=0))


async def test_queue_answers_busy_when_full(gguf_path: Path) -> None:
    engine = await LlamaEngine.start(LlamaConfig(gguf_path, n_ctx=512, n_gpu_layers=0, max_queue=2))
    try:
        first = engine.submit(request(max_new=40))
        pieces = aiter(first)
        await anext(pieces)  # the worker is busy with it now
        queued = [engine.submit(request(max_new=2)) for _ in range(2)]
        with pytest.raises(EngineBusy, match="already waiting"):
            engine.submit(request(max_new=2))
        assert [piece async for piece in pieces]
        for generation in queued:
            await generation.text()
    finally:
        await engine.close()


def _tight_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake only the free-RAM reading: 1 GiB free, so the copy (0.24 GiB + its KV + a 1 GiB
    reserve) does not fit beside the loaded model and the swap must unload it first."""
    import dataclasses

    from bot.engine import common

    real = common.probe_memory
    monkeypatch.setattr(common, "probe_memory", lambda gpu: dataclasses.replace(real(gpu), ram_free=common.GiB))


async def test_hot_swap_that_does_not_fit_unloads_first(
    engine: LlamaEngine, gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await engine.submit(request(max_new=16)).text()
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf_path, copy)
    _tight_memory(monkeypatch)
    assert (await engine.plan_reload(str(copy))).mode == "unload"
    running = engine.submit(request(max_new=32))
    # The worker holds after the first piece until `during` is queued: on a fast host the
    # 32 tokens could otherwise be done before the swap begins.
    holding, release, push = threading.Event(), threading.Event(), running.push

    def push_then_hold(piece: str) -> None:
        push(piece)
        holding.set()
        release.wait(30)

    running.push = push_then_hold  # type: ignore[method-assign]
    running_text = asyncio.create_task(running.text())
    await asyncio.to_thread(holding.wait, 30)
    swap = asyncio.create_task(engine.reload(str(copy)))
    while not engine._parked:
        await asyncio.sleep(0.01)
    during = engine.submit(request(max_new=16))
    assert during.position >= 1, "waits behind the generation under way and the swap"
    release.set()
    old = engine._llm
    info = await swap
    assert info.name == "copy" and old._model.model is None, "the old model was freed"
    assert await running_text and running.stats.stopped_by == "length", "the generation under way finished"
    assert await during.text() == before, "answered afterwards by the new model"


async def test_hot_swap_that_does_not_fit_loads_the_old_model_back(
    engine: LlamaEngine, gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await engine.submit(request(max_new=16)).text()
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:4_000_000])
    _tight_memory(monkeypatch)
    old = engine._llm
    swap = asyncio.create_task(engine.reload(str(corrupt)))
    while not engine._parked:
        await asyncio.sleep(0.01)
    during = engine.submit(request(max_new=16))
    with pytest.raises(ModelLoadError, match=rf"could not load corrupt.gguf.*{gguf_path.stem} was loaded back"):
        await swap
    assert engine._llm is not old and old._model.model is None, "really unloaded and loaded again"
    assert engine.info.name == gguf_path.stem
    assert await during.text() == before


async def test_when_neither_model_loads_requests_fail_until_a_reload_works(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.engine.base import EngineError, ModelUnavailable

    old = tmp_path / "old.gguf"
    shutil.copy(gguf_path, old)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:4_000_000])
    engine = await LlamaEngine.start(LlamaConfig(old, n_ctx=512, n_gpu_layers=0))
    try:
        old.unlink()  # still mapped while loaded; it cannot be loaded back
        _tight_memory(monkeypatch)
        with pytest.raises(ModelUnavailable, match="no model is loaded"):
            await engine.reload(str(corrupt))
        with pytest.raises(EngineError, match="no model is loaded"):
            engine.submit(request(max_new=4))
        assert (await engine.reload(str(gguf_path))).name == gguf_path.stem
        assert await engine.submit(request(max_new=4)).text()
    finally:
        await engine.close()
