"""A draft model for speculative decoding (`DRAFT_MODEL_PATH`): a small GGUF with the served
model's vocabulary (a 1.1B or 7B Llama-2-vocabulary model for the 70B) that proposes the
next tokens of a reply; the served model verifies them in one batch (bot.engine.scheduler).

The draft model has a context of its own with one sequence per slot of the served model,
in the same scheduler thread. Each proposal first brings the slot's draft sequence up to
the reply's tokens (what is already evaluated there is kept, the rest evaluated in
chunks), then decodes greedily, one token at a time. A greedy draft is certain of its
token, so the verifier's sample-then-compare rule keeps sampled replies in the served
model's distribution (bot.engine.scheduler, `_verify`).

A draft model whose vocabulary differs from the served model's is refused when it loads
(`vocabulary_mismatch`, the checks of llama.cpp's own speculative example).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bot.engine.base import ModelLoadError
from bot.engine.batch_context import BatchConfig, BatchContext
from bot.engine.prefix_store import common_prefix

log = logging.getLogger(__name__)
MAX_VOCAB_DIFFERENCE = 128  # as llama.cpp's speculative example: padding tokens at the end
CATCH_UP_COUNTED = 16  # a catch-up this short is a step's accepted tokens: counted in the cost
FIRST_COMPARED = 5  # ids below this are control tokens whose texts differ between conversions


def vocabulary_mismatch(draft: BatchContext, target: BatchContext) -> str | None:
    """Why `draft` cannot propose tokens for `target`, or None when it can."""
    lib = target.lib
    if lib.llama_vocab_type(draft.vocab) != lib.llama_vocab_type(target.vocab):
        return "its tokenizer is of another type"
    if abs(draft.n_vocab - target.n_vocab) > MAX_VOCAB_DIFFERENCE:
        return f"its vocabulary has {draft.n_vocab} tokens, the served model's {target.n_vocab}"
    for name in ("llama_vocab_bos", "llama_vocab_eos"):
        if getattr(lib, name)(draft.vocab) != getattr(lib, name)(target.vocab):
            return f"its {name.removeprefix('llama_vocab_')} token differs"
    for token in range(FIRST_COMPARED, min(draft.n_vocab, target.n_vocab)):
        if lib.llama_vocab_get_text(draft.vocab, token) != lib.llama_vocab_get_text(target.vocab, token):
            return f"token {token} is {draft.piece(token)!r} there and {target.piece(token)!r} in the served model"
    return None


class DraftModel:
    """The loaded draft model: one sequence per slot of the served model. Used by the
    scheduler thread alone."""

    def __init__(self, llama: BatchContext, n_target_vocab: int, name: str) -> None:
        self.llama, self.name = llama, name
        self.n_target_vocab = n_target_vocab
        self._evaluated: list[list[int]] = [[] for _ in range(llama.n_parallel)]
        self.seconds_per_token = 0.0  # a proposed token's cost (moving average), for the plan

    @classmethod
    def load(cls, path: Path, config: BatchConfig, target: BatchContext) -> DraftModel:
        """Load `path` beside the served model, sized for its slots; refuse another vocabulary."""
        llama = BatchContext(replace(config, model_path=path, n_parallel=target.n_parallel, ram_cache_mb=0))
        try:
            cls.check(llama, target, path)
        except BaseException:
            llama.close()
            raise
        log.info("draft model %s: proposing tokens for %s (%d sequences)", path.name, config.model_path.name,
                 llama.n_parallel)
        return cls(llama, target.n_vocab, path.stem)

    @staticmethod
    def check(draft: BatchContext, target: BatchContext, path: Path) -> None:
        if reason := vocabulary_mismatch(draft, target):
            raise ModelLoadError(
                f"the draft model {path.name} cannot draft for this model: {reason}. DRAFT_MODEL_PATH needs a "
                "model with the same vocabulary (for a Llama-2 model: another Llama-2-vocabulary GGUF)"
            )

    def fits(self, target: BatchContext) -> bool:
        """For a hot swap: whether this draft model drafts for `target` too (logged if not).
        Reads the vocabularies only: any thread may ask."""
        if reason := vocabulary_mismatch(self.llama, target):
            log.warning("draft model %s is off: it cannot draft for %s (%s)", self.name, "the new model", reason)
            return False
        return True

    def reset(self, target: BatchContext) -> None:
        """Draft for `target` from now on (a new served model, checked by `fits`): every draft
        sequence forgotten (its slots start empty), tokens past its vocabulary never proposed."""
        self.n_target_vocab = target.n_vocab
        self._evaluated = [[] for _ in range(self.llama.n_parallel)]
        for seq in range(self.llama.n_parallel):
            self.llama.forget(seq)

    def propose(self, seq: int, context: Sequence[int], count: int) -> list[int]:
        """Up to `count` greedy tokens after `context` (the reply so far, its next token
        last), from the draft sequence `seq`."""
        if count <= 0 or not context or seq >= len(self._evaluated):
            return []
        llama, evaluated = self.llama, self._evaluated[seq]
        keep = min(common_prefix(evaluated, context), len(context) - 1)
        if not llama.forget(seq, keep):
            llama.forget(seq)
            keep = 0
        del evaluated[keep:]
        began = time.perf_counter()  # a step's catch-up (the tokens just accepted) is part of the cost
        counted = len(context) - keep <= CATCH_UP_COUNTED
        index = 0
        while len(evaluated) < len(context):  # catch up with the reply: chunks of a batch
            chunk = list(context[len(evaluated) : len(evaluated) + llama.n_batch])
            last = len(evaluated) + len(chunk) == len(context)
            start = len(evaluated)
            llama.decode([(token, start + i, seq, last and i == len(chunk) - 1) for i, token in enumerate(chunk)])
            evaluated.extend(chunk)
            index = len(chunk) - 1
        if not counted:  # a new prompt's evaluation is paid once a turn, not per draft
            began = time.perf_counter()
        drafts: list[int] = []
        while True:
            token = llama.argmax(index)
            if token >= self.n_target_vocab or llama.is_end(token):
                break
            drafts.append(token)
            if len(drafts) == count:
                break
            llama.decode([(token, len(evaluated), seq, True)])
            evaluated.append(token)
            index = 0
        if drafts:
            spent = (time.perf_counter() - began) / len(drafts)
            self.seconds_per_token = spent if not self.seconds_per_token else 0.8 * self.seconds_per_token + 0.2 * spent
        return drafts

    def close(self) -> None:
        self.llama.close()


class ModelDrafts:
    """One generation's drafts from the draft model: the reply's tokens so far and its
    slot's draft sequence (the same interface as `lookup.PromptLookup`)."""

    def __init__(self, model: DraftModel, seq: int, context: Sequence[int]) -> None:
        self.model, self.seq = model, seq
        self.context = list(context)

    @property
    def seconds_per_token(self) -> float:
        return self.model.seconds_per_token

    def extend(self, token: int) -> None:
        self.context.append(token)

    def draft(self, limit: int) -> list[int]:
        return self.model.propose(self.seq, self.context, limit)
