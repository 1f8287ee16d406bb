"""Long memory's background worker: builds and refreshes conversations' summaries with the
same engine, never on the reply path (the rules are in `bot.roleplay.memory`'s docstring)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.core.conversation import Message
from bot.core.prompt import MAX_CHARS_PER_TOKEN
from bot.engine.base import Engine, GenerationRequest, SamplingParams
from bot.roleplay.memory import (
    DEBOUNCE_SECONDS,
    IDLE_WAIT_SECONDS,
    MAX_CHUNK_MESSAGES,
    MAX_ROUNDS,
    MEMORY_CONCURRENCY,
    TOKENS_PER_WORD,
    clean_summary,
    fitting_chunk,
    oldest_within,
    summary_prompt,
    summary_stops,
)

if TYPE_CHECKING:
    from bot.storage.store import Store

log = logging.getLogger(__name__)


class MemoryKeeper:
    """Builds and refreshes conversations' summaries in the background (see the module doc)."""

    def __init__(self, store: Store, engine: Engine, words: int, seed: int = -1,
                 debounce: float = DEBOUNCE_SECONDS, idle_wait: float = IDLE_WAIT_SECONDS) -> None:
        self.store = store
        self.engine = engine
        self.words = words
        self.seed = seed
        self.debounce = debounce
        self.idle_wait = idle_wait
        self._wanted: dict[str, int] = {}  # conversation → messages to keep verbatim
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MEMORY_CONCURRENCY)
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.words > 0

    def overflowed(self, key: str, kept: int) -> None:
        """The prompt of `key` could hold only its newest `kept` messages: summarize the
        older ones, keeping the newest half of `kept` verbatim. Returns at once."""
        if not self.enabled or self._closed:
            return
        self._wanted[key] = max(1, kept // 2)
        task = self._tasks.get(key)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._run(key), name=f"memory {key}")
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._tasks.pop(key) if self._tasks.get(key) is done else None)

    async def forget(self, key: str) -> bool:
        """Drop the conversation's summary and any summary under way (/memory clear)."""
        self._wanted.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return await self.store.clear_memory(key)

    async def close(self) -> None:
        """Stop every summary under way (their generations are cancelled)."""
        self._closed = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, key: str) -> None:
        try:
            await asyncio.sleep(self.debounce)
            rounds = 0
            while key in self._wanted and rounds < MAX_ROUNDS:
                keep = self._wanted.pop(key)
                rounds += 1
                async with self._slots:
                    await self._wait_until_idle()
                    stored, more = await self.update(key, keep)
                if stored and more:
                    self._wanted.setdefault(key, keep)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("conversation %s: building its memory summary failed", key)

    async def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.idle_wait
        while self.engine.queue_depth > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def update(self, key: str, keep: int) -> tuple[bool, bool]:
        """Fold the oldest messages the memory does not cover yet (never the newest `keep`)
        into a new summary, as many as one engine request can read. Whether it was stored,
        and whether more remain to be folded in."""
        state, rows = await self.store.memory_rows(key, keep=keep, limit=MAX_CHUNK_MESSAGES)
        if not rows:
            return False, False
        max_tokens = min(self.words * TOKENS_PER_WORD, self.engine.info.n_ctx // 4)
        budget = self.engine.info.n_ctx - max_tokens

        def fits(turns: Sequence[Message]) -> bool:
            return self.engine.count_tokens(summary_prompt(state.summary, turns, self.words)) <= budget

        # Counting tokens is heavy (a backlog of long messages: seconds): never on the loop.
        chunk = await asyncio.to_thread(fitting_chunk, oldest_within(rows, budget * MAX_CHARS_PER_TOKEN), fits)
        if not chunk:
            log.warning("conversation %s: no room in the context to summarize its history", key)
            return False, False
        request = GenerationRequest(
            prompt=summary_prompt(state.summary, [m for _, m in chunk], self.words),
            max_new_tokens=max_tokens,
            stop=summary_stops([m for _, m in chunk]),
            sampling=SamplingParams(temperature=0.3, top_p=0.9, top_k=40, repeat_penalty=1.1, seed=self.seed),
        )
        summary = clean_summary(await self.engine.submit(request).text())
        if not summary:
            return False, False
        stored = await self.store.save_memory(
            key, summary, since=state.until, covered=[row_id for row_id, _ in chunk]
        )
        log.info("conversation %s: memory summary of %d messages %s", key, len(chunk),
                 "stored" if stored else "discarded (the history changed meanwhile)")
        return stored, len(chunk) < len(rows)
