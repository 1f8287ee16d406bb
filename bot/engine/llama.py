"""llama.cpp engine: one worker thread owns the `Llama` context; the event loop never blocks.

Requests wait in a bounded queue; the worker takes them one at a time and streams text
back through `Generation.push` (thread-safe). Consecutive turns of a conversation reuse
the evaluated prompt prefix: llama-cpp-python keeps the last sequence's tokens in its KV
cache and only evaluates what differs, which we measure and report in `GenerationStats`.

Hot swap loads the new model in another thread beside the old one; the worker switches
between two generations, so nothing under way is lost, and a failed load changes nothing.
When both do not fit (`common.plan_swap`), the worker finishes the generation under way
and parks, the old model is freed and the new one loaded (the old one again if that
fails); requests wait in the queue meanwhile.

Threads: the physical cores for one-token steps and batches alike (a few when every layer
is on the GPU), not llama-cpp-python's default of half the cores (0.70-0.94x here).

An error fails only the generation it happened in; a `common.Watchdog` restarts the worker
should anything still end it, and reports it as stuck when it stops making progress.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bot.engine import common, repack
from bot.engine.base import (
    Engine,
    EngineBusy,
    EngineError,
    EngineHealth,
    Generation,
    GenerationRequest,
    GenerationStats,
    ModelInfo,
    ModelLoadError,
    ModelUnavailable,
    ReloadPlan,
)
from bot.engine.common import Watchdog, as_engine_error, finish_swap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaConfig:
    model_path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None  # None = physical cores (a few with every layer on the GPU)
    n_batch: int = 256
    seed: int = -1
    max_queue: int = 32
    # Work but no progress for this long: /status says "stuck". The worker beats once per
    # token, not while llama.cpp evaluates a prompt: keep it above the longest prompt time.
    stuck_seconds: float = 60.0
    watchdog_seconds: float = 1.0  # how often the watchdog looks at the worker thread
    repack: bool = field(default_factory=repack.from_environment)  # CPU weight repacking (bot.engine.repack)


def load_llama(config: LlamaConfig) -> Any:
    """Load a GGUF with llama.cpp, turning its failures into `ModelLoadError`."""
    common.check_model_file(config.model_path, config.n_gpu_layers)
    share = common.gpu_share(common.offloading(config.n_gpu_layers), config.n_gpu_layers, None)
    threads, threads_batch, why = common.decode_threads(config.n_threads, share)
    log.info("simple engine: %d decode thread(s) (%s)", threads, why)
    try:
        return repack.open_llama(
            config.model_path,
            repack=config.repack,
            n_ctx=config.n_ctx,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=threads,
            n_threads_batch=threads_batch,
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
        self._pending: collections.deque[Generation | _Swap] = collections.deque()
        self._wakeup = threading.Condition()  # reentrant: submit reads queue_depth under it
        self._last_stats: GenerationStats | None = None
        self._current: Generation | None = None  # taken by the worker, not yet finished
        self._parked = False  # an unload-then-load swap: the worker waits, the model may be gone
        self._unavailable: ModelUnavailable | None = None  # no model could be loaded back
        self._reloading = asyncio.Lock()
        self._closing = False
        self._watchdog = Watchdog(
            "llama-worker", self._run, self._has_work, config.stuck_seconds, config.watchdog_seconds
        )
        self._watchdog.start_thread()
        self._watchdog.watch(loop)

    @classmethod
    async def start(cls, config: LlamaConfig) -> LlamaEngine:
        llm = await asyncio.to_thread(load_llama, config)
        return cls(config, llm, asyncio.get_running_loop())

    @property
    def info(self) -> ModelInfo:
        path = self._config.model_path
        return ModelInfo(name=path.stem, path=str(path), n_ctx=self._config.n_ctx)

    def slot_usage(self) -> tuple[int, int]:
        return int(self._current is not None), 1

    @property
    def queue_depth(self) -> int:
        with self._wakeup:  # the worker pops from the deque meanwhile
            return sum(isinstance(job, Generation) for job in self._pending)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    @property
    def health(self) -> EngineHealth:
        return self._watchdog.health

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, never the context the worker is using.
        llm = self._llm  # None during an unload-then-load swap: count as many as could be
        if llm is None:
            return common.token_upper_bound(text)
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request, asyncio.get_running_loop(), dequeue=self._dequeue)
        with self._wakeup:
            if self._unavailable is not None:
                raise EngineError(str(self._unavailable))
            if self.queue_depth >= self._config.max_queue:
                raise EngineBusy(
                    f"{self.queue_depth} requests are already waiting; try again in a minute"
                )
            self._pending.append(generation)
            generation.set_position(self.queue_depth - 1 + (self._current is not None))
            self._wakeup.notify()
        return generation

    def _dequeue(self, generation: Generation) -> None:
        """`Generation.cancel()` (any thread): a request still waiting ends now."""
        with self._wakeup:
            try:
                self._pending.remove(generation)
            except ValueError:
                return  # already taken by the worker (which sees `cancelled`) or finished
            waiting = [job for job in self._pending if isinstance(job, Generation)]
            for position, other in enumerate(waiting, start=int(self._current is not None)):
                other.set_position(position)
        generation.stats.stopped_by = "cancelled"
        generation.finish()

    def _target(self, path: str | None) -> LlamaConfig:
        return self._config if path is None else replace(self._config, model_path=Path(path))

    async def plan_reload(self, path: str | None = None) -> ReloadPlan:
        config = self._target(path)
        llm = self._llm
        if llm is None:
            return ReloadPlan("unload", "no model is loaded now")
        kv = common.kv_bytes_per_token(_llama_cpp(), llm.model) * llm.n_ctx()
        return await asyncio.to_thread(common.plan_swap, config.model_path, config.n_gpu_layers, kv)

    async def reload(self, path: str | None = None) -> ModelInfo:
        config = self._target(path)
        async with self._reloading:
            plan = await self.plan_reload(path)
            if plan.mode == "beside":
                new_llm = await asyncio.to_thread(load_llama, config)  # the old model keeps serving
                swap = _Swap(config, new_llm, self._loop.create_future())
                with self._wakeup:
                    self._pending.appendleft(swap)  # right after the generation under way
                    self._wakeup.notify()
                await swap.done
            else:
                await self._reload_unloading(config, plan)
        log.info("now serving %s", config.model_path)
        return self.info

    async def _reload_unloading(self, config: LlamaConfig, plan: ReloadPlan) -> None:
        """Let the generation under way finish, park the worker, free the old model, load the
        new one (the old one again if that fails); requests wait in the queue meanwhile."""
        log.warning("hot swap by unloading (%s): offline until %s is loaded; requests wait", plan.detail, config.model_path.name)
        if not self._parked:  # (still parked: an earlier swap could load no model at all)
            park = _Swap(config, None, self._loop.create_future())
            with self._wakeup:
                self._parked = True
                self._pending.appendleft(park)  # right after the generation under way
                self._wakeup.notify()
            try:
                await park.done  # the worker is parked: it does not touch the model
            except BaseException:
                self._unpark()
                raise
        old, old_config, self._llm = self._llm, self._config, None
        failure: BaseException | None = None
        try:
            if old is None:  # nothing to unload or to go back to (an earlier swap lost both)
                llm = await asyncio.to_thread(load_llama, config)
            else:
                config, llm, failure = await common.unload_then_load(old, old_config, config, load_llama)
        except ModelUnavailable as error:
            log.critical("%s", error)
            with self._wakeup:
                self._unavailable = error
                waiting = [job for job in self._pending if isinstance(job, Generation)]
                self._pending.clear()
            for generation in waiting:
                generation.stats.stopped_by = "error"
                generation.finish(EngineError(str(error)))
            raise
        self._llm, self._config, self._unavailable = llm, config, None
        self._unpark()
        if failure is not None:
            raise ModelLoadError(f"{common.explain(failure)}; {old_config.model_path.stem} was loaded back") from failure

    def _unpark(self) -> None:
        with self._wakeup:
            self._parked = False
            self._wakeup.notify_all()

    async def close(self) -> None:
        await self._watchdog.stop()
        self._watchdog.check()  # a dead worker is replaced, so that what it held is failed
        with self._wakeup:
            for job in self._pending:
                if isinstance(job, Generation):
                    job.finish(EngineError("the bot is shutting down"))
                elif not job.done.done():  # a reload waiting for the worker: it ends too
                    job.done.set_exception(EngineError("the bot is shutting down"))
                    if job.llm is not None:
                        job.llm.close()
            self._pending.clear()
            self._closing = True
            self._wakeup.notify()
        await asyncio.to_thread(self._watchdog.join)
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # ---- the worker thread -------------------------------------------------------------

    def _has_work(self) -> bool:
        return self._current is not None or bool(self._pending)

    def _take(self) -> Generation | _Swap | None:
        with self._wakeup:
            while not self._pending and not self._closing:
                self._wakeup.wait(self._config.watchdog_seconds)
                self._watchdog.beat()
            if not self._pending:
                return None
            job = self._pending.popleft()
            if isinstance(job, Generation):
                self._current = job
            waiting = [j for j in self._pending if isinstance(j, Generation)]
        for position, generation in enumerate(waiting, start=1):  # behind the one starting now
            self._loop.call_soon_threadsafe(generation.set_position, position)
        return job

    def _run(self, crash: EngineError | None = None) -> None:
        """The worker thread: `crash` is set when it replaces one that died (see Watchdog)."""
        if crash is not None:
            self._recover(crash)
        while True:
            self._watchdog.beat()
            try:
                job = self._take()
                if job is None:
                    return
                if isinstance(job, _Swap) and job.llm is None:
                    self._park(job)
                elif isinstance(job, _Swap):
                    old, self._llm, self._config = self._llm, job.llm, job.config
                    # Freed on the loop thread, where count_tokens may be reading its vocabulary.
                    self._loop.call_soon_threadsafe(finish_swap, old, job.done)
                else:
                    self._serve(job)
            except Exception as error:  # a bug outside a generation: fail its job, serve on
                log.exception("llama worker: unexpected error")
                self._watchdog.note(error)
                if self._current is not None:
                    self._current.stats.stopped_by = "error"
                    self._current.finish(as_engine_error(error))
                self._current = None

    def _park(self, swap: _Swap) -> None:
        """Wait, touching nothing, while the loop side unloads and loads models."""
        self._loop.call_soon_threadsafe(_resolve, swap.done)
        with self._wakeup:
            while self._parked and not self._closing:
                self._wakeup.wait(self._config.watchdog_seconds)
                self._watchdog.beat()

    def _recover(self, crash: EngineError) -> None:
        """First thing in a worker that replaces a dead one: fail what it was generating and
        forget the context's tokens (the dead one may have left them half evaluated)."""
        job, self._current = self._current, None
        if job is not None:
            job.stats.stopped_by = "error"
            job.finish(crash)
        if self._llm is not None:
            self._llm.reset()

    def _serve(self, job: Generation) -> None:
        error: EngineError | None = None
        if job.cancelled.is_set():
            job.stats.stopped_by = "cancelled"
        else:
            try:
                self._generate(job)
            except EngineError as exc:  # this request cannot be served (too long)
                job.stats.stopped_by = "error"
                error = exc
            except Exception as exc:  # report to the caller, keep the worker alive
                log.exception("generation failed")
                self._watchdog.note(exc)
                job.stats.stopped_by = "error"
                error = as_engine_error(exc)
                self._llm.reset()  # what failed may have left the cache half written
            self._last_stats = job.stats
        self._current = None
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
                self._watchdog.beat()  # per token (not during the prompt: see stuck_seconds)
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


@dataclass
class _Swap:
    """In the queue: switch to `llm` here; `llm` None: park here (an unload-then-load swap)."""

    config: LlamaConfig
    llm: Any
    done: asyncio.Future[None]


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _llama_cpp() -> Any:
    """The low-level module (imported late: the bot starts before llama.cpp is needed)."""
    import llama_cpp

    return llama_cpp
