"""Batching engines on the small GGUF for side-by-side tests: one plain, one with the feature
under test (speculation, a draft model), otherwise configured alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bot.engine.scheduler import BatchConfig, BatchedEngine


async def start(gguf_path: Path, **kw: Any) -> BatchedEngine:
    """A batching engine on the CPU: 1024-token context, 2 slots, then `kw`."""
    return await BatchedEngine.start(BatchConfig(gguf_path, n_ctx=1024, n_gpu_layers=0, n_parallel=2, **kw))


@contextlib.asynccontextmanager
async def plain_and(gguf_path: Path, **kw: Any) -> AsyncIterator[tuple[BatchedEngine, BatchedEngine]]:
    """(the plain engine, the engine with `kw`), both closed afterwards."""
    plain = await start(gguf_path)
    try:
        other = await start(gguf_path, **kw)
    except BaseException:
        await plain.close()
        raise
    try:
        yield plain, other
    finally:
        await plain.close()
        await other.close()
