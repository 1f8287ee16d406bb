"""The evaluation scorer (training.gguf_scorer) against an independent reference: the same
continuations scored from llama-cpp-python's `Llama` logits, one text at a time. Batched
decodes take other CPU kernels, so log-probabilities agree to a tolerance, and the choice
each item's scores pick is the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bot.engine.repack import open_llama
from training.gguf_scorer import Choice, GGUFScorer

ITEMS = [
    ("Question: What colour is the sky on a clear day?\nAnswer:", [" blue", " green", " red, like blood"]),
    ("The capital of France is", [" Paris", " Berlin", " a small village by the sea"]),
    ("", [" Hello there.", " Zebra quantum"]),
]


def reference(path: Path, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    llm = open_llama(path, n_ctx=512, logits_all=True, verbose=False)
    try:
        out = []
        for context, continuation in pairs:
            tokens = context + continuation
            llm.reset()
            llm.eval(tokens)
            rows = np.array(llm.scores[: len(tokens)], dtype=np.float64)
            total = 0.0
            for k, token in enumerate(continuation):
                row = rows[len(context) - 1 + k]
                total += row[token] - row.max() - np.log(np.exp(row - row.max()).sum())
            out.append(total)
        return out
    finally:
        llm.close()


@pytest.mark.llama
def test_scores_agree_with_llama_log_probabilities_and_pick_the_same_choices(gguf_path: Path) -> None:
    scorer = GGUFScorer(gguf_path, n_ctx=512, n_seq=8, n_batch=128)
    try:
        choices, pairs = [], []
        for context, options in ITEMS:
            ctx = scorer.tokenize(context, add_bos=True) if context else []
            for option in options:
                cont = scorer.tokenize(option)
                choices.append(Choice(tuple(ctx), tuple(cont)))
                pairs.append((ctx or scorer.prefix(), cont))
        ours = scorer.score(choices)
        alone = [scorer.score([c])[0] for c in choices]
        text = scorer.generate(scorer.tokenize(ITEMS[1][0], add_bos=True), ["\n", "."], 12)
    finally:
        scorer.close()
    theirs = reference(gguf_path, pairs)
    for (logprob, _), (single, _), expected in zip(ours, alone, theirs, strict=True):
        assert abs(logprob - expected) < 0.6, (logprob, expected)
        assert abs(logprob - single) < 0.6
    start = 0
    for _, options in ITEMS:
        span = slice(start, start + len(options))
        assert np.argmax([s for s, _ in ours[span]]) == np.argmax(theirs[span])
        start += len(options)
    assert text and "\n" not in text and "." not in text
