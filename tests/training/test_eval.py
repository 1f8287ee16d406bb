"""`hermes-train eval`: the real evaluation harness (lm-eval) on this project's offline task
(training/eval_tasks) and the real small GGUF, its scores checked against a reference
computed here from llama-cpp-python's `Llama` log-probabilities and greedy text; a hub task
that cannot be fetched and an unknown task each give a clear error, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.engine.repack import open_llama
from training.cli import main
from training.evaluate import LOCAL_TASKS, Column, expand, table

pytestmark = pytest.mark.llama


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS / name).read_text().splitlines() if line.strip()]


def logprob_after(llm: Any, whole: list[int], start: int) -> float:
    """Sum of log p(whole[k] | whole[:k]) for k from `start`, from `Llama`'s logits (one
    text evaluated alone)."""
    llm.reset()
    llm.eval(whole)
    logits = np.array(llm.scores[: len(whole)], dtype=np.float64)
    total = 0.0
    for k in range(start, len(whole)):
        row = logits[k - 1]
        total += row[whole[k]] - row.max() - np.log(np.exp(row - row.max()).sum())
    return total


def reference_scores(path: Path) -> tuple[float, float, float]:
    """acc and acc_norm of hermes_local_mc, exact_match of hermes_local_gen, from `Llama`:
    each choice scored alone (context and choice tokenized together, split where the
    context ends), the generation greedy with the task's stops."""
    llm = open_llama(path, n_ctx=512, logits_all=True, verbose=False)
    try:
        right = right_norm = 0
        items = rows("hermes_local_mc.jsonl")
        for item in items:
            context = f"Question: {item['question']}\nAnswer:"
            head = llm.tokenize(context.encode(), add_bos=True)
            scores, normed = [], []
            for choice in item["choices"]:
                whole = llm.tokenize((context + " " + choice).encode(), add_bos=True)
                total = logprob_after(llm, whole, len(head))
                scores.append(total)
                normed.append(total / len(" " + choice))
            right += int(np.argmax(scores)) == item["answer"]
            right_norm += int(np.argmax(normed)) == item["answer"]
        matched = 0
        generations = rows("hermes_local_gen.jsonl")
        for item in generations:
            llm.reset()
            out = llm.create_completion(f"Question: {item['question']}\nAnswer:", max_tokens=12, temperature=0.0,
                                        stop=["\n", "."])["choices"][0]["text"]
            matched += out.strip().lower() == item["answer"].lower()
        return right / len(items), right_norm / len(items), matched / len(generations)
    finally:
        llm.close()


def test_the_local_suite_through_the_harness_scores_what_llama_scores(gguf_path: Path, tmp_path: Path) -> None:
    assert main(["eval", "--compare", str(gguf_path), "--tasks", "local", "--out", str(tmp_path), "--n-gpu-layers",
                 "0"]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    got = {(r["task"], r["metric"]): r["values"][gguf_path.name] for r in data["rows"]}
    acc, acc_norm, exact = reference_scores(gguf_path)
    # Batched decodes use other CPU kernels than one text at a time: near-ties may flip.
    assert abs(got[("hermes_local_mc", "acc")]["value"] - acc) <= 0.03, (got, acc)
    assert abs(got[("hermes_local_mc", "acc_norm")]["value"] - acc_norm) <= 0.03, (got, acc_norm)
    assert abs(got[("hermes_local_gen", "exact_match")]["value"] - exact) <= 1 / 15 + 1e-9, (got, exact)
    assert 0 < got[("hermes_local_mc", "acc")]["stderr"] < 0.1
    markdown = (tmp_path / "eval.md").read_text()
    assert "| hermes_local_mc | acc |" in markdown and "Nous-Hermes-Llama2-70b card" in markdown
    assert "partial" not in markdown.lower()


def test_compare_puts_files_side_by_side_with_the_difference_and_limit_says_partial(
    gguf_path: Path, tmp_path: Path
) -> None:
    assert main(["eval", "--compare", str(gguf_path), str(gguf_path), "--tasks", "hermes_local_mc", "--limit", "8",
                 "--out", str(tmp_path), "--n-gpu-layers", "0"]) == 0
    markdown = (tmp_path / "eval.md").read_text()
    assert "**Partial: at most 8 items per task" in markdown and "(partial)" in markdown
    line = next(row for row in markdown.splitlines() if row.startswith("| hermes_local_mc | acc |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].split(" ± ")[0] == cells[3].split(" ± ")[0] and cells[4] == "+0.0000", cells


def test_a_hub_task_without_the_hub_is_a_clear_error(gguf_path: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "eval", "--compare", str(gguf_path), "--tasks", "arc_easy",
         "--limit", "2", "--out", str(tmp_path), "--n-gpu-layers", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: task arc_easy: its dataset could not be loaded" in done.stderr
    assert "hub, which is unreachable" in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_task_is_named(gguf_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--compare", str(gguf_path), "--tasks", "no_such_task", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err


def test_suites_are_the_card_tables_and_the_table_shows_the_card() -> None:
    assert expand(["gpt4all"]) == ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa",
                                   "winogrande"]
    assert len(expand(["bigbench"])) == 14 and len(expand(["agieval"])) == 8
    assert "bigbench_causal_judgment_multiple_choice" in expand(["bigbench"])
    assert expand(["local", "hermes_local_mc"]) == ["hermes_local_mc", "hermes_local_gen"]
    markdown, data = table([Column("mine.gguf", {("arc_easy", "acc"): (0.5, 0.01)})], None)
    assert "| arc_easy | acc | 0.5000 ± 0.0100 | 0.8422 |" in markdown
    assert data["rows"][0]["card"] == 0.8422


def test_rolling_log_likelihood_scores_every_token_once_as_llama_does(gguf_path: Path) -> None:
    """Perplexity tasks (`loglikelihood_rolling`): the sum over the text's tokens of log p(token
    | the tokens before it, at most the context window), after BOS. One window (a context of
    512 holds the text) and several (64: the harness's disjoint windows), each against the same
    sum from `Llama`'s log-probabilities."""
    from types import SimpleNamespace

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from training.eval_backend import HermesGGUF

    text = " ".join(f"The keeper of light {i} wrote down the ships that passed the island." for i in range(8))
    llm = open_llama(gguf_path, n_ctx=512, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False)
        bos = llm.token_bos()

        def reference(max_length: int) -> float:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=bos, max_seq_len=max_length, context_len=1)]
            assert sum(len(c) for _, c in windows) == len(tokens)  # every token once
            return sum(logprob_after(llm, [*c, *t], len(c)) for c, t in windows)

        expected = {n_ctx: reference(n_ctx) for n_ctx in (512, 64)}
    finally:
        llm.close()
    assert 100 < len(tokens) < 500
    for n_ctx, want in expected.items():
        backend = HermesGGUF(str(gguf_path), n_ctx=n_ctx, n_seq=4)
        try:
            (got,) = backend.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
        finally:
            backend.close()
        # Batched kernels move a log-prob by a little; over ~150 tokens well under 1 %.
        assert abs(got - want) <= 0.01 * abs(want) + 0.5, (n_ctx, got, want)
    assert expected[64] < expected[512]  # a shorter window predicts worse: the windows are real
