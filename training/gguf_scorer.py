"""Log-likelihoods and greedy generations from a GGUF through llama.cpp, in process: what
the evaluation harness asks of a model (training.eval_backend), computed on the file the bot
serves.

The model loads as the bot loads it: llama.cpp's low-level API, CPU weight repacking as
`LLAMA_REPACK` says (off by default: llama.cpp's repacked kernels crash on Intel CPUs with
AMX, bot.engine.repack), `n_gpu_layers` as the bot's `N_GPU_LAYERS`.

Batched: one KV cache shared by up to `n_seq` sequences (llama.cpp's unified cache), so a
multiple-choice item's context is evaluated once for all its choices (its tokens belong to
every choice's sequence) and several items share one decode, up to `n_batch` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy

from bot.engine import llama_tokens

log = logging.getLogger(__name__)


class ScorerError(RuntimeError):
    """The model could not be loaded or evaluated (the message says what to do)."""


@dataclass(frozen=True)
class Choice:
    """One continuation to score after a context, as token ids (an empty context: BOS)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def log_softmax_at(logits: numpy.ndarray, token: int) -> tuple[float, bool]:
    """log p(token) under `logits`, and whether it is the most likely token."""
    top = float(logits.max())
    total = top + float(numpy.log(numpy.exp(logits - top, dtype=numpy.float64).sum()))
    return float(logits[token]) - total, int(logits.argmax()) == token


class GGUFScorer:
    """A loaded GGUF: `score` for log-likelihoods, `generate` for greedy text."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, n_gpu_layers: int = 0, n_seq: int = 16,
                 n_batch: int = 512, n_threads: int | None = None, repack: bool | None = None) -> None:
        import llama_cpp

        from bot.engine import common
        from bot.engine import repack as cpu

        self.lib, self.path = llama_cpp, path
        try:
            common.check_model_file(path, n_gpu_layers)
        except Exception as error:
            raise ScorerError(str(error)) from error
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        params = cpu.model_params(llama_cpp, cpu.from_environment() if repack is None else repack)
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ScorerError(f"llama.cpp could not load {path} (corrupt or unsupported file)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx, self.n_seq, self.n_batch = n_ctx, n_seq, n_batch
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = n_ctx
        context.n_batch = context.n_ubatch = n_batch
        context.n_seq_max = n_seq
        context.kv_unified = True  # a context's cells shared by all its choices' sequences
        context.swa_full = True
        if n_threads:
            context.n_threads = context.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ScorerError(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # llama.cpp caps a causal model's batch at the context size: decode no more than that
        # (a larger batch aborts the process in llama_decode).
        self.n_batch = min(n_batch, llama_cpp.llama_n_batch(self.ctx), llama_cpp.llama_n_ubatch(self.ctx))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    # ---- text and tokens ----------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return llama_tokens.tokenize(self.lib, self.vocab, text, add_bos and self.add_bos)

    def piece(self, token: int) -> bytes:
        return llama_tokens.piece(self.lib, self.vocab, token)

    def prefix(self) -> list[int]:
        """What an empty context is: BOS (where the model uses one)."""
        return [self.bos] if self.bos >= 0 else []

    # ---- log-likelihoods ----------------------------------------------------------------------

    def score(self, choices: Sequence[Choice], progress: Callable[[int], object] | None = None
              ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token), all of them greedy) per choice. Choices with the
        same context are evaluated together: the context once, each continuation in its own
        sequence; several contexts share a decode; a context too long for the model loses
        its oldest tokens."""
        results: list[tuple[float, bool]] = [(float("-inf"), False)] * len(choices)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, choice in enumerate(choices):
            groups.setdefault(choice.context, []).append(i)
        pending: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
        cells = seqs = 0
        for context, members in groups.items():
            for part in self._parts(context, [(i, list(choices[i].continuation)) for i in members]):
                size = _cells(part[0], [c for _, c in part[1]])
                if pending and (cells + size > self.n_batch or seqs + len(part[1]) > self.n_seq):
                    self._score_together(pending, results, progress)
                    pending, cells, seqs = [], 0, 0
                pending.append(part)
                cells, seqs = cells + size, seqs + len(part[1])
        if pending:
            self._score_together(pending, results, progress)
        return results

    def _parts(self, context: tuple[int, ...], members: list[tuple[int, list[int]]]
               ) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
        """A context's choices in parts that fit the KV cache and the sequences, each with
        the context as evaluated: at least one token (BOS for an empty one), its oldest
        tokens dropped where it and the longest continuation exceed the window."""
        parts: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
        current: list[tuple[int, list[int]]] = []
        for member in members:
            trial = current + [member]
            ctx = self._window(context, max(len(c) for _, c in trial))
            if current and (len(trial) > self.n_seq or _cells(ctx, [c for _, c in trial]) > self.n_ctx):
                parts.append((self._window(context, max(len(c) for _, c in current)), current))
                current = [member]
            else:
                current = trial
        if current:
            parts.append((self._window(context, max(len(c) for _, c in current)), current))
        return parts

    def _window(self, context: tuple[int, ...], longest: int) -> list[int]:
        ctx = list(context) or self.prefix()
        if _cells(ctx, [[0] * longest]) > self.n_ctx:
            ctx = ctx[-max(1, self.n_ctx - longest + 1) :]
        return ctx

    def _score_together(self, parts: list[tuple[list[int], list[tuple[int, list[int]]]]],
                        results: list[tuple[float, bool]], progress: Callable[[int], object] | None) -> None:
        """Decode the parts (in chunks of `n_batch`), read each continuation's log-probs, and
        clear the KV cache. A context's tokens belong to all its choices' sequences; the
        logits after its last token predict every choice's first token."""
        entries: list[tuple[int, int, list[int], bool]] = []  # token, position, sequences, wants logits
        reads: list[tuple[int, list[int], list[int]]] = []  # choice, the entries predicting it, its tokens
        seq = 0
        for ctx, members in parts:
            seqs = list(range(seq, seq + len(members)))
            seq += len(members)
            last = len(entries) + len(ctx) - 1
            entries.extend((token, pos, seqs, pos == len(ctx) - 1) for pos, token in enumerate(ctx))
            for (i, cont), s in zip(members, seqs, strict=True):
                if _cells(ctx, [cont]) > self.n_ctx:  # longer than the window by itself
                    cont = cont[-(self.n_ctx - len(ctx) + 1) :]
                predictors = [last]
                for k, token in enumerate(cont[:-1]):  # the last token predicts nothing we need
                    predictors.append(len(entries))
                    entries.append((token, len(ctx) + k, [s], True))
                if cont:
                    reads.append((i, predictors, cont))
        rows: dict[int, numpy.ndarray] = {}
        try:
            for start in range(0, len(entries), self.n_batch):
                chunk = entries[start : start + self.n_batch]
                self._decode(chunk)
                for j, entry in enumerate(chunk):
                    if entry[3]:
                        pointer = self.lib.llama_get_logits_ith(self.ctx, j)
                        rows[start + j] = numpy.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        finally:
            self.lib.llama_memory_clear(self.memory, True)
        for i, predictors, cont in reads:
            total, greedy = 0.0, True
            for row, token in zip(predictors, cont, strict=True):
                logprob, top = log_softmax_at(rows[row], token)
                total += logprob
                greedy = greedy and top
            results[i] = (total, greedy)
        if progress is not None:
            progress(sum(len(members) for _, members in parts))

    def _decode(self, entries: Sequence[tuple[int, int, list[int], bool]]) -> None:
        batch = self.batch
        for i, (token, pos, seqs, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, len(seqs)
            for k, s in enumerate(seqs):
                batch.seq_id[i][k] = s
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            self.lib.llama_memory_clear(self.memory, True)
            raise ScorerError(f"llama_decode failed with status {status} (context full or out of memory)")

    # ---- greedy generation ------------------------------------------------------------------

    def generate(self, context: Sequence[int], until: Sequence[str], max_tokens: int) -> str:
        """Greedy text after `context`, ending before the first of `until` (or at the end of
        text, or after `max_tokens`)."""
        ctx = (list(context) or self.prefix())[-max(1, self.n_ctx - max_tokens) :]
        text, out = "", b""
        try:
            index = 0
            for start in range(0, len(ctx), self.n_batch):
                chunk = ctx[start : start + self.n_batch]
                done = start + len(chunk) == len(ctx)
                self._decode([(t, start + k, [0], done and k == len(chunk) - 1) for k, t in enumerate(chunk)])
                index = len(chunk) - 1
            for position in range(len(ctx), min(self.n_ctx, len(ctx) + max_tokens)):
                pointer = self.lib.llama_get_logits_ith(self.ctx, index)
                token = int(numpy.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).argmax())
                if self.lib.llama_vocab_is_eog(self.vocab, token):
                    break
                out += self.piece(token)
                text = out.decode("utf-8", errors="ignore")
                cuts = [text.find(s) for s in until if s and s in text]
                if cuts:
                    return text[: min(cuts)]
                self._decode([(token, position, [0], True)])
                index = 0
        finally:
            self.lib.llama_memory_clear(self.memory, True)
        return text

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _cells(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
    """The KV cells a context and its continuations take: each continuation's last token is
    read, never evaluated (it predicts nothing scored)."""
    return len(context) + sum(max(0, len(c) - 1) for c in continuations)
