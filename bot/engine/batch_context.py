"""The batching engine's model and context: a loaded GGUF with `n_parallel` sequence slots,
and thin, typed wrappers over llama-cpp-python's low-level calls (tokenize, decode a batch,
sample, save and restore one sequence). Owned by the scheduler thread alone.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from bot.engine import common, llama_tokens, repack
from bot.engine.base import EngineError, GenerationRequest, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    model_path: Path
    n_ctx: int = 4096  # per conversation
    n_parallel: int = 0  # sequence slots; 0 = as many as free memory holds (common.size_engine)
    n_gpu_layers: int = -1
    n_threads: int | None = None  # None = physical cores (a few with every layer on the GPU)
    n_batch: int = 256  # tokens per decode step (prompt chunks + one per generation)
    ram_cache_mb: int | None = None  # host RAM for evicted sequence states; None = 8 conversations' worth
    max_queue: int = 32
    max_parallel: int = common.MAX_PARALLEL  # the most slots `n_parallel=0` picks
    reuse_prefix: bool = True  # False: evaluate every prompt from scratch (benchmarks)
    draft_tokens: int = 0  # draft tokens verified per step at most (bot.engine.lookup); 0 = none
    draft_model_path: Path | None = None  # a draft model instead of prompt lookup (bot.engine.draft_model)
    draft_always: bool = False  # draft every step, paying or not (benchmarks: measures the machinery)
    prefix_cache_mb: int = 0  # shared preambles kept evaluated (bot.engine.prefix_store); 0 = none
    stuck_seconds: float = 60.0  # work but no step for this long: /status says "stuck"
    watchdog_seconds: float = 1.0  # how often the watchdog looks at the scheduler thread
    repack: bool = field(default_factory=repack.from_environment)  # CPU weight repacking (bot.engine.repack)


class BatchContext:
    """A loaded model and its context: thin, typed wrappers over the low-level calls."""

    def __init__(self, config: BatchConfig) -> None:
        import llama_cpp

        self.lib = llama_cpp
        common.check_model_file(config.model_path, config.n_gpu_layers)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        llama_cpp.llama_backend_init()
        gpu = common.offloading(config.n_gpu_layers)
        memory = common.probe_memory(gpu)  # before loading: the model's own size is subtracted
        # Repacked CPU weight layouts are off by default (bot.engine.repack: AMX hosts crash).
        # Off also keeps batches exact: their kernels change with the batch size, so a
        # sequence decoded beside others got logits up to 0.8 away from decoding alone;
        # without them, batches of up to 7 sequences are bit-identical to decoding alone
        # (from 8 tokens on, ggml switches kernels again: up to 0.59 apart). Measured cost
        # on the small model: none beyond noise (prompt 715-720 vs 722-779 tokens/s,
        # decode 70-72 vs 69-74).
        params = repack.model_params(llama_cpp, config.repack)
        params.n_gpu_layers = 0x7FFFFFFF if config.n_gpu_layers < 0 else config.n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(config.model_path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {config.model_path.name} (corrupt or unsupported file)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.kv_per_token = common.kv_bytes_per_token(llama_cpp, self.model)
        self.sizing = common.size_engine(
            n_ctx=config.n_ctx, kv_per_token=self.kv_per_token, model_bytes=config.model_path.stat().st_size,
            n_layer=llama_cpp.llama_model_n_layer(self.model), n_gpu_layers=config.n_gpu_layers, gpu=gpu,
            memory=memory, n_parallel=config.n_parallel, ram_cache_mb=config.ram_cache_mb,
            n_threads=config.n_threads, cap=config.max_parallel,
        )
        log.info("engine sizing for %s: %s [%s]", config.model_path.name, self.sizing.note, memory.describe())
        self.n_parallel = self.sizing.n_parallel
        self.kv_bytes = self.n_parallel * config.n_ctx * self.kv_per_token
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = config.n_ctx * self.n_parallel
        context.n_batch = context.n_ubatch = config.n_batch
        context.n_seq_max = self.n_parallel
        context.kv_unified = False  # one KV stream of n_ctx cells per slot, laid out as if alone
        context.swa_full = True  # sliding-window models keep whole prefixes reusable
        # Not llama-cpp-python's half the cores for one-token steps: measured on 2 cores,
        # 1 thread decodes at 0.70-0.94x the speed of 2 (docs/engine.md, "The batching engine").
        context.n_threads = self.sizing.n_threads
        context.n_threads_batch = self.sizing.n_threads_batch
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

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return llama_tokens.tokenize(self.lib, self.vocab, text, add_bos)

    def piece(self, token: int) -> bytes:
        return llama_tokens.piece(self.lib, self.vocab, token)

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

    def argmax(self, index: int) -> int:
        """Greedy sampling without a sampler chain: the chain first copies all n_vocab logits
        into a candidates array (0.18 ms a token for a 262k vocabulary, measured; numpy's
        argmax over the logits in place: 0.02 ms). Ties go to the lowest id, as in
        llama.cpp's greedy sampler."""
        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(numpy.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

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
