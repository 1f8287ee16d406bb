"""Pure helpers for sending replies: Discord-sized splitting that keeps code blocks valid,
the streaming edit throttle, and the short texts shown while waiting."""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
EMPTY_REPLY = "*(the model did not write anything; try Regenerate)*"
_FENCE = re.compile(r"^[ \t]*```(\S*)")
_SENTENCE_END = re.compile(r"[.!?…][)\"'*_]*\s")


def _fence_after(text: str, open_lang: str | None) -> str | None:
    """The language of the code block still open after `text` (None: no open block)."""
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match:
            open_lang = None if open_lang is not None else match.group(1)
    return open_lang


def _best_cut(text: str, room: int) -> int:
    """Where to cut `text` so the first piece has at most `room` characters: at a
    paragraph break, else a line break, else a sentence end, else a space, else anywhere."""
    window = text[:room]
    for separator in ("\n\n", "\n"):
        index = window.rfind(separator)
        if index > room // 4:
            return index + len(separator)
    sentences = [m.end() for m in _SENTENCE_END.finditer(window)]
    if sentences and sentences[-1] > room // 4:
        return sentences[-1]
    index = window.rfind(" ")
    if index > room // 4:
        return index + 1
    return room


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split `text` into Discord messages of at most `limit` characters.

    Cuts fall at paragraph, line or sentence boundaries where possible. A cut inside a
    code block closes the fence and reopens it, with its language, in the next message.
    No part is empty or only whitespace.
    """
    parts: list[str] = []
    open_lang: str | None = None
    rest = text.strip()
    while rest:
        reopen = f"```{open_lang}\n" if open_lang is not None else ""
        if len(reopen) + len(rest) <= limit and _fence_after(rest, open_lang) is None:
            parts.append(reopen + rest)
            break
        room = limit - len(reopen)
        cut = _best_cut(rest, room) if len(rest) > room else len(rest)
        still_open = _fence_after(rest[:cut], open_lang)
        if still_open is not None:  # leave room to close the fence
            room -= len("\n```")
            cut = _best_cut(rest, room) if len(rest) > room else len(rest)
            still_open = _fence_after(rest[:cut], open_lang)
        chunk, rest = rest[:cut], rest[cut:]
        body = (reopen + chunk).rstrip()
        if still_open is not None:
            body += "\n```"
        if body.strip() and body.strip() != "```":
            parts.append(body)
        open_lang = still_open
        rest = rest.lstrip("\n") if still_open is None else rest
    return parts


class EditThrottle:
    """At most one edit per `interval` seconds (per channel): Discord allows 5 edits per
    5 seconds per channel, and we stay under it instead of leaning on 429s."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")

    def ready(self, now: float) -> bool:
        return now - self._last >= self.interval

    def mark(self, now: float) -> None:
        self._last = now

    def wait_time(self, now: float) -> float:
        return max(0.0, self._last + self.interval - now)


def queue_notice(position: int) -> str:
    ahead = "1 request" if position == 1 else f"{position} requests"
    return f"*(queued: {ahead} ahead of you)*"
