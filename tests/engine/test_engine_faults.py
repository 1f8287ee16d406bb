"""Both engines with the real small GGUF model, with faults injected into the real engine:
an error ends only its own generation, a dead worker is restarted by the watchdog, a stuck
one is reported, and Stop on a queued request takes effect at once."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bot.engine.base import EngineError, Generation, GenerationRequest, SamplingParams
from bot.engine.llama import LlamaConfig, LlamaEngine
from bot.engine.scheduler import BatchConfig, BatchedEngine

pytestmark = pytest.mark.llama
GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
PROMPT = "### Instruction:\nAnn: Tell me three facts about the sea.\n\n### Response:\n"
OTHER = "### Instruction:\nBo: Tell me three facts about trains.\n\n### Response:\n"
LONG = (  # over MIN_RESTORE_TOKENS (32), so that evicting it saves its state
    "### Instruction:\nAnn: I live by the sea, in a small town with a harbour, a lighthouse "
    "and many boats. Tell me three facts about the sea.\n\n### Response:\n"
)


T = TypeVar("T")


async def soon(awaitable: Awaitable[T], seconds: float = 30) -> T:
    """Await with a limit: an engine that lost a request fails the test instead of hanging it."""
    return await asyncio.wait_for(awaitable, seconds)


class Killed(BaseException):
    """Not an Exception: nothing in the engine may catch it; it ends the worker thread."""


def request(prompt: str = PROMPT, max_new: int = 24, conversation: str | None = None,
            stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt, max_new, stop, GREEDY, conversation)


async def batched_engine(gguf_path: Path, **kw: Any) -> BatchedEngine:
    options: dict[str, Any] = {"n_ctx": 256, "n_gpu_layers": 0, "n_parallel": 2, "watchdog_seconds": 0.2, **kw}
    return await BatchedEngine.start(BatchConfig(gguf_path, **options))


@pytest.fixture
async def batched(gguf_path: Path) -> AsyncIterator[BatchedEngine]:
    engine = await batched_engine(gguf_path)
    yield engine
    await engine.close()


@pytest.fixture
async def simple(gguf_path: Path) -> AsyncIterator[LlamaEngine]:
    engine = await LlamaEngine.start(
        LlamaConfig(gguf_path, n_ctx=256, n_gpu_layers=0, n_threads=2, n_batch=64, watchdog_seconds=0.2)
    )
    yield engine
    await engine.close()


async def first_piece(generation: Generation) -> tuple[str, AsyncIterator[str]]:
    """Wait until `generation` is under way: its first piece, and its iterator for the rest."""
    pieces = aiter(generation)
    return await soon(anext(pieces)), pieces


async def rest_of(pieces: AsyncIterator[str]) -> str:
    async def join() -> str:
        return "".join([p async for p in pieces])

    return await soon(join())


def seq_of(engine: BatchedEngine, generation: Generation) -> int:
    return next(s.seq for s in engine._slots if s.job is not None and s.job.generation is generation)


# ---- an error ends only its own generation ------------------------------------------------


async def test_a_failing_prefill_fails_only_that_job(batched: BatchedEngine) -> None:
    alone = await soon(batched.submit(request(max_new=24)).text())
    running = batched.submit(request(max_new=24))
    first, pieces = await first_piece(running)
    mine = seq_of(batched, running)
    decode = batched._llama.decode

    def failing_decode(entries: list[tuple[int, int, int, bool]]) -> None:
        if any(seq != mine for _, _, seq, _ in entries):
            raise RuntimeError("llama_decode failed with status -3 (injected)")
        decode(entries)

    batched._llama.decode = failing_decode  # type: ignore[method-assign]
    doomed = batched.submit(request(OTHER))
    with pytest.raises(EngineError, match="injected"):
        await soon(doomed.text())
    assert doomed.stats.stopped_by == "error"
    rest = await rest_of(pieces)
    assert running.stats.stopped_by == "length"
    assert first + rest == alone, "the generation under way wrote what it writes alone"
    batched._llama.decode = decode  # type: ignore[method-assign]
    assert await soon(batched.submit(request(OTHER, 4)).text())
    assert batched.health.alive and "injected" in batched.health.last_error


async def test_a_failing_token_batch_fails_the_jobs_in_it_and_serving_goes_on(batched: BatchedEngine) -> None:
    decode = batched._llama.decode
    calls = 0

    def failing_decode(entries: list[tuple[int, int, int, bool]]) -> None:
        nonlocal calls
        calls += 1
        if len(entries) == 1 and calls > 3:  # a token step, after the prompt
            batched._llama.decode = decode  # type: ignore[method-assign]
            raise RuntimeError("token batch failed (injected)")
        decode(entries)

    batched._llama.decode = failing_decode  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="injected"):
        await soon(batched.submit(request()).text())
    assert await soon(batched.submit(request(max_new=4)).text())


async def test_an_error_preparing_a_slot_fails_only_that_request(batched: BatchedEngine) -> None:
    """Outside _step: creating the sampler runs out of memory for one request."""
    running = batched.submit(request(max_new=32))
    _, pieces = await first_piece(running)
    sampler = batched._llama.sampler

    def failing_sampler(req: GenerationRequest) -> Any:
        batched._llama.sampler = sampler  # type: ignore[method-assign]
        raise MemoryError

    batched._llama.sampler = failing_sampler  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="MemoryError"):
        await soon(batched.submit(request(OTHER)).text())
    assert await rest_of(pieces) and running.stats.stopped_by == "length"
    assert await soon(batched.submit(request(OTHER, max_new=4)).text())
    assert batched.health.last_error == "MemoryError" and batched.health.restarts == 0


async def test_saving_an_evicted_state_out_of_memory_loses_only_the_cache(gguf_path: Path) -> None:
    engine = await batched_engine(gguf_path, n_parallel=1)
    try:
        await soon(engine.submit(request(LONG, 8, conversation="a")).text())
        expected = await soon(engine.submit(request(OTHER, 8, conversation="x")).text())  # evicts "a"
        assert "a" in engine._ram
        await soon(engine.submit(request(LONG, 8, conversation="a")).text())
        save = engine._llama.save

        def failing_save(seq: int) -> bytes:
            engine._llama.save = save  # type: ignore[method-assign]
            raise MemoryError

        engine._llama.save = failing_save  # type: ignore[method-assign]
        evicting = engine.submit(request(OTHER, 8, conversation="b"))
        assert await soon(evicting.text()) == expected  # served as if nothing happened
        assert "a" not in engine._ram  # only the cached state is lost
        again = engine.submit(request(LONG, 8, conversation="a"))
        assert await soon(again.text())
        assert again.stats.reused_tokens < 10  # evaluated afresh
        assert engine.health.last_error == "MemoryError"
    finally:
        await engine.close()


# ---- the watchdog ----------------------------------------------------------------------------


async def test_a_dead_scheduler_is_restarted_and_the_queue_served(gguf_path: Path) -> None:
    engine = await batched_engine(gguf_path, n_parallel=1)
    try:
        running = engine.submit(request(max_new=64))
        _, pieces = await first_piece(running)
        queued = engine.submit(request(OTHER, 8))
        step = engine._step
        killed = threading.Event()

        def dying_step() -> None:
            engine._step = step  # type: ignore[method-assign]
            killed.set()
            raise Killed("injected")

        engine._step = dying_step  # type: ignore[method-assign]
        with pytest.raises(EngineError, match=r"crashed \(Killed: injected\) and was restarted"):
            await rest_of(pieces)
        assert killed.is_set()
        detected = time.monotonic()
        assert running.stats.stopped_by == "error"
        assert await soon(queued.text()), "a request that was only waiting is served by the new worker"
        health = engine.health
        assert health.alive and health.restarts == 1 and health.last_error == "Killed: injected"
        assert "restarted 1 time" in health.describe()
        assert await soon(engine.submit(request(max_new=4)).text())
        print(f"answered {time.monotonic() - detected:.2f} s after the crash was reported")
    finally:
        await engine.close()


async def test_watchdog_detection_time(gguf_path: Path) -> None:
    """From the thread's death to the failure delivered: within a few watchdog periods."""
    engine = await batched_engine(gguf_path, n_parallel=1, watchdog_seconds=0.5)
    try:
        running = engine.submit(request(max_new=64))
        _, pieces = await first_piece(running)
        died = 0.0
        step = engine._step

        def dying_step() -> None:
            nonlocal died
            engine._step = step  # type: ignore[method-assign]
            died = time.monotonic()
            raise Killed("injected")

        engine._step = dying_step  # type: ignore[method-assign]
        with pytest.raises(EngineError, match="crashed"):
            await rest_of(pieces)
        elapsed = time.monotonic() - died
        print(f"watchdog: failure delivered {elapsed:.2f} s after the worker died (period 0.5 s)")
        assert elapsed < 1.5
    finally:
        await engine.close()


async def test_a_dead_llama_worker_is_restarted(simple: LlamaEngine) -> None:
    generate = simple._generate

    def dying_generate(job: Generation) -> None:
        simple._generate = generate  # type: ignore[method-assign]
        raise Killed("injected")

    simple._generate = dying_generate  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(EngineError, match="restarted"):
        await soon(simple.submit(request()).text())
    assert time.monotonic() - started < 2
    assert simple.health.restarts == 1 and simple.health.alive
    assert await soon(simple.submit(request(max_new=4)).text())


async def test_an_error_outside_a_generation_does_not_kill_the_llama_worker(simple: LlamaEngine) -> None:
    serve = simple._serve

    def failing_serve(job: Generation) -> None:
        simple._serve = serve  # type: ignore[method-assign]
        raise MemoryError

    simple._serve = failing_serve  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="MemoryError"):
        await soon(simple.submit(request()).text())
    assert await soon(simple.submit(request(max_new=4)).text())
    assert simple.health.restarts == 0 and simple.health.last_error == "MemoryError"


async def test_a_stuck_decode_is_reported_once_and_clears(
    gguf_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await batched_engine(gguf_path, stuck_seconds=0.3, watchdog_seconds=0.1)
    try:
        decode = engine._llama.decode
        release = threading.Event()

        def stuck_decode(entries: list[tuple[int, int, int, bool]]) -> None:
            release.wait(10)  # as a thread stuck inside llama_decode would
            engine._llama.decode = decode  # type: ignore[method-assign]
            decode(entries)

        engine._llama.decode = stuck_decode  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="bot.engine.common"):
            generation = engine.submit(request(max_new=4))
            for _ in range(30):
                await asyncio.sleep(0.1)
                if engine.health.stuck_seconds:
                    break
            assert engine.health.describe().startswith("stuck for")
            await asyncio.sleep(0.3)  # a few more watchdog rounds: still one warning
            release.set()
            assert await soon(generation.text())
        assert sum("no progress" in r.message for r in caplog.records) == 1
        assert engine.health.healthy and engine.health.restarts == 0
    finally:
        release.set()
        await engine.close()


# ---- UTF-8 -----------------------------------------------------------------------------------


async def test_an_invalid_byte_from_the_model_does_not_disable_stop_strings(batched: BatchedEngine) -> None:
    full = await soon(batched.submit(request(max_new=40)).text())
    stop = full.split()[len(full.split()) // 2]
    piece = batched._llama.piece
    first = True

    def spoiled_piece(token: int) -> bytes:
        nonlocal first
        data = piece(token)
        if first:
            first = False
            return b"\xff" + data  # not UTF-8
        return data

    batched._llama.piece = spoiled_piece  # type: ignore[method-assign]
    cut = batched.submit(request(max_new=40, stop=(stop,)))
    text = await soon(cut.text())
    assert text == ("\ufffd" + full)[: ("\ufffd" + full).index(stop)]
    assert cut.stats.stopped_by == "stop" and cut.stats.completion_tokens < 40


# ---- Stop while queued -----------------------------------------------------------------------


async def assert_queued_cancel_is_immediate(engine: BatchedEngine | LlamaEngine) -> None:
    running = engine.submit(request(max_new=200))
    _, pieces = await first_piece(running)
    queued = [engine.submit(request(OTHER, 4)) for _ in range(3)]
    assert [q.position for q in queued] == [1, 2, 3]
    started = time.monotonic()
    queued[0].cancel()
    assert await soon(queued[0].text()) == ""
    elapsed = time.monotonic() - started
    print(f"{type(engine).__name__}: a queued request cancelled in {elapsed * 1000:.1f} ms")
    assert elapsed < 0.2
    assert running.stats.stopped_by == "", "the long generation is still under way"
    assert queued[0].stats.stopped_by == "cancelled"
    assert [q.position for q in queued[1:]] == [1, 2] and engine.queue_depth == 2
    running.cancel()
    await rest_of(pieces)
    assert all([await soon(q.text()) for q in queued[1:]])


async def test_cancel_of_a_queued_request_is_immediate_batched(gguf_path: Path) -> None:
    engine = await batched_engine(gguf_path, n_parallel=1)
    try:
        await assert_queued_cancel_is_immediate(engine)
    finally:
        await engine.close()


async def test_cancel_of_a_queued_request_is_immediate_simple(simple: LlamaEngine) -> None:
    await assert_queued_cancel_is_immediate(simple)
