"""The batching engine for a busy server: per-conversation KV reuse and continuous batching
over llama-cpp-python's low-level API (pinned: these functions change between releases).

One scheduler thread owns the llama context (`batch_context.BatchContext`), which holds
`n_parallel` sequence slots.
Every step decodes the next token of every generation under way in one `llama_batch`,
then feeds one chunk of a waiting prompt in its own call (so a long prompt never stalls
the others), and samples each sequence with its own sampler chain.

A conversation returns to the slot that already holds its evaluated prefix, so a follow-up
evaluates only its new tokens even when other channels spoke in between. When every slot
is taken, the least recently used idle slot's sequence state is copied to a bounded
host-RAM cache (`llama_state_seq_get_data`) and restored when its conversation returns.
Requests wait in a bounded FIFO queue; every active sequence advances one token per step.
An error ends only the generations it belongs to; a `common.Watchdog` restarts the thread
should anything still end it.

Sizing (`common.size_engine`, logged at load): `n_parallel=0` gives as many slots as the
free GPU memory (or RAM) holds after the model and a reserve, at most 16; the RAM cache
defaults to 8 full conversations; decode threads are the physical cores (a few with every
layer on the GPU). Hot swap loads the new model beside the old one when both fit, else
unloads the old one first: the scheduler finishes what is under way, parks, and requests
wait in the queue until the new model (or, when it fails, the old one again) is loaded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from bot.engine import common
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
    deliver_all,
)
from bot.engine.batch_context import BatchConfig, BatchContext
from bot.engine.batch_state import Job, Slot, Swap
from bot.engine.common import Watchdog, as_engine_error, finish_swap
from bot.engine.draft_model import DraftModel, ModelDrafts
from bot.engine.lookup import Speculation
from bot.engine.prefix_store import PrefixStats, PrefixStore, common_prefix
from bot.engine.text_stream import TextStream

log = logging.getLogger(__name__)
MIN_RESTORE_TOKENS = 32  # below this, re-evaluating is as cheap as restoring a saved state
# From 8 tokens in one decode llama.cpp's CPU kernels change and logits move (up to 0.94,
# measured): a verification batch stays below that, so greedy output stays the same tokens.
EXACT_BATCH = 7
FLUSH_SECONDS = 0.05  # how often streamed text is handed to the event loop


class BatchedEngine(Engine):
    """Continuous batching with conversation affinity. Build with `await BatchedEngine.start(config)`.

    An error ends only the generations it belongs to (a failed token batch: the jobs in
    it; a failed prompt chunk, sampler or slot preparation: that job), whose slots are
    cleared; the scheduler thread goes on. What still kills the thread is caught by the
    `Watchdog`, which starts a fresh one.
    """

    def __init__(self, config: BatchConfig, llama: BatchContext, loop: asyncio.AbstractEventLoop,
                 draft: DraftModel | None = None) -> None:
        self._config = config
        self._llama = llama
        self._loop = loop
        self._slots = [Slot(seq) for seq in range(llama.n_parallel)]
        self._ram: collections.OrderedDict[str, tuple[list[int], bytes]] = collections.OrderedDict()
        self._speculation = Speculation(config.draft_tokens, always=config.draft_always)
        self._draft = draft  # proposes the drafts instead of prompt lookup (DRAFT_MODEL_PATH)
        self._prefixes = PrefixStore(config.prefix_cache_mb * 2**20)
        self._pending: collections.deque[Generation] = collections.deque()
        self._admitting: list[Generation] = []  # taken from the queue, not yet in a slot
        self._wakeup = threading.Condition()
        self._swap: Swap | None = None
        self._offline = False  # unload-then-load swap: admit nothing, the model may be gone
        self._unavailable: ModelUnavailable | None = None  # no model could be loaded back
        self._reloading = asyncio.Lock()
        self._closing = False
        self._last_stats: GenerationStats | None = None
        self._outbox: list[tuple[Generation, str | BaseException | None]] = []  # not yet delivered
        self._flushed = 0.0
        self._watchdog = Watchdog(
            "llama-scheduler", self._run, self._has_work, config.stuck_seconds, config.watchdog_seconds
        )
        self._watchdog.start_thread()
        self._watchdog.watch(loop)
        log.info("batching engine: %d slots of %d tokens", llama.n_parallel, config.n_ctx)

    @property
    def sizing(self) -> common.Sizing | None:
        """The loaded model's slots, RAM cache and threads (None while none is loaded)."""
        return self._llama.sizing if self._llama is not None else None

    @classmethod
    async def start(cls, config: BatchConfig) -> BatchedEngine:
        llama = await asyncio.to_thread(BatchContext, config)
        draft = None
        if config.draft_model_path is not None and config.draft_tokens > 0:
            try:
                draft = await asyncio.to_thread(DraftModel.load, config.draft_model_path, config, llama)
            except BaseException:
                llama.close()
                raise
        return cls(config, llama, asyncio.get_running_loop(), draft)

    # ---- the Engine interface (event loop side) ---------------------------------------

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self._config.model_path.stem, path=str(self._config.model_path), n_ctx=self._config.n_ctx)

    @property
    def n_parallel(self) -> int:
        return self._llama.n_parallel

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    @property
    def health(self) -> EngineHealth:
        return self._watchdog.health

    def count_tokens(self, text: str) -> int:
        llama = self._llama  # None during an unload-then-load swap: count as many as could be
        return len(llama.tokenize(text)) if llama is not None else common.token_upper_bound(text)  # vocabulary only

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request, asyncio.get_running_loop(), dequeue=self._dequeue)
        with self._wakeup:
            if self._unavailable is not None:
                raise EngineError(str(self._unavailable))
            if len(self._pending) >= self._config.max_queue:
                raise EngineBusy(f"{len(self._pending)} requests are already waiting; try again in a minute")
            self._pending.append(generation)
            busy = self._offline or all(slot.job is not None for slot in self._slots)
            generation.set_position(len(self._pending) if busy else 0)
            self._wakeup.notify()
        return generation

    def _dequeue(self, generation: Generation) -> None:
        """`Generation.cancel()` (any thread): a request still waiting ends now."""
        with self._wakeup:
            try:
                self._pending.remove(generation)
            except ValueError:
                return  # already taken by the scheduler (which sees `cancelled`) or finished
            for position, other in enumerate(self._pending, start=1):
                other.set_position(position)
        generation.stats.stopped_by = "cancelled"
        generation.finish()

    async def plan_reload(self, path: str | None = None) -> ReloadPlan:
        config = self._target(path)
        if self._llama is None:
            return ReloadPlan("unload", "no model is loaded now")
        return await asyncio.to_thread(common.plan_swap, config.model_path, config.n_gpu_layers, self._llama.kv_bytes)

    def _target(self, path: str | None) -> BatchConfig:
        return self._config if path is None else replace(self._config, model_path=Path(path))

    async def reload(self, path: str | None = None) -> ModelInfo:
        config = self._target(path)
        async with self._reloading:
            plan = await self.plan_reload(path)
            if plan.mode == "beside":
                llama = await asyncio.to_thread(BatchContext, config)  # the old model keeps serving
                fits = await asyncio.to_thread(self._draft_fits, llama)
                done: asyncio.Future[None] = self._loop.create_future()
                with self._wakeup:
                    self._swap = Swap(config, llama, done, fits)
                    self._wakeup.notify()
                await done
            else:
                await self._reload_unloading(config, plan)
        log.info("now serving %s", config.model_path)
        return self.info

    async def _reload_unloading(self, config: BatchConfig, plan: ReloadPlan) -> None:
        """Finish what is under way, park the scheduler, free the old model, load the new one
        (the old one again if that fails); requests wait in the queue meanwhile."""
        log.warning("hot swap by unloading (%s): offline until %s is loaded; requests wait", plan.detail, config.model_path.name)
        drained: asyncio.Future[None] = self._loop.create_future()
        with self._wakeup:
            self._offline = True  # nothing more is admitted
            self._swap = Swap(config, None, drained)
            self._wakeup.notify()
        try:
            await drained  # the scheduler is parked: it touches neither the model nor the slots
        except BaseException:
            with self._wakeup:
                self._offline = False
                self._wakeup.notify()
            raise
        old, old_config = self._llama, self._config
        self._llama = None  # count_tokens counts without a vocabulary meanwhile
        self._ram.clear()  # saved states belong to the old model
        self._prefixes.clear()
        self._speculation.new_model()  # and what a step costs
        failure: BaseException | None = None
        try:
            if old is None:  # nothing to unload or to go back to (an earlier swap lost both);
                llama = await asyncio.to_thread(BatchContext, config)  # failing, `_unavailable` stays
            else:
                config, llama, failure = await common.unload_then_load(old, old_config, config, BatchContext)
        except ModelUnavailable as error:
            self._no_model(error)
            raise
        fits = await asyncio.to_thread(self._draft_fits, llama)
        with self._wakeup:
            self._llama, self._config, self._unavailable = llama, config, None
            self._slots = [Slot(seq) for seq in range(llama.n_parallel)]
            self._keep_draft(fits, llama)  # the scheduler is still parked: this thread may use the draft model
            self._offline = False
            self._wakeup.notify()
        if failure is not None:
            raise ModelLoadError(f"{common.explain(failure)}; {old_config.model_path.stem} was loaded back") from failure

    def _no_model(self, error: ModelUnavailable) -> None:
        """Neither model could be loaded: fail what waits, refuse what comes, until a reload works."""
        log.critical("%s", error)
        with self._wakeup:
            self._unavailable = error
            waiting, self._pending = list(self._pending), collections.deque()
        for generation in waiting:
            generation.stats.stopped_by = "error"
            generation.put(EngineError(str(error)))

    async def close(self) -> None:
        await self._watchdog.stop()
        self._watchdog.check()  # a dead scheduler is replaced, so that what it held is failed
        with self._wakeup:
            self._closing = True
            for generation in self._pending:
                generation.put(EngineError("the bot is shutting down"))
            self._pending.clear()
            swap, self._swap = self._swap, None
            self._wakeup.notify()
        await asyncio.to_thread(self._watchdog.join)
        if swap is not None:  # a reload waiting for the scheduler: it ends too
            if swap.llama is not None:
                swap.llama.close()
            if not swap.done.done():
                swap.done.set_exception(EngineError("the bot is shutting down"))
        if self._llama is not None:
            self._llama.close()
            self._llama = None
        if self._draft is not None:
            self._draft.close()
            self._draft = None

    # ---- the scheduler thread ---------------------------------------------------------

    def slot_usage(self) -> tuple[int, int]:
        return len(self._active()), self._llama.n_parallel

    def _active(self) -> list[Job]:
        return [slot.job for slot in self._slots if slot.job is not None]

    def _has_work(self) -> bool:
        return bool(self._pending or self._admitting or self._swap) or any(slot.job for slot in self._slots)

    def _run(self, crash: EngineError | None = None) -> None:
        """The scheduler thread: `crash` is set when it replaces one that died (see Watchdog)."""
        if crash is not None:
            self._recover(crash)
        while True:
            self._watchdog.beat()
            with self._wakeup:
                # Parked while offline (an unload-then-load swap) with nothing under way.
                while not self._closing and not self._active() and self._swap is None and (
                    not self._pending or self._offline
                ):
                    self._wakeup.wait(self._config.watchdog_seconds)
                    self._watchdog.beat()
                if self._closing:
                    for job in self._active():
                        self._finish(job, EngineError("the bot is shutting down"))
                    self._flush()
                    return
                if self._swap is not None and not self._active():
                    self._do_swap()
                    continue
                if self._swap is None and not self._offline:
                    self._admitting = self._take_admissible()
            try:
                self._admit()
                self._step()
                self._flush()
            except Exception as error:  # whose it is cannot be told: end every job under way
                self._fail(self._active(), error, "scheduler step failed")
                for generation in self._admitting:
                    self._reject(generation, as_engine_error(error))
                self._admitting = []

    def _recover(self, crash: EngineError) -> None:
        """First thing in a scheduler that replaces a dead one: fail what it held, clear
        every slot (it may have died half way through writing one), deliver."""
        for generation in self._admitting:
            self._reject(generation, crash)
        self._admitting = []
        for job in self._active():
            self._finish(job, crash)
        for slot in self._slots:
            self._reset_slot(slot)
        self._flush()

    def _reject(self, generation: Generation, error: EngineError) -> None:
        """End a generation that never got a slot."""
        generation.stats.stopped_by = "error"
        self._outbox.append((generation, error))

    def _fail(self, jobs: list[Job], error: Exception, what: str) -> None:
        """End `jobs` with `error` (logged with its traceback) and clear their slots."""
        log.error("%s: %d generation(s) failed", what, len(jobs), exc_info=error)
        self._watchdog.note(error)
        failure = as_engine_error(error)
        for job in jobs:
            try:
                if job.slot.job is job:
                    self._finish(job, failure)
            finally:
                self._reset_slot(job.slot)

    def _flush(self) -> None:
        """Deliver pending text to the event loop in one call, at most every FLUSH_SECONDS
        (or at once when a generation ends): each wake-up of the loop takes CPU from the
        decode threads, and nobody reads faster than Discord's one edit per second."""
        now = time.monotonic()
        ending = any(not isinstance(item, str) for _, item in self._outbox)
        if self._outbox and (ending or now - self._flushed >= FLUSH_SECONDS or not self._active()):
            self._loop.call_soon_threadsafe(deliver_all, self._outbox)
            self._outbox = []
            self._flushed = now

    def _do_swap(self) -> None:
        """Under the lock, nothing under way: switch models, or (no new model) just report
        that the scheduler is parked."""
        assert self._swap is not None
        swap, self._swap = self._swap, None
        if swap.llama is None:
            self._loop.call_soon_threadsafe(_resolve, swap.done)
            return
        old, self._llama, self._config = self._llama, swap.llama, swap.config
        self._slots = [Slot(seq) for seq in range(swap.llama.n_parallel)]
        self._ram.clear()  # saved states belong to the old model
        self._prefixes.clear()
        self._speculation.new_model()  # and what a step costs
        self._keep_draft(swap.draft_fits, swap.llama)
        self._loop.call_soon_threadsafe(finish_swap, old, swap.done)

    def _draft_fits(self, llama: BatchContext) -> bool:
        """Whether the draft model can draft for a newly loaded model (any thread: reads vocabularies)."""
        return self._draft is None or self._draft.fits(llama)

    def _keep_draft(self, fits: bool, llama: BatchContext) -> None:
        """At a swap to `llama`, nothing under way: the draft model starts afresh for it, or closes."""
        if self._draft is None:
            return
        if fits:
            self._draft.reset(llama)
        else:
            self._draft.close()
            self._draft = None

    def _take_admissible(self) -> list[Generation]:
        """Under the lock: as many waiting requests as there are free slots (FIFO)."""
        free = sum(slot.job is None for slot in self._slots)
        return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _admit(self) -> None:
        """Give each admitted request a slot, preferring the slot of its conversation."""
        if not self._admitting:
            return
        while self._admitting:  # each leaves the list once handled: see _recover
            generation = self._admitting[0]
            if generation.cancelled.is_set():
                generation.stats.stopped_by = "cancelled"
                self._outbox.append((generation, None))
            else:
                try:
                    self._start(generation)
                except Exception as error:  # this request only: its slot was cleared by _start
                    log.exception("starting a generation failed")
                    self._watchdog.note(error)
                    self._reject(generation, as_engine_error(error))
            self._admitting.pop(0)
        with self._wakeup:
            waiting = list(self._pending)
        for position, generation in enumerate(waiting, start=1):
            self._loop.call_soon_threadsafe(generation.set_position, position)

    def _start(self, generation: Generation) -> None:
        llama, request = self._llama, generation.request
        tokens = llama.tokenize(request.prompt)
        if len(tokens) + request.max_new_tokens > self._config.n_ctx:
            self._reject(generation, EngineError(
                f"prompt of {len(tokens)} tokens + {request.max_new_tokens} new tokens exceeds the context of {self._config.n_ctx}"
            ))
            return
        free = [slot for slot in self._slots if slot.job is None]
        conversation = request.conversation
        slot = next((s for s in free if conversation and s.conversation == conversation), None)
        if slot is None:
            slot = max(free, key=lambda s: (common_prefix(s.tokens, tokens), -s.last_used))
            if common_prefix(slot.tokens, tokens) < MIN_RESTORE_TOKENS:
                slot = self._compact_slot(free)
        try:
            self._prepare(slot, generation, tokens)
        except Exception:
            self._reset_slot(slot)  # half prepared: start it afresh next time
            raise

    def _compact_slot(self, free: list[Slot]) -> Slot:
        """A free slot for a request with no prefix to reuse: the one that keeps the busy
        sequence ids closest together, the least recently used among equals.

        With one KV stream per slot, llama.cpp attends over every stream from the lowest
        to the highest sequence id in a batch (`llama_kv_cache::get_k`: s0..s1): 4
        conversations in slots 0, 2, 5 and 7 cost 8 streams of attention. Measured here,
        4 scattered ones decoded 87 tokens/s, 4 in slots 0-3 115 (llama-batched-bench: 117)."""
        busy = [slot.seq for slot in self._slots if slot.job is not None]

        def span(slot: Slot) -> int:
            ids = [*busy, slot.seq]
            return max(ids) - min(ids)

        return min(free, key=lambda s: (span(s), s.last_used))

    def _prepare(self, slot: Slot, generation: Generation, tokens: list[int]) -> None:
        """Bring the slot's sequence to the longest usable prefix of `tokens`, then start."""
        llama, request = self._llama, generation.request
        conversation = request.conversation
        if not self._config.reuse_prefix:
            self._reset_slot(slot)
        elif slot.conversation != conversation:
            self._evict(slot)
            if conversation and conversation in self._ram:
                cached_tokens, state = self._ram.pop(conversation)
                if common_prefix(cached_tokens, tokens) >= MIN_RESTORE_TOKENS and llama.restore(slot.seq, state):
                    slot.tokens = cached_tokens
        if self._config.reuse_prefix and common_prefix(slot.tokens, tokens) < MIN_RESTORE_TOKENS:
            shared = self._prefixes.longest(tokens)  # a preamble another channel evaluated
            if shared is not None and len(shared[0]) >= MIN_RESTORE_TOKENS and llama.restore(slot.seq, shared[1]):
                slot.tokens = shared[0]
        keep = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)  # evaluate at least one token
        if not llama.forget(slot.seq, keep):
            llama.forget(slot.seq)
            keep = 0
        slot.tokens = tokens[:keep]
        slot.conversation = conversation
        slot.last_used = time.monotonic()
        sampling = request.sampling
        greedy = sampling.temperature <= 0 and sampling.repeat_penalty == 1.0
        job = Job(generation, tokens, llama.sampler(request), slot, TextStream(request.stop), fed=keep, greedy=greedy)
        source = ModelDrafts(self._draft, slot.seq, tokens) if self._draft is not None else None
        job.drafter = self._speculation.drafter(tokens, conversation, source)
        generation.stats.prompt_tokens = len(tokens)
        generation.stats.reused_tokens = keep
        job.share_at = self._share_point(request, tokens, keep)
        slot.job = job

    def _share_point(self, request: GenerationRequest, tokens: list[int], keep: int) -> int | None:
        """Where the prompt's shared preamble ends, if it is to be kept: the prefill stops
        there once to save the slot's state (see `_keep_preamble`)."""
        if request.shared_prefix_chars <= 0 or not self._config.reuse_prefix or self._prefixes.budget <= 0:
            return None
        preamble = self._llama.tokenize(request.prompt[: request.shared_prefix_chars])
        return self._prefixes.share_point(preamble, tokens, keep, MIN_RESTORE_TOKENS)

    def prefix_stats(self) -> PrefixStats:
        """The shared-preamble store: entries, bytes, hits (for /status and the log)."""
        return self._prefixes.stats

    def _evict(self, slot: Slot) -> None:
        """Move an idle slot's sequence to the RAM cache (if it is worth keeping), then clear it."""
        budget = self._llama.sizing.ram_cache_mb * 2**20
        if slot.conversation and len(slot.tokens) >= MIN_RESTORE_TOKENS and budget > 0:
            try:
                state = self._llama.save(slot.seq)
            except Exception as error:  # MemoryError, mostly: that conversation re-evaluates later
                log.warning("could not keep conversation %s in RAM (%s)", slot.conversation, error, exc_info=True)
                self._watchdog.note(error)
            else:
                self._ram[slot.conversation] = (list(slot.tokens), state)
                self._ram.move_to_end(slot.conversation)
                while sum(len(s) for _, s in self._ram.values()) > budget:
                    self._ram.popitem(last=False)
        self._reset_slot(slot)

    def _reset_slot(self, slot: Slot) -> None:
        slot.tokens, slot.conversation = [], None
        if self._llama is not None:  # None: unloaded for a swap, the slots are replaced after it
            self._llama.forget(slot.seq)

    def _step(self) -> None:
        """One scheduling step: a token for every generating sequence in one llama_decode,
        then one chunk of one waiting prompt in its own llama_decode.

        Keeping prompt chunks out of the token batch keeps every computation exactly as it
        would be alone: llama.cpp switches to other matmul kernels for batches beyond a
        few dozen tokens (measured: up to 0.95 difference in a logit), so a prompt mixed
        with others would not produce the tokens it produces alone.

        A failed decode ends the jobs it was for; a failed sample, the job it was for.
        """
        generating: list[tuple[Job, int, list[int]]] = []  # job, its first entry, its drafts
        entries: list[tuple[int, int, int, bool]] = []
        ready = []
        for job in self._active():
            if job.generation.cancelled.is_set():
                job.generation.stats.stopped_by = "cancelled"
                self._finish(job)
            elif job.next_token is not None:
                ready.append(job)
        planned = self._speculation.plan([(job.drafter, self._room(job)) for job in ready])
        for job, drafts in zip(ready, planned, strict=True):
            generating.append((job, len(entries), drafts))
            position, seq = len(job.slot.tokens), job.slot.seq
            for i, token in enumerate([job.next_token, *drafts]):
                entries.append((token, position + i, seq, True))
            job.slot.tokens.extend([job.next_token, *drafts])
            job.next_token = None
        if entries:
            try:
                began = time.perf_counter()
                self._llama.decode(entries)
            except Exception as error:
                self._fail([job for job, _, _ in generating], error, "decoding a token batch failed")
                generating = []
            for job, index, drafts in generating:
                try:
                    self._verify(job, index, drafts)
                except Exception as error:
                    self._fail([job], error, "sampling failed")
            if generating:  # decode and verification: what the step's tokens cost
                self._speculation.observe(len(generating), len(entries), time.perf_counter() - began)
        prefilling = [job for job in self._active() if job.fed < len(job.tokens)]
        if prefilling:
            job = min(prefilling, key=lambda j: j.started)  # oldest first: FIFO fairness
            try:
                self._prefill(job)
            except Exception as error:
                self._fail([job], error, "evaluating a prompt failed")

    def _room(self, job: Job) -> int:
        """Draft tokens the job may take after its next one: its limit, the context, a batch."""
        left = job.generation.request.max_new_tokens - job.produced - 1  # the next token is produced already
        return min(left, self._config.n_ctx - len(job.slot.tokens) - 1, self._llama.n_batch - 1, EXACT_BATCH - 1)

    def _verify(self, job: Job, index: int, drafts: list[int]) -> None:
        """Sample the job's token after its last evaluated one, then, for each draft that
        token turned out to be, the token after that: the longest run the model agrees
        with. Sampling each position in order and keeping a draft only when it is what was
        sampled is the speculative-sampling rule for a draft that is certain of its token
        (accept with probability p(draft); on a miss, the sample drawn without it), so
        sampled replies keep the model's distribution and greedy ones are the same tokens.
        The drafts after the first miss leave the KV cache."""
        start = len(job.slot.tokens) - 1 - len(drafts)  # where the job's next token went
        kept = 1 + len(drafts)
        accepted = 0
        for i in range(len(drafts) + 1):
            token = self._sample(job, index + i)
            matched = i < len(drafts) and token == drafts[i]
            self._accept(job, token)
            if job.slot.job is not job:  # finished (the end, a stop string, the limit)
                kept = i + 1
                break
            if not matched:
                kept = i + 1
                break
            accepted += 1
            job.next_token = None  # it is already evaluated: it was the draft
        if drafts and job.drafter is not None:
            job.drafter.acceptance.record(len(drafts), accepted)
            job.generation.stats.drafted_tokens += len(drafts)
            job.generation.stats.accepted_tokens += accepted
        if kept < 1 + len(drafts):
            del job.slot.tokens[start + kept :]
            if not self._llama.forget(job.slot.seq, start + kept):
                finished = job.slot.job is not job
                self._reset_slot(job.slot)
                if not finished:
                    raise EngineError("llama.cpp could not drop rejected drafts from the KV cache")

    def _prefill(self, job: Job) -> None:
        """Evaluate the next chunk of a job's prompt; sample its first token after the last.
        A chunk ends where the shared preamble does, whose state is then kept for others."""
        end = job.fed + self._llama.n_batch
        if job.share_at is not None and job.fed < job.share_at < end:
            end = job.share_at
        chunk = job.tokens[job.fed : end]
        done = job.fed + len(chunk) == len(job.tokens)
        self._llama.decode(
            [(token, job.fed + i, job.slot.seq, done and i == len(chunk) - 1) for i, token in enumerate(chunk)]
        )
        job.slot.tokens.extend(chunk)
        job.fed += len(chunk)
        if job.fed == job.share_at:  # never the last chunk: the share point is before the last token
            job.share_at = None
            self._keep_preamble(job)
        if done:
            self._accept(job, self._sample(job, len(chunk) - 1))

    def _keep_preamble(self, job: Job) -> None:
        """The slot holds exactly the shared preamble now: keep a copy for other channels."""
        try:
            state = self._llama.save(job.slot.seq)
        except MemoryError as error:  # that preamble is evaluated again next time
            log.warning("could not keep a shared preamble (%s)", error)
            self._watchdog.note(error)
            return
        if self._prefixes.put(job.tokens[: job.fed], state):
            stats = self._prefixes.stats
            log.info("kept a shared preamble of %d tokens for other channels (%d kept, %.0f MiB)",
                     job.fed, stats.entries, stats.bytes / 2**20)

    def _sample(self, job: Job, index: int) -> int:
        if job.greedy:
            return self._llama.argmax(index)
        return int(self._llama.lib.llama_sampler_sample(job.sampler, self._llama.ctx, index))

    def _accept(self, job: Job, token: int) -> None:
        """Turn a sampled token into text; stop at EOG, a stop string or the token limit."""
        stats, request = job.generation.stats, job.generation.request
        now = time.perf_counter()
        if job.first is None:
            job.first = now
            stats.prompt_seconds = now - job.started
        if self._llama.is_end(token):
            return self._finish(job, reason="stop")
        job.produced += 1
        piece = job.text.feed(self._llama.piece(token))
        if piece:
            self._outbox.append((job.generation, piece))
        if job.text.stopped:
            return self._finish(job, reason="stop")
        if job.produced >= request.max_new_tokens:
            return self._finish(job, reason="length")
        job.next_token = token
        if job.drafter is not None:
            job.drafter.source.extend(token)
        return None

    def _finish(self, job: Job, error: BaseException | None = None, reason: str | None = None) -> None:
        job.slot.job = None  # first: whatever fails below, the slot is free
        job.slot.last_used = time.monotonic()
        stats = job.generation.stats
        if error is None and (rest := job.text.rest()):
            self._outbox.append((job.generation, rest))
        stats.completion_tokens = job.produced
        stats.generation_seconds = time.perf_counter() - (job.first or job.started)
        stats.stopped_by = "error" if error is not None else reason or stats.stopped_by or "stop"
        self._last_stats = stats
        self._outbox.append((job.generation, error))
        self._llama.lib.llama_sampler_free(job.sampler)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
