"""ENGINE=openai against a real llama-server's `/v1/completions`: prefix reuse on and off.

    python -m benchmarks.openai_prefix [--conversations 4] [--turns 10] [--new-tokens 16]

`--conversations` conversations talk at once through one llama-server (`--parallel` slots),
each waiting for its reply before its next turn, with the bot's own prompt builder. With
reuse (the default: `cache_prompt: true`, a per-conversation `user`) each turn's prompt
starts with the previous one and the server evaluates only the new part; without
(`reuse_prefix=False`: `cache_prompt: false`) it evaluates every prompt whole, as a server
without a prefix cache would. Printed: turn 10's prompt, tokens evaluated and time to first
token (best of `--repeat` runs, each on a fresh server), and the tokens reused over turns 2-10.

Needs the llama-server binary: built into ~/.cache/hermes-llama-tools on first use
(tests/llama_server.py), about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
from pathlib import Path

from bot.core.conversation import Message
from bot.core.prompt import build_prompt
from bot.engine.base import GenerationRequest, GenerationStats, SamplingParams
from bot.engine.openai_compat import OpenAIConfig, OpenAIEngine
from tests.llama_server import LlamaServer, server_binary, small_model

GREEDY = SamplingParams(temperature=0.0, seed=1)
TOPICS = ["lighthouses", "tides", "glaciers", "volcanoes", "bees", "comets", "rivers", "deserts"]


async def conversation(engine: OpenAIEngine, name: str, topic: str, turns: int, new_tokens: int,
                       rng: random.Random) -> list[GenerationStats]:
    history: list[Message] = []
    seen = []
    for turn in range(turns):
        history.append(Message("u", "Ann", f"Turn {turn + 1}: tell me one more thing about {topic}, "
                               "how people studied them and what surprised them."))
        built = await asyncio.to_thread(build_prompt, history, engine.count_tokens, engine.info.n_ctx, new_tokens)
        generation = engine.submit(GenerationRequest(built.text, new_tokens, built.stop, GREEDY, name))
        text = await generation.text()
        history.append(Message("bot", "Hermes", text.strip() or "...", is_bot=True))
        seen.append(generation.stats)
        await asyncio.sleep(rng.uniform(0.0, 0.2))  # the person reads, then types
    return seen


async def one_run(binary: Path, model: Path, reuse: bool, args: argparse.Namespace) -> dict[str, float]:
    with LlamaServer(model, binary=binary, parallel=args.parallel, ctx_per_slot=args.n_ctx,
                     threads=args.threads) as server:
        engine = await OpenAIEngine.start(OpenAIConfig(
            base_url=server.url + "/v1", n_ctx=args.n_ctx, max_parallel=args.parallel, reuse_prefix=reuse,
            tokenizer_path=model,
        ))
        try:
            rng = random.Random(7)
            runs = await asyncio.gather(*(
                conversation(engine, f"guild:1:chan:{i}", TOPICS[i % len(TOPICS)], args.turns, args.new_tokens,
                             random.Random(rng.random()))
                for i in range(args.conversations)
            ))
        finally:
            await engine.close()
    later = [s for run in runs for s in run[1:]]
    last = [run[-1] for run in runs]
    return {
        "reused": sum(s.reused_tokens for s in later) / max(1, sum(s.prompt_tokens for s in later)),
        "prompt": statistics.mean(s.prompt_tokens for s in last),
        "evaluated": statistics.mean(s.prompt_tokens - s.reused_tokens for s in last),
        "ttft_mean": statistics.mean(s.prompt_seconds for s in last),
        "ttft_median": statistics.median(s.prompt_seconds for s in last),
    }


async def run(args: argparse.Namespace) -> None:
    binary = server_binary()
    assert binary is not None
    model = small_model()
    results: dict[str, list[dict[str, float]]] = {"with reuse": [], "without": []}
    for _ in range(args.repeat):
        for name, reuse in (("with reuse", True), ("without", False)):
            results[name].append(await one_run(binary, model, reuse, args))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmodel {model.name}; llama-server {binary} (/v1/completions through ENGINE=openai); "
          f"{os.cpu_count()} cores; load average now {load}")
    print(f"{args.conversations} conversations x {args.turns} turns at once, 1 server x {args.parallel} slots "
          f"({args.threads} threads), {args.new_tokens} new tokens per reply; best of {args.repeat} runs")
    print(f"{'mode':<12}{'reused t2-10':>13}{'t10 prompt':>12}{'t10 evaluated':>15}{'t10 TTFT mean':>15}"
          f"{'t10 TTFT median':>17}")
    best = {}
    for name, runs in results.items():
        r = best[name] = min(runs, key=lambda x: x["ttft_mean"])
        print(f"{name:<12}{r['reused']:>13.1%}{r['prompt']:>12.0f}{r['evaluated']:>15.1f}"
              f"{r['ttft_mean'] * 1000:>12.0f} ms{r['ttft_median'] * 1000:>14.0f} ms")
    ratio = best["without"]["ttft_mean"] / max(1e-9, best["with reuse"]["ttft_mean"])
    print(f"turn-10 time to first token: {ratio:.1f}x faster with reuse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="server slots")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
