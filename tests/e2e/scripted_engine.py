"""A scripted engine for Discord tests: it answers with the texts a test queues, piece by
piece with a delay, through the same `Generation` streaming and cancellation as the real
engine. Tests that need the real model use `LlamaEngine` instead."""

from __future__ import annotations

import asyncio
import re

from bot.engine.base import (
    Engine,
    Generation,
    GenerationRequest,
    GenerationStats,
    ModelInfo,
)


class ScriptedEngine(Engine):
    def __init__(self, n_ctx: int = 4096, delay: float = 0.02) -> None:
        self.replies: list[str] = []
        self.prompts: list[str] = []
        self.stops: list[tuple[str, ...]] = []  # each request's stop sequences
        self.delay = delay
        self._info = ModelInfo(name="scripted", path="scripted", n_ctx=n_ctx)
        self._last: GenerationStats | None = None
        self._lock = asyncio.Lock()
        self._queue: list[Generation] = []  # waiting for the lock, in order
        self.broken: Exception | None = None  # set to make `info` fail, as a broken model would

    def say(self, *texts: str) -> None:
        """Queue the next replies (one per generation)."""
        self.replies.extend(texts)

    @property
    def info(self) -> ModelInfo:
        if self.broken is not None:
            raise self.broken
        return self._info

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last

    def count_tokens(self, text: str) -> int:
        return len(re.findall(r"\w+|[^\w\s]|\s+", text)) + 1

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request, asyncio.get_running_loop())
        generation.set_position(len(self._queue) + (1 if self._lock.locked() else 0))
        self._queue.append(generation)
        self.prompts.append(request.prompt)
        self.stops.append(request.stop)
        text = self.replies.pop(0) if self.replies else "(no scripted reply)"
        asyncio.get_running_loop().create_task(self._run(generation, text))
        return generation

    async def _run(self, generation: Generation, text: str) -> None:
        async with self._lock:
            self._queue.remove(generation)
            for position, waiting in enumerate(self._queue, start=1):
                waiting.set_position(position)
            pieces = re.findall(r"\S*\s*", text)
            for piece in pieces:
                if generation.cancelled.is_set():
                    generation.stats.stopped_by = "cancelled"
                    break
                if piece:
                    generation.push(piece)
                    generation.stats.completion_tokens += 1
                await asyncio.sleep(self.delay)
            generation.stats.generation_seconds = max(1e-6, self.delay * len(pieces))
            self._last = generation.stats
            generation.finish()

    async def close(self) -> None:
        """Nothing to free: the scripted replies live in memory."""

    async def reload(self, path: str | None = None) -> ModelInfo:
        raise NotImplementedError("reloads are tested with the real LlamaEngine")
