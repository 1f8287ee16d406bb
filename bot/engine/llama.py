"""llama.cpp engine: one worker thread owns the `Llama` context; the event loop never blocks.

Requests wait in a bounded queue; the worker takes them one at a time and streams text
back through `Generation.push` (thread-safe). Consecutive turns of a conversation reuse
the evaluated prompt prefix: llama-cpp-python keeps the last sequence's tokens in its KV
cache and only evaluates what differs, which we measure and report in `GenerationStats`.

Hot swap loads the new model in another thread beside the old one; the worker switches
between two generations, so nothing under way is lost, and a failed load changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot.engine.base import (
    Engine,
    EngineBusy,
    EngineError,
    Generation,
    GenerationRequest,
    GenerationStats,
    ModelInfo,
    ModelLoadError,
)

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class LlamaConfig:
    model_path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 256
    seed: int = -1
    max_queue: int = 32


def check_model_file(path: Path, n_gpu_layers: int = 0) -> None:
    """Fail early, with a helpful message, on a file llama.cpp could not load."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (check MODEL_PATH or MODELS_DIR)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "convert it with `hermes-train export` or download a .gguf build"
        )
    size = path.stat().st_size
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    offloading = n_gpu_layers != 0 and _supports_gpu_offload()
    if not offloading and size > ram:
        raise ModelLoadError(
            f"{path.name} is {size / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB "
            "of RAM and llama.cpp has no GPU offload here: pick a smaller quantization "
            "or install llama-cpp-python with CUDA (see README)"
        )


def _supports_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def load_llama(config: LlamaConfig) -> Any:
    """Load a GGUF with llama.cpp, turning its failures into `ModelLoadError`."""
    check_model_file(config.model_path, config.n_gpu_layers)
    from llama_cpp import Llama

    try:
        return Llama(
            model_path=str(config.model_path),
            n_ctx=config.n_ctx,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=config.n_threads,
            n_batch=min(config.n_batch, config.n_ctx),
            seed=config.seed if config.seed >= 0 else 0xFFFFFFFF,
            swa_full=True,  # keep sliding-window models' cache whole so prefixes can be reused
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"llama.cpp could not load {config.model_path.name}: {error}") from error


class LlamaEngine(Engine):
    """The production engine. Build with `await LlamaEngine.start(config)`."""

    def __init__(self, config: LlamaConfig, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._config = config
        self._llm = llm
        self._loop = loop
        self._pending: collections.deque[Generation | _Swap | None] = collections.deque()
        self._wakeup = threading.Condition()
        self._last_stats: GenerationStats | None = None
        self._busy = False  # a generation is under way
        self._worker = threading.Thread(target=self._run, name="llama-worker", daemon=True)
        self._worker.start()

    @classmethod
    async def start(cls, config: LlamaConfig) -> LlamaEngine:
        llm = await asyncio.to_thread(load_llama, config)
        return cls(config, llm, asyncio.get_running_loop())

    @property
    def info(self) -> ModelInfo:
        path = self._config.model_path
        return ModelInfo(name=path.stem, path=str(path), n_ctx=self._config.n_ctx)

    @property
    def queue_depth(self) -> int:
        return sum(isinstance(job, Generation) for job in self._pending)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, never the context the worker is using.
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request, asyncio.get_running_loop())
        with self._wakeup:
            if self.queue_depth >= self._config.max_queue:
                raise EngineBusy(
                    f"{self.queue_depth} requests are already waiting; try again in a minute"
                )
            self._pending.append(generation)
            generation.set_position(self.queue_depth - 1 + self._busy)
            self._wakeup.notify()
        return generation

    async def reload(self, path: str | None = None) -> ModelInfo:
        config = self._config if path is None else replace(self._config, model_path=Path(path))
        new_llm = await asyncio.to_thread(load_llama, config)  # the old model keeps serving
        swap = _Swap(config, new_llm, self._loop.create_future())
        with self._wakeup:
            self._pending.appendleft(swap)  # right after the generation under way
            self._wakeup.notify()
        await swap.done
        log.info("now serving %s", config.model_path)
        return self.info

    async def close(self) -> None:
        with self._wakeup:
            for job in self._pending:
                if isinstance(job, Generation):
                    job.finish(EngineError("the bot is shutting down"))
            self._pending.clear()
            self._pending.append(None)
            self._wakeup.notify()
        await asyncio.to_thread(self._worker.join)
        self._llm.close()

    # ---- the worker thread -------------------------------------------------------------

    def _take(self) -> Generation | _Swap | None:
        with self._wakeup:
            while not self._pending:
                self._wakeup.wait()
            job = self._pending.popleft()
            waiting = [j for j in self._pending if isinstance(j, Generation)]
        for position, generation in enumerate(waiting, start=1):  # behind the one starting now
            self._loop.call_soon_threadsafe(generation.set_position, position)
        return job

    def _run(self) -> None:
        while (job := self._take()) is not None:
            if isinstance(job, _Swap):
                old, self._llm, self._config = self._llm, job.llm, job.config
                # Freed on the loop thread, where count_tokens may be reading its vocabulary.
                self._loop.call_soon_threadsafe(finish_swap, old, job.done)
                continue
            if job.cancelled.is_set():
                job.stats.stopped_by = "cancelled"
                job.finish()
                continue
            error: EngineError | None = None
            self._busy = True
            try:
                self._generate(job)
            except Exception as exc:  # report to the caller, keep the worker alive
                log.exception("generation failed")
                job.stats.stopped_by = "error"
                error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
            self._busy = False
            self._last_stats = job.stats
            job.finish(error)

    def _generate(self, job: Generation) -> None:
        llm, request, stats = self._llm, job.request, job.stats
        tokens = llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) + request.max_new_tokens > llm.n_ctx():
            raise EngineError(
                f"prompt of {len(tokens)} tokens + {request.max_new_tokens} new tokens "
                f"exceeds the context of {llm.n_ctx()}"
            )
        stats.prompt_tokens = len(tokens)
        stats.reused_tokens = llm.longest_token_prefix(llm.input_ids[: llm.n_tokens], tokens)
        sampling = request.sampling
        started = time.perf_counter()
        first: float | None = None
        stream = llm.create_completion(
            tokens,
            max_tokens=request.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repeat_penalty=sampling.repeat_penalty,
            seed=sampling.seed if sampling.seed >= 0 else None,
            stop=list(request.stop),
            stream=True,
        )
        reason = "stop"
        try:
            for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                choice = chunk["choices"][0]
                if choice["text"]:
                    job.push(choice["text"])
                reason = choice.get("finish_reason") or reason
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
        finally:
            stream.close()
        ended = time.perf_counter()
        stats.completion_tokens = max(0, llm.n_tokens - len(tokens))
        stats.prompt_seconds = (first or ended) - started
        stats.generation_seconds = ended - (first or ended)
        stats.stopped_by = reason


def finish_swap(old_model: Any, done: asyncio.Future[None]) -> None:
    """On the loop thread, after a hot swap: free the old model (count_tokens, which runs
    on the loop, may have been reading its vocabulary) and wake the reload."""
    old_model.close()
    done.set_result(None)


@dataclass
class _Swap:
    config: LlamaConfig
    llm: Any
    done: asyncio.Future[None]
