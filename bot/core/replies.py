"""Pure helpers for sending replies: Discord-sized splitting that keeps code blocks valid,
the streaming edit throttle, and the short texts shown while waiting."""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
MIN_LIMIT = 10  # a part inside a code block needs "```\n", a character and "\n```"
EMPTY_REPLY = "*(the model did not write anything; try Regenerate)*"
_FENCE = re.compile(r"^[ \t]*```(\S*)", re.MULTILINE)
_CLOSE = "\n```"  # what a part that ends inside a code block gets
_SENSIBLE_LANGUAGE = re.compile(r"[A-Za-z0-9_+#.-]{1,30}")
_SENTENCE_END = re.compile(r"[.!?…][)\"'*_]*\s")
_BLANK = re.compile(r"\s*")
_CLOSING_FENCE = re.compile(r"[ \t]*(?:\n[ \t]*)?```[ \t]*")


def _fence_after(text: str, open_lang: str | None) -> str | None:
    """The info string of the code block still open after `text`, which starts at the
    beginning of a line (None: no open block). Every line starting with ``` toggles."""
    for match in _FENCE.finditer(text):
        open_lang = None if open_lang is not None else match.group(1)
    return open_lang


def _reopen_line(open_lang: str | None, limit: int) -> str:
    """The line that reopens a code block at the start of the next part: with its
    language when that is a short ordinary name, plain ``` otherwise ("" if no block)."""
    if open_lang is None:
        return ""
    if _SENSIBLE_LANGUAGE.fullmatch(open_lang) and len(open_lang) + 2 * len(_CLOSE) <= limit // 2:
        return f"```{open_lang}\n"
    return "```\n"


def _skip_blank(text: str, start: int, limit: int, in_code: bool) -> int:
    """Where the next part's text starts: after the whitespace at `start`, though in a code
    block the indentation of its first line stays. At most `limit` characters are looked
    at (a longer blank run is skipped a window at a time), so long runs cost linear time."""
    end = _BLANK.match(text, start, start + limit).end()  # type: ignore[union-attr]  # \s* always matches
    if not in_code or end - start == limit:
        return end
    newline = text.rfind("\n", start, end)
    return newline + 1 if newline >= 0 else start


def _best_cut(window: str) -> int:
    """How much of `window` the next part takes (1..len(window)): up to a paragraph break,
    else a line break, else a sentence end, else a space, else all of it (a hard cut)."""
    room = len(window)
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


def _cut_at_most(text: str, start: int, room: int) -> int:
    """The end of a piece of `text` from `start` of at most `room` (>= 1) characters:
    the end of `text` if the rest fits, else a cut from `_best_cut`. Always > start."""
    if len(text) - start <= room:
        return len(text)
    return start + _best_cut(text[start : start + room])


def _absorb_closing_fence(text: str, start: int, end: int, room: int, open_lang: str | None) -> int:
    """`end`, or just past the open block's own closing fence line when that comes next
    and fits: then the part ends with the original fence rather than an added one, and
    the next part does not start with an empty code block."""
    match = _CLOSING_FENCE.match(text, end, min(len(text), start + room + 1))  # a bounded scan
    if match is None:
        return end
    after = match.end()
    if after < len(text) and text[after] != "\n":
        return end
    piece = text[start:after]
    if len(piece.rstrip()) > room or _fence_after(piece, open_lang) is not None:
        return end
    return after


def _avoid_empty_block(text: str, start: int, end: int, room: int) -> int:
    """`end`, moved when the part would end with the fence line that opens its last block
    (an empty code block, reopened in the next part): back to before that line when text
    comes before it, else on into the block's lines, leaving room for the closing fence."""
    kept = text[start:end].rstrip()
    line_start = kept.rfind("\n") + 1
    if not _FENCE.match(kept[line_start:]):
        return end
    if kept[:line_start].strip():
        return start + line_start  # the fence line opens the next part instead
    body_start = start + len(kept) + 1  # past the fence line and its line break
    body_room = start + room - len(_CLOSE) - body_start
    if body_start >= len(text) or body_room < 1:
        return end
    return _cut_at_most(text, body_start, body_room)


def _next_part(text: str, start: int, room: int, open_lang: str | None) -> tuple[int, str | None]:
    """Where the next part's text, from `start`, ends (always after `start`), and the info
    string of the block open there. The part may hold `room` characters after its
    reopening line; every step below keeps to that, a part that ends inside a block
    leaving room for the closing fence."""

    def open_at(end: int) -> bool:
        return _fence_after(text[start:end], open_lang) is not None

    end = _cut_at_most(text, start, room)
    if open_at(end) and len(text[start:end].rstrip()) + len(_CLOSE) > room:
        end = _cut_at_most(text, start, room - len(_CLOSE))
    if open_at(end):
        end = _absorb_closing_fence(text, start, end, room, open_lang)
    if open_at(end):
        end = _avoid_empty_block(text, start, end, room)
    return end, _fence_after(text[start:end], open_lang)


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split `text` into Discord messages of 1 to `limit` characters (limit >= MIN_LIMIT).

    Cuts fall at paragraph, line, sentence or word boundaries where possible, and anywhere
    in a line with no space. A cut inside a code block closes the fence at the end of the
    part and reopens it, with its language, at the start of the next; every part has
    balanced fences. Only whitespace at the cuts is dropped, and no part is blank.
    Every round moves `start` forward, so this always ends, in time linear in the text.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT}, not {limit}")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    parts: list[str] = []
    open_lang: str | None = None
    start = 0
    while start < len(text):
        start = _skip_blank(text, start, limit, in_code=open_lang is not None)
        if start == len(text):
            break
        reopen = _reopen_line(open_lang, limit)
        end, still_open = _next_part(text, start, limit - len(reopen), open_lang)
        piece = text[start:end]
        if piece.strip():
            parts.append((reopen + piece).rstrip() + (_CLOSE if still_open is not None else ""))
        start, open_lang = end, still_open
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
