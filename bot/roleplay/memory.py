"""Long memory: a rolling summary of the turns that no longer fit the prompt. This module
holds its pure parts (the state, the prompts, the chunking); the background
`bot.lifecycle.memory_keeper.MemoryKeeper` uses them with the engine and the store.

When a conversation's prompt has to drop its oldest turns (`bot.core.prompt.build_prompt` keeps
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

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bot.core.conversation import Message
from bot.core.prompt import HEADERS, alpaca_prompt, clean_name, neutralize, transcript


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
    fell out, as a record (`bot.core.prompt.transcript`: names cleaned, no line can forge a
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


def context_after_memory(context: Sequence[Message], stored: Sequence[Message], memory: MemoryState) -> list[Message]:
    """Messages read from the platform around a question (not stored), without those older
    than the first stored message the summary leaves out: the summary covers that time."""
    if memory.until is None or not stored or not (stored[0].platform_id or "").isdigit():
        return list(context)
    first = int(stored[0].platform_id or 0)
    return [m for m in context if (m.platform_id or "").isdigit() and int(m.platform_id or 0) > first]
