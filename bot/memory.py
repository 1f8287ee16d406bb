"""Long memory: a rolling summary of the turns that no longer fit the prompt.

When a conversation's prompt has to drop its oldest turns (`bot.prompt.build_prompt` keeps
fewer messages than the history holds), the responder tells the `MemoryKeeper`. In the
background, never on the reply path, the keeper asks the same engine to summarize the
turns that fell out (the previous summary plus those turns, `summary_prompt`) and stores
the result with the id of the last message it covers (conversations.memory,
memory_until). From then on the prompt renders the summary in the preamble, after the
persona (`with_memory`), and only the messages after `memory_until`; so the summary and
the turns after it form a prefix that stays the same from turn to turn until the next
summary (prefix reuse), where a sliding window would change the prompt's start every turn.

How much is summarized: everything not yet covered except the newest half of what the
last prompt could hold, so the next summary is due only after that half fills up again.
One summary request at a time per conversation (debounced: several overflowing replies
in a row ask once), `MEMORY_CONCURRENCY` in all. The engine has no priorities: a summary
waits until no request is queued (at most `IDLE_WAIT_SECONDS`), then joins the FIFO queue
like any request, without a conversation hint (it does not take a chat's KV slot over).
A summary lands only if nothing it covers was deleted or forgotten meanwhile and the
memory was not cleared (`Store.save_memory`); /reset, /forget and deletions clear it and
it is rebuilt without them.

A backlog longer than one summary request can read (a long conversation enabling memory
for the first time) is summarized oldest first in several requests (each folds the previous
summary in), at most `MAX_ROUNDS` in a row; of a backlog longer than `MAX_CHUNK_MESSAGES`
only the newest that many messages are read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bot.conversation import Message
from bot.engine.base import Engine, GenerationRequest, SamplingParams
from bot.prompt import HEADERS, MAX_CHARS_PER_TOKEN, alpaca_prompt, clean_name, neutralize, transcript

if TYPE_CHECKING:
    from bot.store import Store

log = logging.getLogger(__name__)

SUMMARY_HEADING = "Summary of the story so far:"
DEBOUNCE_SECONDS = 2.0
IDLE_WAIT_SECONDS = 60.0
MEMORY_CONCURRENCY = 1
MAX_CHUNK_MESSAGES = 400  # backlog read at once (then cut to what one request can hold)
MAX_ROUNDS = 8  # summary requests in a row for one backlog
TOKENS_PER_WORD = 2  # generation budget: a summary of N words gets 2N tokens
MAX_SUMMARY_CHARS = 8000


@dataclass(frozen=True)
class MemoryState:
    """A conversation's summary and the last message row it covers (None: no summary)."""

    summary: str = ""
    until: int | None = None


def with_memory(preamble: str, summary: str) -> str:
    """The preamble with the summary after it (the persona first: it never changes)."""
    if not summary.strip():
        return preamble
    block = f"{SUMMARY_HEADING}\n{summary.strip()}"
    return f"{preamble.strip()}\n\n{block}" if preamble.strip() else block


def summary_instruction(words: int) -> str:
    return (
        f"Summarize the conversation in the input in at most {words} words. Keep who is who, "
        "what happened, what was decided or promised, and what people said about themselves. "
        "Write only the summary."
    )


def summary_prompt(previous: str, turns: Sequence[Message], words: int) -> str:
    """The Alpaca prompt that asks for the new summary: the previous one and the turns that
    fell out, as a record (`bot.prompt.transcript`: names cleaned, no line can forge a
    header or a speaker)."""
    record = transcript(turns)
    if previous.strip():
        record = f"Summary so far:\n{neutralize(previous.strip())}\n\nWhat was said next:\n{record}"
    return alpaca_prompt(summary_instruction(words), record)


def summary_stops(turns: Sequence[Message]) -> tuple[str, ...]:
    """Where a summary ends: a template header, or a speaker line of someone in the turns (a
    model that starts writing the transcript on instead of summarizing it is cut there)."""
    names = dict.fromkeys(clean_name(m.author_name) for m in turns)
    return HEADERS + tuple(f"\n{name}:" for name in names)


def clean_summary(text: str) -> str:
    """The model's summary as stored: trimmed, a leading label dropped, bounded."""
    text = text.strip()
    for label in (SUMMARY_HEADING, "Summary:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    return text[:MAX_SUMMARY_CHARS].strip()


def oldest_within(rows: Sequence[tuple[int, Message]], max_chars: int) -> list[tuple[int, Message]]:
    """The oldest rows whose texts add up to at most `max_chars` (at least one): no more
    can fit one request, so no more are counted."""
    total = 0
    for index, (_, message) in enumerate(rows):
        total += len(message.content) + len(message.author_name) + 4
        if total > max_chars:
            return list(rows[: max(index, 1)])
    return list(rows)


def fitting_chunk(
    rows: Sequence[tuple[int, Message]], fits: Callable[[Sequence[Message]], bool]
) -> list[tuple[int, Message]]:
    """The longest oldest prefix of `rows` for which `fits` holds (binary search: fewer
    messages, fewer tokens); if not even the oldest fits, it alone with its text cut until
    it does (empty if even an empty one does not)."""
    low, high = 0, len(rows)
    while low < high:
        mid = (low + high + 1) // 2
        if fits([m for _, m in rows[:mid]]):
            low = mid
        else:
            high = mid - 1
    if low > 0:
        return list(rows[:low])
    if not rows:
        return []
    row_id, message = rows[0]
    content = message.content
    while content:
        content = content[: len(content) // 2]
        if fits([replace(message, content=content + " […]")]):
            return [(row_id, replace(message, content=content + " […]"))]
    return []


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


def context_after_memory(context: Sequence[Message], stored: Sequence[Message], memory: MemoryState) -> list[Message]:
    """Messages read from the platform around a question (not stored), without those older
    than the first stored message the summary leaves out: the summary covers that time."""
    if memory.until is None or not stored or not (stored[0].platform_id or "").isdigit():
        return list(context)
    first = int(stored[0].platform_id or 0)
    return [m for m in context if (m.platform_id or "").isdigit() and int(m.platform_id or 0) > first]
