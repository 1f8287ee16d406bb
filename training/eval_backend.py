"""The evaluation harness's model backend for a GGUF: `hermes-gguf`, registered with
lm-evaluation-harness's model registry, computing what the harness asks (log-likelihoods,
rolling log-likelihoods, greedy generations) through llama.cpp in process
(training.gguf_scorer), so the figures are those of the file the bot serves.

    lm_eval --model hermes-gguf --model_args path=model.q4_k_m.gguf,n_gpu_layers=-1 --tasks arc_easy

Text becomes tokens as the harness's own `hf` backend does: the context and the
continuation are tokenized together and split where the context ends (spaces at the
context's end move to the continuation), so a word's tokens are those the model saw in
training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from training.gguf_scorer import Choice, GGUFScorer

log = logging.getLogger(__name__)
BACKEND = "hermes-gguf"


@register_model(BACKEND)
class HermesGGUF(LM):
    """A GGUF through llama.cpp. Arguments (`--model_args`): `path`, `n_ctx` (2048),
    `n_gpu_layers` (0; -1 = all, as the bot's N_GPU_LAYERS), `n_seq` (sequences per decode,
    16), `n_batch` (tokens per decode, 512), `max_gen_toks` (256)."""

    def __init__(self, path: str, n_ctx: int = 2048, n_gpu_layers: int = 0, n_seq: int = 16,
                 n_batch: int = 512, max_gen_toks: int = 256, n_threads: int | None = None,
                 **ignored: Any) -> None:
        super().__init__()
        if ignored:
            log.info("hermes-gguf ignores %s", ", ".join(sorted(ignored)))
        self.scorer = GGUFScorer(Path(path), n_ctx=int(n_ctx), n_gpu_layers=int(n_gpu_layers), n_seq=int(n_seq),
                                 n_batch=int(n_batch), n_threads=int(n_threads) if n_threads else None)
        self.max_length = int(n_ctx)
        self.max_gen_toks = int(max_gen_toks)

    # ---- the harness's three requests ---------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        choices = [self._encode_pair(*request.args) for request in requests]
        with tqdm(total=len(choices), desc="log-likelihoods", disable=disable_tqdm) as bar:
            results = self.scorer.score(choices, progress=bar.update)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        prefix = self.scorer.prefix()
        totals = []
        for request in tqdm(requests, desc="rolling log-likelihoods", disable=disable_tqdm):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.scorer.tokenize(text), prefix_token=prefix[0] if prefix else 0,
                max_seq_len=self.max_length, context_len=1)]
            scores = self.scorer.score([Choice(tuple(c), tuple(t)) for c, t in windows])
            total = sum(logprob for logprob, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, desc="greedy generations", disable=disable_tqdm):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                log.warning("hermes-gguf generates greedily; ignoring the task's sampling settings %s", kwargs)
            text = self.scorer.generate(self.scorer.tokenize(context, add_bos=True), until, max_tokens)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    # ---- tokens ------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> Choice:
        """As the harness's `hf` backend: trailing spaces of the context go to the
        continuation; both tokenized as one text, split where the context's tokens end."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return Choice((), tuple(self.scorer.tokenize(continuation)))  # scored after BOS
        whole = self.scorer.tokenize(context + continuation, add_bos=True)
        head = self.scorer.tokenize(context, add_bos=True)
        return Choice(tuple(whole[: len(head)]), tuple(whole[len(head) :]))

    @property
    def tokenizer_name(self) -> str:
        return self.scorer.path.name

    def close(self) -> None:
        self.scorer.close()
