"""Sizing the engine to the machine, and hot swaps that must unload the old model first.

The arithmetic is tested as pure functions (a 70B-shaped model on one 80 GB GPU, computed,
not run); the swaps with the real small GGUF, really unloaded and loaded, with only the
free-memory reading faked (`common.probe_memory`) so that two models "do not fit"."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bot.engine import common
from bot.engine.base import EngineError, GenerationRequest, ModelLoadError, ModelUnavailable, SamplingParams
from bot.engine.common import GiB, MiB, Memory, size_engine
from bot.engine.batch_context import BatchConfig, BatchContext
from bot.engine.scheduler import BatchedEngine

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
PROMPTS = [f"### Instruction:\nAnn: Tell me three facts about {t}.\n\n### Response:\n" for t in ("the sea", "stars", "dogs", "cats")]

# Llama-2-70B: 80 layers, 8 KV heads of 128 (GQA): 80 × 8 × (128 + 128) × 2 bytes = 320 KiB a token.
KV_70B = 80 * 8 * 256 * 2
FILE_70B = 41_420_000_000  # nous-hermes-llama2-70b.Q4_K_M.gguf
H100 = Memory(gpu_free=int(79.1 * GiB), gpu_total=int(79.6 * GiB), ram_free=120 * GiB, ram_total=128 * GiB, gpu_source="nvidia-smi")


def request(prompt: str, max_new: int = 16) -> GenerationRequest:
    return GenerationRequest(prompt, max_new, (), GREEDY)


# ---- the arithmetic ---------------------------------------------------------------------


def test_70b_on_one_80gb_gpu_gets_16_slots_and_a_cache_of_8_conversations() -> None:
    sizing = size_engine(
        n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1, gpu=True,
        memory=H100, cores=16,
    )
    # 79.1 GiB free - 38.6 GiB of weights - 7.9 GiB reserve = 32.6 GiB = 26 slots of 1.25 GiB: capped.
    assert sizing.n_parallel == 16
    assert sizing.ram_cache_mb == 8 * 1280  # 8 conversations of 4096 tokens × 320 KiB
    assert (sizing.n_threads, sizing.n_threads_batch) == (4, 4)  # every layer on the GPU
    assert "26 would fit" in sizing.note


def test_explicit_values_are_kept_and_the_cache_is_bounded_by_free_ram() -> None:
    explicit = size_engine(
        n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1, gpu=True,
        memory=H100, n_parallel=3, ram_cache_mb=0, n_threads=7,
    )
    assert (explicit.n_parallel, explicit.ram_cache_mb, explicit.n_threads, explicit.n_threads_batch) == (3, 0, 7, 7)
    small_ram = dataclasses.replace(H100, ram_free=8 * GiB)
    bounded = size_engine(
        n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1, gpu=True, memory=small_ram,
    )
    assert bounded.ram_cache_mb == 8 * 1024 // 4  # a quarter of the RAM left, not 10 GiB


def test_cpu_only_and_partial_offload() -> None:
    ram = Memory(0, 0, ram_free=64 * GiB, ram_total=64 * GiB)
    cpu = size_engine(n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1,
                      gpu=False, memory=ram, cores=8)
    # No GPU support: N_GPU_LAYERS=-1 is ignored; (64 - 38.6 - 6.4) GiB / 1.25 GiB = 15 slots in RAM.
    assert cpu.n_parallel == 15 and (cpu.n_threads, cpu.n_threads_batch) == (8, 8)
    half = size_engine(n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=40,
                       gpu=True, memory=dataclasses.replace(H100, gpu_free=24 * GiB, gpu_total=24 * GiB), cores=8)
    # GPU: (24 - 19.3 - 2.4) GiB / 0.625 GiB per slot = 3 slots; RAM would hold far more.
    assert half.n_parallel == 3 and half.n_threads == 8
    tight = size_engine(n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1,
                        gpu=True, memory=dataclasses.replace(H100, gpu_free=40 * GiB))
    assert tight.n_parallel == 1, "never fewer than one slot"
    unknown = size_engine(n_ctx=4096, kv_per_token=KV_70B, model_bytes=FILE_70B, n_layer=80, n_gpu_layers=-1,
                          gpu=True, memory=dataclasses.replace(H100, gpu_source="unknown"))
    assert unknown.n_parallel == 1 and "unreadable" in unknown.note  # 2 GiB of KV assumed


def test_kv_bytes_per_token_of_the_real_model_matches_its_saved_state(gguf_path: Path) -> None:
    llama = BatchContext(BatchConfig(gguf_path, n_ctx=512, n_gpu_layers=0, n_parallel=1))
    try:
        # Gemma 3 270M: 18 layers × 1 KV head × (256 + 256) × 2 bytes (head size from the GGUF,
        # not n_embd / n_head = 160).
        assert llama.kv_per_token == 18 * 512 * 2
        tokens = llama.tokenize(PROMPTS[0] * 10)
        llama.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        per_token = len(llama.save(0)) / len(tokens)
        assert llama.kv_per_token <= per_token < llama.kv_per_token * 1.02
        assert llama.sizing.n_threads == common.physical_cores()
    finally:
        llama.close()


def test_auto_parallel_sizes_from_free_memory(gguf_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.engine.batch_context")
    fake_free(monkeypatch, ram_free=GiB + 300 * MiB)
    # 1324 MiB free - 241 MiB of model - 1024 MiB reserve = 59 MiB: 3 slots of 1024 tokens (18 MiB each).
    llama = BatchContext(BatchConfig(gguf_path, n_ctx=1024, n_gpu_layers=0))
    try:
        assert llama.n_parallel == 3
        assert "3 slot(s) of 1024 tokens" in caplog.text and "RAM 1.3 GiB free" in caplog.text
    finally:
        llama.close()
    monkeypatch.undo()
    roomy = BatchContext(BatchConfig(gguf_path, n_ctx=1024, n_gpu_layers=0, max_parallel=5))
    try:
        assert roomy.n_parallel == 5  # the cap
    finally:
        roomy.close()


def test_gpu_offload_without_gpu_support_warns_with_the_reinstall_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "supports_gpu_offload", lambda: False)
    assert common.gpu_offload_warning(0) is None
    warning = common.gpu_offload_warning(-1)
    assert warning is not None and "built without GPU support" in warning
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36' in warning
    monkeypatch.setattr(common, "supports_gpu_offload", lambda: True)
    assert common.gpu_offload_warning(-1) is None


async def test_start_engine_logs_the_warning(gguf_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bot.runtime import start_engine
    from bot.core.settings import Settings

    if common.supports_gpu_offload():
        pytest.skip("this llama.cpp has GPU support: nothing to warn about")
    engine = await start_engine(Settings(n_gpu_layers=-1, n_ctx=512, max_new_tokens=64, n_parallel=1), gguf_path)
    try:
        assert "built without GPU support" in caplog.text and "-DGGML_CUDA=on" in caplog.text
    finally:
        await engine.close()


# ---- swaps ------------------------------------------------------------------------------


def fake_free(monkeypatch: pytest.MonkeyPatch, ram_free: int | None = None, ram_total: int | None = None) -> None:
    """What `probe_memory` reports from now on: the real reading with free/total RAM replaced."""
    real = common.probe_memory

    def probe(offloading: bool) -> Memory:
        memory = real(offloading)
        return dataclasses.replace(
            memory,
            ram_free=memory.ram_free if ram_free is None else ram_free,
            ram_total=memory.ram_total if ram_total is None else ram_total,
        )

    monkeypatch.setattr(common, "probe_memory", probe)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """The real model loads and frees of `BatchContext`, in order: ("load", file), ("free", file)."""
    events: list[tuple[str, str]] = []
    init, close = BatchContext.__init__, BatchContext.close

    def traced_init(self: BatchContext, config: BatchConfig) -> None:
        events.append(("load", config.model_path.name))
        init(self, config)
        self.traced_name = config.model_path.name

    def traced_close(self: BatchContext) -> None:
        events.append(("free", self.traced_name))
        close(self)

    monkeypatch.setattr(BatchContext, "__init__", traced_init)
    monkeypatch.setattr(BatchContext, "close", traced_close)
    yield events


async def until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def start(path: Path, **kw: Any) -> BatchedEngine:
    return await BatchedEngine.start(BatchConfig(path, **{"n_ctx": 1024, "n_gpu_layers": 0, "n_parallel": 2, **kw}))


async def test_swap_that_does_not_fit_unloads_first_and_requests_wait(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads: list[tuple[str, str]]
) -> None:
    engine = await start(gguf_path)
    try:
        before = [await engine.submit(request(p)).text() for p in PROMPTS[1:]]
        good = tmp_path / "good.gguf"
        shutil.copy(gguf_path, good)
        assert (await engine.plan_reload(str(good))).mode == "beside"  # plenty of RAM really
        fake_free(monkeypatch, ram_free=GiB)  # 0.24 GiB + its KV + a 1 GiB reserve > 1 GiB
        plan = await engine.plan_reload(str(good))
        assert plan.mode == "unload" and "good.gguf" in plan.detail
        running = engine.submit(request(PROMPTS[0], 48))
        running_text = asyncio.create_task(running.text())
        await until(lambda: running.stats.prompt_seconds > 0)  # under way
        swap = asyncio.create_task(engine.reload(str(good)))
        await until(lambda: engine._offline)
        during = [engine.submit(request(p)) for p in PROMPTS[1:]]
        assert [g.position for g in during] == [1, 2, 3], "queued behind the swap, not failed"
        await until(lambda: engine._llama is None)  # the old model is being unloaded
        assert engine.count_tokens(PROMPTS[1]) >= len(PROMPTS[1])  # an upper bound meanwhile
        info = await swap
        assert info.name == "good" and engine.n_parallel == 2
        assert await running_text and running.stats.completion_tokens == 48, "finished before the unload"
        assert [await g.text() for g in during] == before, "answered afterwards, by the new model"
        assert loads == [("load", gguf_path.name), ("free", gguf_path.name), ("load", "good.gguf")]
    finally:
        await engine.close()


async def test_a_corrupt_new_file_brings_the_old_model_back(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads: list[tuple[str, str]]
) -> None:
    engine = await start(gguf_path)
    try:
        before = await engine.submit(request(PROMPTS[1])).text()
        corrupt = tmp_path / "corrupt.gguf"
        corrupt.write_bytes(gguf_path.read_bytes()[:3_000_000])
        fake_free(monkeypatch, ram_free=GiB)
        swap = asyncio.create_task(engine.reload(str(corrupt)))
        await until(lambda: engine._offline)
        during = engine.submit(request(PROMPTS[1]))
        with pytest.raises(ModelLoadError, match=rf"could not load corrupt.gguf.*{gguf_path.stem} was loaded back"):
            await swap
        assert await during.text() == before, "answered by the old model, loaded back"
        assert engine.info.name == gguf_path.stem and not engine._offline
        assert loads == [("load", gguf_path.name), ("free", gguf_path.name), ("load", "corrupt.gguf"), ("load", gguf_path.name)]
    finally:
        await engine.close()


async def test_a_file_larger_than_gpu_and_ram_together_is_refused_at_once(
    gguf_path: Path, monkeypatch: pytest.MonkeyPatch, loads: list[tuple[str, str]]
) -> None:
    engine = await start(gguf_path)
    try:
        fake_free(monkeypatch, ram_free=50 * MiB, ram_total=100 * MiB)
        started = time.monotonic()
        with pytest.raises(ModelLoadError, match="0.2 GiB but this machine has 0.1 GiB of RAM.*cannot be loaded here"):
            await engine.reload(str(gguf_path))
        assert time.monotonic() - started < 5 and not engine._offline
        assert loads == [("load", gguf_path.name)], "nothing unloaded, nothing loaded"
        monkeypatch.undo()
        assert await engine.submit(request(PROMPTS[0], 4)).text()
    finally:
        await engine.close()


async def test_when_neither_model_loads_requests_fail_until_a_reload_works(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "old.gguf"
    shutil.copy(gguf_path, old)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:3_000_000])
    engine = await start(old)
    try:
        old.unlink()  # still mapped while loaded; it cannot be loaded back
        fake_free(monkeypatch, ram_free=GiB)
        swap = asyncio.create_task(engine.reload(str(corrupt)))
        await until(lambda: engine._offline)
        waiting = engine.submit(request(PROMPTS[0]))
        with pytest.raises(ModelUnavailable, match="no model is loaded"):
            await swap
        with pytest.raises(EngineError, match="no model is loaded"):
            await waiting.text()
        with pytest.raises(EngineError, match="no model is loaded"):
            engine.submit(request(PROMPTS[0]))
        info = await engine.reload(str(gguf_path))
        assert info.name == gguf_path.stem
        assert await engine.submit(request(PROMPTS[0], 4)).text()
    finally:
        await engine.close()


async def test_reload_model_command_announces_the_outage(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/reload-model's own body, with a stand-in interaction: it edits its response to say
    the bot is offline for the swap, then that the new model serves."""
    from bot.edge.cogs.admin import Admin
    from bot.core.settings import Settings

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_path, models / "next.gguf")
    engine = await start(gguf_path)
    edits: list[str] = []

    async def edit(content: str) -> None:
        edits.append(content)

    async def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    async def owner(user: Any) -> bool:
        return True

    bot = SimpleNamespace(
        settings=Settings(models_dir=models), is_bot_owner=owner, stopping=False,
        responder=SimpleNamespace(engine=engine),
    )
    interaction = SimpleNamespace(
        user=SimpleNamespace(id=1), response=SimpleNamespace(defer=nothing, send_message=nothing), edit_original_response=edit,
    )
    try:
        fake_free(monkeypatch, ram_free=GiB)
        await Admin.reload_model.callback(Admin(bot), interaction, "next.gguf")  # type: ignore[arg-type]
        assert "offline for the swap" in edits[0] and "wait in the queue" in edits[0]
        assert edits[-1].startswith("Now serving `next`")
    finally:
        await engine.close()
