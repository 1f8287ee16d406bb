"""Start and stop the parts every edge needs: database, personas, model engine, responder."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot.engine import repack
from bot.engine.base import Engine
from bot.engine.common import gpu_offload_warning
from bot.engine.llama import LlamaConfig, LlamaEngine
from bot.engine.scheduler import BatchConfig, BatchedEngine
from bot.engine.model_source import configured_model
from bot.roleplay.personas import load_personas, merge_imported
from bot.lifecycle.responder import Responder
from bot.core.settings import Settings
from bot.storage.store import Store

log = logging.getLogger(__name__)


async def start_engine(settings: Settings, model_path: Path | None) -> Engine:
    """The engine the settings ask for: batched (default), llama-cpp-python's simple one, or
    a fleet of llama-servers (remote), or an OpenAI-compatible server (openai); for the last
    two, `model_path`, if any, is read for its vocabulary only.

    Warns first when N_GPU_LAYERS asks for GPU offload that this llama.cpp build cannot do
    (llama.cpp would ignore it silently and run every layer on the CPU)."""
    if settings.draft_model_path is not None and settings.engine != "batched":
        log.warning("DRAFT_MODEL_PATH is for ENGINE=batched; ENGINE=%s does not use it (docs/engine.md: "
                    "a fleet's servers take their own draft model)", settings.engine)
    if settings.engine == "remote":
        from bot.engine.remote import RemoteEngine

        return await RemoteEngine.start(settings.llama_server_urls, n_ctx=settings.n_ctx,
                                        max_queue=settings.max_queue, tokenizer_path=model_path)
    if settings.engine == "openai":
        from bot.engine.openai_compat import OpenAIConfig, OpenAIEngine

        assert settings.openai_base_url is not None  # Settings requires it with ENGINE=openai
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return await OpenAIEngine.start(OpenAIConfig(
            base_url=settings.openai_base_url, model=settings.openai_model, api_key=key or None,
            n_ctx=settings.n_ctx, max_queue=settings.max_queue,
            max_parallel=settings.n_parallel or OpenAIConfig.max_parallel, tokenizer_path=model_path,
        ))
    assert model_path is not None
    if warning := gpu_offload_warning(settings.n_gpu_layers):
        log.warning("%s", warning)
    cpu = repack.choose(settings.llama_repack)
    repack.log_choice(cpu)
    if settings.engine == "simple":
        return await LlamaEngine.start(LlamaConfig(
            model_path=model_path, n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers,
            n_threads=settings.n_threads, seed=settings.seed, max_queue=settings.max_queue, repack=cpu.enabled,
        ))
    return await BatchedEngine.start(BatchConfig(
        model_path=model_path, n_ctx=settings.n_ctx, n_parallel=settings.n_parallel,
        n_gpu_layers=settings.n_gpu_layers, n_threads=settings.n_threads,
        ram_cache_mb=settings.kv_ram_cache_mb, max_queue=settings.max_queue, repack=cpu.enabled,
        draft_tokens=settings.draft_tokens, prefix_cache_mb=settings.prefix_cache_mb,
        draft_model_path=settings.draft_model_path,
    ))


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Responder]:
    """Open the store (migrating it), load personas and the model; close them on exit."""
    store = await Store.open(settings.database_url, retry_seconds=settings.database_retry_seconds)
    try:
        personas = merge_imported(load_personas(settings.personas_dir), await store.imported_personas())
        if settings.engine == "remote":  # the servers hold the model; never download it here
            model_path = settings.model_path
            log.info("serving through %d llama-server(s): %s", len(settings.llama_server_urls),
                     ", ".join(settings.llama_server_urls))
        elif settings.engine == "openai":
            model_path = settings.model_path
            log.info("serving through the OpenAI-compatible server at %s", settings.openai_base_url)
        else:
            model_path = configured_model(settings)
            log.info("loading %s (this can take a while for large models)", model_path)
        engine = await start_engine(settings, model_path)
        responder = Responder(settings, store, engine, personas)
        try:
            yield responder
        finally:
            await responder.memory.close()  # summaries under way stop before the engine does
            await engine.close()
    finally:
        await store.close()
