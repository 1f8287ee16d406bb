"""A persona's preamble evaluated once for every channel: the first reply in 8 new channels
that share a 1,500-token card, with the prefix store and without.

    python -m benchmarks.shared_prefix [--channels 8] [--card-tokens 1500] [--repeat 3]

The channels speak one after another (each a new conversation in its own slot, as when the
bot is added to a server and people start talking in several channels). Printed: the time
to first token of channel 1 (which evaluates the card in either case) and the mean over
channels 2-8, best of `--repeat` runs, each on a fresh engine; and the store's size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from pathlib import Path

from bot.core.conversation import Message
from bot.core.prompt import preamble_length, render_chat
from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.scheduler import BatchConfig, BatchedEngine
from tests.llama_server import small_model

CHAT = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, seed=7)
FACTS = ["She keeps the lighthouse on Gull Island.", "She has logged every ship for forty years.",
         "She distrusts the mainland and its officials.", "She loves strong tea and autumn storms.",
         "Her brother Tomas drowned when she was twelve.", "She reads old sea charts by lamplight.",
         "She speaks in short, dry sentences.", "She feeds the gulls on the north rocks at dawn.",
         "She once rowed out alone to save three sailors.", "She keeps a cat called Barnacle."]
QUESTIONS = ["Who are you?", "What is the weather like?", "Tell me about the ships.", "Do you have a pet?",
             "What do you drink?", "Why do you live here?", "What scares you?", "Sing me a sea song."]


def card(model: Path, tokens: int) -> str:
    """Card text of about `tokens` tokens of the model (counted with its vocabulary)."""
    from bot.engine.vocab import VocabTokenizer

    vocab = VocabTokenizer(model)
    try:
        text, i = "Mara Vell is the keeper of the Gull Island light.", 0
        while len(vocab.tokenize(text)) < tokens:
            text += f" {FACTS[i % len(FACTS)]} (Note {i}.)"
            i += 1
        return text
    finally:
        vocab.close()


async def one_run(model: Path, preamble: str, store_mb: int, args: argparse.Namespace) -> list[float]:
    engine = await BatchedEngine.start(BatchConfig(model, n_ctx=2048, n_gpu_layers=0, n_parallel=args.channels,
                                                   prefix_cache_mb=store_mb))
    try:
        seconds = []
        for i in range(args.channels):
            text = render_chat([Message("u", "Ann", QUESTIONS[i % len(QUESTIONS)])], preamble)
            generation = engine.submit(GenerationRequest(text, 8, (), CHAT, f"guild:1:chan:{i}",
                                                         shared_prefix_chars=preamble_length(text)))
            await generation.text()
            seconds.append(generation.stats.prompt_seconds)
        stats = engine.prefix_stats()
        args.kept = f"{stats.entries} preamble(s), {stats.bytes / 2**20:.1f} MiB, {stats.hits} hits"
        return seconds
    finally:
        await engine.close()


async def run(args: argparse.Namespace) -> None:
    model = small_model()
    preamble = card(model, args.card_tokens)
    results = {}
    for name, store_mb in (("without", 0), ("with the store", 256)):
        runs = [await one_run(model, preamble, store_mb, args) for _ in range(args.repeat)]
        results[name] = min(runs, key=lambda r: statistics.mean(r[1:]))
        if store_mb:
            kept = args.kept
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmodel {model.name}; {os.cpu_count()} cores; load average now {load}; a card of about "
          f"{args.card_tokens} tokens; {args.channels} new channels one after another; best of {args.repeat}")
    print(f"{'':<16}{'channel 1 TTFT':>16}{'channels 2-%d TTFT' % args.channels:>20}")
    for name, seconds in results.items():
        print(f"{name:<16}{seconds[0] * 1000:>13.0f} ms{statistics.mean(seconds[1:]) * 1000:>17.0f} ms")
    ratio = statistics.mean(results["with the store"][1:]) / statistics.mean(results["without"][1:])
    print(f"channels 2-{args.channels}: {ratio:.3f}x the time to first token with the store; kept: {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--card-tokens", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
