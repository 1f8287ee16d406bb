"""The remote engine over real llama-server processes: conversation affinity vs round robin,
and aggregate decode speed with one and two servers.

    python -m benchmarks.fleet [--conversations 8] [--turns 10] [--new-tokens 16] [--cache-ram MiB]

1. Affinity vs round robin: two servers (`--parallel` slots each, one thread each), and
   `--conversations` conversations talking at once, each waiting for its reply before its
   next turn (a short random pause between turns, the same seed for both modes). Reported:
   the prompt-cache hit rate (prompt tokens reused from a slot's KV cache or from the
   server's RAM prompt cache, over all prompt tokens of turns 2 and later), and turn 10's
   prompt, tokens evaluated and time to first token. Fresh servers for each mode.
   llama-server keeps evicted slots in a RAM prompt cache (`--cache-ram`, 8 GiB by default),
   which also helps round robin; `--cache-ram 0` shows the difference without it.
2. Aggregate tokens/s: the same number of long generations at once on one server (all the
   cores, all the slots; and with half the cores) and on two servers (the cores and slots
   split between them). Completion tokens over wall time, prompts included.
   On a machine with two cores, two servers cannot add speed: the numbers are as measured.

Needs the llama-server binary: built into ~/.cache/hermes-llama-tools on first use
(tests/llama_server.py), about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

from bot.core.conversation import Message
from bot.engine.base import GenerationRequest, GenerationStats, SamplingParams
from bot.engine.remote import RemoteEngine
from bot.core.prompt import build_prompt
from tests.llama_server import LlamaServer, server_binary, small_model

GREEDY = SamplingParams(temperature=0.0, seed=1)
COUNTING = "Count from one to five hundred, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8,"
TOPICS = ["lighthouses", "tides", "glaciers", "volcanoes", "bees", "comets", "rivers", "deserts"]


async def conversation(engine: RemoteEngine, name: str, topic: str, turns: int, new_tokens: int,
                       rng: random.Random) -> list[GenerationStats]:
    history: list[Message] = []
    seen = []
    for turn in range(turns):
        history.append(Message("u", "Ann", f"Turn {turn + 1}: tell me one more thing about {topic}, "
                               "how people studied them and what surprised them."))
        built = build_prompt(history, engine.count_tokens, engine.info.n_ctx, new_tokens)
        generation = engine.submit(GenerationRequest(built.text, new_tokens, built.stop, GREEDY, name))
        text = await generation.text()
        history.append(Message("bot", "Hermes", text.strip() or "...", is_bot=True))
        seen.append(generation.stats)
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # the person reads, then types
    return seen


async def affinity_run(binary: Path, model: Path, affinity: bool, args: argparse.Namespace) -> dict[str, float]:
    servers = [LlamaServer(model, binary=binary, parallel=args.parallel, ctx_per_slot=args.n_ctx, threads=1,
                           cache_ram_mb=args.cache_ram) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        engine = await RemoteEngine.start([s.url for s in servers], n_ctx=args.n_ctx, tokenizer_path=model,
                                          affinity=affinity, max_queue=64)
        try:
            rng = random.Random(7)
            began = time.perf_counter()
            runs = await asyncio.gather(*(
                conversation(engine, f"guild:1:chan:{i}", TOPICS[i % len(TOPICS)], args.turns, args.new_tokens,
                             random.Random(rng.random()))
                for i in range(args.conversations)
            ))
            wall = time.perf_counter() - began
            placement = [row["conversations"] for row in engine.servers()]
        finally:
            await engine.close()
    finally:
        for server in servers:
            server.stop()
    later = [s for run in runs for s in run[1:]]
    last = [run[-1] for run in runs]
    return {
        "hit": sum(s.reused_tokens for s in later) / max(1, sum(s.prompt_tokens for s in later)),
        "prompt": statistics.mean(s.prompt_tokens for s in last),
        "evaluated": statistics.mean(s.prompt_tokens - s.reused_tokens for s in last),
        "ttft_mean": statistics.mean(s.prompt_seconds for s in last),
        "ttft_median": statistics.median(s.prompt_seconds for s in last),
        "ttft_all": statistics.mean(s.prompt_seconds for s in later),
        "wall": wall,
        "placement": placement,
    }


async def throughput_run(
    binary: Path, model: Path, n_servers: int, threads: int, args: argparse.Namespace
) -> dict[str, float]:
    slots = max(1, args.streams // n_servers)
    servers = [LlamaServer(model, binary=binary, parallel=slots, ctx_per_slot=1024, threads=threads)
               for _ in range(n_servers)]
    try:
        for server in servers:
            server.start()
        engine = await RemoteEngine.start([s.url for s in servers], n_ctx=1024, tokenizer_path=model, max_queue=64)
        try:
            prompts = [f"### Instruction:\nUser {i}: {COUNTING}\n\n### Response:\n" for i in range(args.streams)]
            began = time.perf_counter()
            generations = [engine.submit(GenerationRequest(p, args.long_tokens, (), GREEDY, f"bench:{i}"))
                           for i, p in enumerate(prompts)]
            await asyncio.gather(*(g.text() for g in generations))
            wall = time.perf_counter() - began
        finally:
            await engine.close()
    finally:
        for server in servers:
            server.stop()
    tokens = sum(g.stats.completion_tokens for g in generations)
    return {"servers": n_servers, "threads": threads, "slots": slots, "tokens": tokens, "wall": wall,
            "tps": tokens / wall}


async def run(args: argparse.Namespace) -> None:
    binary = server_binary()
    assert binary is not None
    model = small_model()
    modes = {}
    for name, affinity in (("affinity", True), ("round robin", False)):
        modes[name] = await affinity_run(binary, model, affinity, args)
    cores = os.cpu_count() or 2
    # One server with all the cores, one with a core per server's share, the cores split.
    layouts = [(1, cores), (1, max(1, cores // 2)), (2, max(1, cores // 2))]
    speed = [await throughput_run(binary, model, n, threads, args) for n, threads in dict.fromkeys(layouts)]
    cache = "server default (8192 MiB)" if args.cache_ram is None else f"{args.cache_ram} MiB"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmodel {model.name}; llama-server {binary}; {os.cpu_count()} cores; load average now {load}")
    print(f"{args.conversations} conversations x {args.turns} turns at once, 2 servers x {args.parallel} slots "
          f"(1 thread each), {args.new_tokens} new tokens per reply, server RAM prompt cache: {cache}")
    print(f"{'mode':<13}{'hit rate':>9}{'t10 prompt':>12}{'t10 evaluated':>15}{'t10 TTFT mean':>15}"
          f"{'t10 TTFT median':>17}{'TTFT t2-10':>12}{'wall s':>8}  conversations per server")
    for name, r in modes.items():
        print(f"{name:<13}{r['hit']:>9.1%}{r['prompt']:>12.0f}{r['evaluated']:>15.1f}{r['ttft_mean'] * 1000:>12.0f} ms"
              f"{r['ttft_median'] * 1000:>14.0f} ms{r['ttft_all'] * 1000:>9.0f} ms{r['wall']:>8.1f}  {r['placement']}")
    print(f"\n{args.streams} generations of {args.long_tokens} tokens at once")
    print(f"{'servers':<9}{'threads each':>13}{'slots each':>12}{'tokens':>8}{'wall s':>8}{'tokens/s':>10}")
    for r in speed:
        print(f"{r['servers']:<9}{r['threads']:>13}{r['slots']:>12}{r['tokens']:>8}{r['wall']:>8.1f}{r['tps']:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="slots per server (affinity runs)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    parser.add_argument("--cache-ram", type=int, default=None, help="llama-server --cache-ram MiB (0: off)")
    parser.add_argument("--streams", type=int, default=8, help="generations at once (throughput runs)")
    parser.add_argument("--long-tokens", type=int, default=64, help="tokens per generation (throughput runs)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
