"""The batching engine for a busy server: per-conversation KV reuse and continuous batching
over llama-cpp-python's low-level API (pinned: these functions change between releases).

One scheduler thread owns the llama context, which holds `n_parallel` sequence slots.
Every step decodes the next token of every generation under way in one `llama_batch`,
then feeds one chunk of a waiting prompt in its own call (so a long prompt never stalls
the others), and samples each sequence with its own sampler chain.

A conversation returns to the slot that already holds its evaluated prefix, so a follow-up
evaluates only its new tokens even when other channels spoke in between. When every slot
is taken, the least recently used idle slot's sequence state is copied to a bounded
host-RAM cache (`llama_state_seq_get_data`) and restored when its conversation returns.
Requests wait in a bounded FIFO queue; every active sequence advances one token per step.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
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
    deliver_all,
)
from bot.engine.llama import check_model_file, finish_swap

log = logging.getLogger(__name__)
MIN_RESTORE_TOKENS = 32  # below this, re-evaluating is as cheap as restoring a saved state
FLUSH_SECONDS = 0.05  # how often streamed text is handed to the event loop


@dataclass(frozen=True)
class BatchConfig:
    model_path: Path
    n_ctx: int = 4096  # per conversation
    n_parallel: int = 0  # sequence slots; 0 = size from the KV memory (see auto_parallel)
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 256  # tokens per decode step (prompt chunks + one per generation)
    ram_cache_mb: int = 1024  # host RAM for sequence states evicted from their slot
    max_queue: int = 32
    kv_budget_mb: int = 2048  # what `n_parallel: 0` may spend on KV cache
    reuse_prefix: bool = True  # False: evaluate every prompt from scratch (benchmarks)


class _Llama:
    """A loaded model and its context: thin, typed wrappers over the low-level calls."""

    def __init__(self, config: BatchConfig) -> None:
        import llama_cpp

        self.lib = llama_cpp
        check_model_file(config.model_path, config.n_gpu_layers)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if config.n_gpu_layers < 0 else config.n_gpu_layers
        # No repacked CPU weight layouts: their kernels change with the batch size, so a
        # sequence decoded beside others got logits up to 0.8 away from decoding alone.
        # Without them, batches of up to 7 sequences are bit-identical to decoding alone
        # (from 8 tokens on, ggml switches kernels again: up to 0.59 apart). Measured cost
        # on the small model: none beyond noise (prompt 715-720 vs 722-779 tokens/s,
        # decode 70-72 vs 69-74).
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(config.model_path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {config.model_path.name} (corrupt or unsupported file)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_parallel = config.n_parallel or self.auto_parallel(config)
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = config.n_ctx * self.n_parallel
        context.n_batch = context.n_ubatch = config.n_batch
        context.n_seq_max = self.n_parallel
        context.kv_unified = False  # one KV stream of n_ctx cells per slot, laid out as if alone
        context.swa_full = True  # sliding-window models keep whole prefixes reusable
        # As llama-cpp-python does: half the cores for one-token steps (memory-bound; more
        # threads only contend), all of them for batches.
        cores = os.cpu_count() or 1
        context.n_threads = config.n_threads or max(1, cores // 2)
        context.n_threads_batch = config.n_threads or cores
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError(
                f"llama.cpp could not create a context of {context.n_ctx} tokens for {config.model_path.name}: "
                "lower N_CTX or N_PARALLEL"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self.n_batch = config.n_batch

    def auto_parallel(self, config: BatchConfig) -> int:
        """Slots that fit the KV budget: 2 (K and V) × layers × KV width × n_ctx × 2 bytes."""
        lib = self.lib
        layers = lib.llama_model_n_layer(self.model)
        width = lib.llama_model_n_embd(self.model) * lib.llama_model_n_head_kv(self.model) // max(
            1, lib.llama_model_n_head(self.model)
        )
        per_slot = 2 * layers * width * config.n_ctx * 2
        return max(1, min(8, config.kv_budget_mb * 2**20 // max(1, per_slot)))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self.lib.llama_token * size)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, size, add_bos, False)
        if n < 0:
            size = -n
            buffer = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, size, add_bos, False)
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
        return buffer.raw[:n]

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def sampler(self, request: GenerationRequest) -> Any:
        lib, s = self.lib, request.sampling
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(self.n_vocab, 64, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(0.05, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed >= 0 else int(time.time_ns() & 0xFFFFFFFF)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def forget(self, seq: int, start: int = 0) -> bool:
        """Drop positions >= start of a sequence (False if the cache cannot cut there)."""
        return bool(self.lib.llama_memory_seq_rm(self.memory, seq, start, -1))

    def save(self, seq: int) -> bytes:
        size = self.lib.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        return ctypes.string_at(buffer, written)  # one memcpy (slicing would build a list)

    def restore(self, seq: int, state: bytes) -> bool:
        self.forget(seq)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return self.lib.llama_state_seq_set_data(self.ctx, buffer, len(state), seq) > 0

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants_logits) entries."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} (context full or out of memory)")

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@dataclass
class _Slot:
    seq: int
    conversation: str | None = None
    tokens: list[int] = field(default_factory=list)  # evaluated into this sequence's KV cache
    last_used: float = 0.0
    job: _Job | None = None


@dataclass
class _Job:
    generation: Generation
    tokens: list[int]  # the prompt
    sampler: Any
    slot: _Slot
    fed: int = 0  # prompt tokens evaluated so far
    next_token: int | None = None  # sampled, not yet evaluated
    produced: int = 0
    raw: bytearray = field(default_factory=bytearray)
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` already pushed to the caller
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchedEngine(Engine):
    """Continuous batching with conversation affinity. Build with `await BatchedEngine.start(config)`."""

    def __init__(self, config: BatchConfig, llama: _Llama, loop: asyncio.AbstractEventLoop) -> None:
        self._config = config
        self._llama = llama
        self._loop = loop
        self._slots = [_Slot(seq) for seq in range(llama.n_parallel)]
        self._ram: collections.OrderedDict[str, tuple[list[int], bytes]] = collections.OrderedDict()
        self._pending: collections.deque[Generation] = collections.deque()
        self._wakeup = threading.Condition()
        self._swap: tuple[BatchConfig, _Llama, asyncio.Future[None]] | None = None
        self._closing = False
        self._last_stats: GenerationStats | None = None
        self._outbox: list[tuple[Generation, str | BaseException | None]] = []  # not yet delivered
        self._flushed = 0.0
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()
        log.info("batching engine: %d slots of %d tokens", llama.n_parallel, config.n_ctx)

    @classmethod
    async def start(cls, config: BatchConfig) -> BatchedEngine:
        llama = await asyncio.to_thread(_Llama, config)
        return cls(config, llama, asyncio.get_running_loop())

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

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text))  # reads only the vocabulary

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request, asyncio.get_running_loop())
        with self._wakeup:
            if len(self._pending) >= self._config.max_queue:
                raise EngineBusy(f"{len(self._pending)} requests are already waiting; try again in a minute")
            self._pending.append(generation)
            busy = all(slot.job is not None for slot in self._slots)
            generation.set_position(len(self._pending) if busy else 0)
            self._wakeup.notify()
        return generation

    async def reload(self, path: str | None = None) -> ModelInfo:
        config = self._config if path is None else replace(self._config, model_path=Path(path))
        llama = await asyncio.to_thread(_Llama, config)  # the old model keeps serving
        done: asyncio.Future[None] = self._loop.create_future()
        with self._wakeup:
            self._swap = (config, llama, done)
            self._wakeup.notify()
        await done
        log.info("now serving %s", config.model_path)
        return self.info

    async def close(self) -> None:
        with self._wakeup:
            self._closing = True
            for generation in self._pending:
                generation.put(EngineError("the bot is shutting down"))
            self._pending.clear()
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)
        self._llama.close()

    # ---- the scheduler thread ---------------------------------------------------------

    def _active(self) -> list[_Job]:
        return [slot.job for slot in self._slots if slot.job is not None]

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._closing and not self._pending and not self._active() and self._swap is None:
                    self._wakeup.wait()
                if self._closing:
                    for job in self._active():
                        self._finish(job, EngineError("the bot is shutting down"))
                    self._flush()
                    return
                if self._swap is not None and not self._active():
                    self._do_swap()
                    continue
                admitted = self._take_admissible() if self._swap is None else []
            self._admit(admitted)
            try:
                self._step()
            except Exception as error:  # a failed decode ends the jobs in it, not the engine
                log.exception("decode step failed")
                for job in self._active():
                    self._finish(job, error if isinstance(error, EngineError) else EngineError(str(error)))
                    self._reset_slot(job.slot)
            self._flush()

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
        assert self._swap is not None
        config, llama, done = self._swap
        old, self._llama, self._config, self._swap = self._llama, llama, config, None
        self._slots = [_Slot(seq) for seq in range(llama.n_parallel)]
        self._ram.clear()  # saved states belong to the old model
        self._loop.call_soon_threadsafe(finish_swap, old, done)

    def _take_admissible(self) -> list[Generation]:
        """Under the lock: as many waiting requests as there are free slots (FIFO)."""
        free = sum(slot.job is None for slot in self._slots)
        return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _admit(self, generations: list[Generation]) -> None:
        """Give each admitted request a slot, preferring the slot of its conversation."""
        for generation in generations:
            if generation.cancelled.is_set():
                generation.stats.stopped_by = "cancelled"
                self._outbox.append((generation, None))
                continue
            self._start(generation, [slot for slot in self._slots if slot.job is None])
        if generations:
            with self._wakeup:
                waiting = list(self._pending)
            for position, generation in enumerate(waiting, start=1):
                self._loop.call_soon_threadsafe(generation.set_position, position)

    def _start(self, generation: Generation, free: list[_Slot]) -> None:
        llama, request = self._llama, generation.request
        tokens = llama.tokenize(request.prompt)
        if len(tokens) + request.max_new_tokens > self._config.n_ctx:
            self._outbox.append((generation, EngineError(
                f"prompt of {len(tokens)} tokens + {request.max_new_tokens} new tokens exceeds the context of {self._config.n_ctx}"
            )))
            return
        conversation = request.conversation
        slot = next((s for s in free if conversation and s.conversation == conversation), None)
        if slot is None:
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, tokens), -s.last_used))
            if _common_prefix(slot.tokens, tokens) < MIN_RESTORE_TOKENS:
                slot = min(free, key=lambda s: s.last_used)  # least recently used
        if not self._config.reuse_prefix:
            self._reset_slot(slot)
        elif slot.conversation != conversation:
            self._evict(slot)
            if conversation and conversation in self._ram:
                cached_tokens, state = self._ram.pop(conversation)
                if _common_prefix(cached_tokens, tokens) >= MIN_RESTORE_TOKENS and llama.restore(slot.seq, state):
                    slot.tokens = cached_tokens
        keep = min(_common_prefix(slot.tokens, tokens), len(tokens) - 1)  # evaluate at least one token
        if not llama.forget(slot.seq, keep):
            llama.forget(slot.seq)
            keep = 0
        slot.tokens = tokens[:keep]
        slot.conversation = conversation
        slot.last_used = time.monotonic()
        job = _Job(generation, tokens, llama.sampler(request), slot, fed=keep)
        generation.stats.prompt_tokens = len(tokens)
        generation.stats.reused_tokens = keep
        slot.job = job

    def _evict(self, slot: _Slot) -> None:
        """Move an idle slot's sequence to the RAM cache (if it is worth keeping), then clear it."""
        if slot.conversation and len(slot.tokens) >= MIN_RESTORE_TOKENS and self._config.ram_cache_mb > 0:
            state = self._llama.save(slot.seq)
            self._ram[slot.conversation] = (list(slot.tokens), state)
            self._ram.move_to_end(slot.conversation)
            budget = self._config.ram_cache_mb * 2**20
            while sum(len(s) for _, s in self._ram.values()) > budget:
                self._ram.popitem(last=False)
        self._reset_slot(slot)

    def _reset_slot(self, slot: _Slot) -> None:
        self._llama.forget(slot.seq)
        slot.tokens, slot.conversation = [], None

    def _step(self) -> None:
        """One scheduling step: a token for every generating sequence in one llama_decode,
        then one chunk of one waiting prompt in its own llama_decode.

        Keeping prompt chunks out of the token batch keeps every computation exactly as it
        would be alone: llama.cpp switches to other matmul kernels for batches beyond a
        few dozen tokens (measured: up to 0.95 difference in a logit), so a prompt mixed
        with others would not produce the tokens it produces alone.
        """
        generating: list[_Job] = []
        entries: list[tuple[int, int, int, bool]] = []
        for job in self._active():
            if job.generation.cancelled.is_set():
                job.generation.stats.stopped_by = "cancelled"
                self._finish(job)
            elif job.next_token is not None:
                entries.append((job.next_token, len(job.slot.tokens), job.slot.seq, True))
                job.slot.tokens.append(job.next_token)
                job.next_token = None
                generating.append(job)
        if entries:
            self._llama.decode(entries)
            for index, job in enumerate(generating):
                self._accept(job, self._sample(job, index))
        prefilling = [job for job in self._active() if job.fed < len(job.tokens)]
        if prefilling:
            job = min(prefilling, key=lambda j: j.started)  # oldest first: FIFO fairness
            chunk = job.tokens[job.fed : job.fed + self._llama.n_batch]
            done = job.fed + len(chunk) == len(job.tokens)
            self._llama.decode(
                [(token, job.fed + i, job.slot.seq, done and i == len(chunk) - 1) for i, token in enumerate(chunk)]
            )
            job.slot.tokens.extend(chunk)
            job.fed += len(chunk)
            if done:
                self._accept(job, self._sample(job, len(chunk) - 1))

    def _sample(self, job: _Job, index: int) -> int:
        return int(self._llama.lib.llama_sampler_sample(job.sampler, self._llama.ctx, index))

    def _accept(self, job: _Job, token: int) -> None:
        """Turn a sampled token into text; stop at EOG, a stop string or the token limit."""
        stats, request = job.generation.stats, job.generation.request
        now = time.perf_counter()
        if job.first is None:
            job.first = now
            stats.prompt_seconds = now - job.started
        if self._llama.is_end(token):
            return self._finish(job, reason="stop")
        job.produced += 1
        job.raw += self._llama.piece(token)
        try:
            job.text = job.raw.decode("utf-8")
        except UnicodeDecodeError:  # a multi-byte character still incomplete
            if job.produced < request.max_new_tokens:
                job.next_token = token
                return None
        hits = [job.text.find(stop, max(0, job.sent - len(stop))) for stop in request.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            job.text = job.text[: min(hits)]
            return self._finish(job, reason="stop")
        if job.produced >= request.max_new_tokens:
            return self._finish(job, reason="length")
        hold = max((len(stop) - 1 for stop in request.stop), default=0)  # could be a stop's start
        safe = max(job.sent, len(job.text) - hold)
        if safe > job.sent:
            self._outbox.append((job.generation, job.text[job.sent : safe]))
            job.sent = safe
        job.next_token = token
        return None

    def _finish(self, job: _Job, error: BaseException | None = None, reason: str | None = None) -> None:
        stats = job.generation.stats
        if job.sent < len(job.text) and error is None:
            self._outbox.append((job.generation, job.text[job.sent :]))
        stats.completion_tokens = job.produced
        stats.generation_seconds = time.perf_counter() - (job.first or job.started)
        stats.stopped_by = reason or stats.stopped_by or ("error" if error else "stop")
        self._llama.lib.llama_sampler_free(job.sampler)
        job.slot.job = None
        job.slot.last_used = time.monotonic()
        self._last_stats = stats
        self._outbox.append((job.generation, error))

