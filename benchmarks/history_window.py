"""Reading a conversation's recent window costs the same with 10 or 1,000,000 messages.

    python -m benchmarks.history_window [--messages 1000000]

Fills a real SQLite file (migrated as the bot does) with one conversation of N messages
among other conversations' messages, then times `Store.recent_messages(key, 200)`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, select

from bot.storage.store import ConversationRow, MessageRow, Store


async def fill(store: Store, key: str, count: int) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(insert(ConversationRow).values(key=key, enabled=False, created_at=datetime.now(UTC)))
        conversation_id = (await connection.execute(select(ConversationRow.id).where(ConversationRow.key == key))).scalar_one()
        now = datetime.now(UTC)
        for start in range(0, count, 50_000):
            rows = [
                {"conversation_id": conversation_id, "platform_id": str(i), "author_id": "1", "author_name": "Ann",
                 "is_bot": i % 2 == 1, "content": f"message {i} " + "x" * 80, "created_at": now}
                for i in range(start, min(count, start + 50_000))
            ]
            await connection.execute(insert(MessageRow), rows)


async def time_window(store: Store, key: str, stored: int, repeats: int = 50) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        window = await store.recent_messages(key, 200)
        samples.append(time.perf_counter() - started)
    if len(window) != min(200, stored):
        raise SystemExit(f"expected {min(200, stored)} messages, read {len(window)}")
    return statistics.median(samples) * 1000


async def run(messages: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = await Store.open(f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}")
        await fill(store, "small", 10)
        await fill(store, "window", 200)
        started = time.perf_counter()
        await fill(store, "large", messages)
        print(f"filled {messages} messages in {time.perf_counter() - started:.1f} s")
        timings = {n: await time_window(store, key, n) for key, n in (("small", 10), ("window", 200), ("large", messages))}
        await store.close()
    for stored, ms in timings.items():
        print(f"recent window (up to 200) of a {stored:>9}-message conversation: {ms:.2f} ms (median of 50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    asyncio.run(run(parser.parse_args().messages))


if __name__ == "__main__":
    main()
