"""Text attachments as context: which files of a message are read, how their bytes become
text, how they are stored with the message, and how much of them a prompt takes.

A file is read when its name has a text extension (`TEXT_SUFFIXES`) or its content type is
`text/*` or a textual `application/*` type, when it is at most `MAX_FILE_BYTES`, and among
the first `MAX_FILES` of the message; nothing else is downloaded. Its bytes are decoded as
UTF-8 (with or without a BOM), else with the encoding `charset-normalizer` detects; bytes
that are no text in any encoding (NUL bytes, or nothing detected) are refused. Each file
read is stored as a block ``[file notes.md]`` + its text (cut to `MAX_TEXT_CHARS`); every
other attachment as a one-line note that says why it was not read
(``[attachment photo.png: not read — the model reads text only]``).

In the prompt a message's attachment blocks follow its text, so when the newest message
must be cut to fit, its files are cut, never the question (`bot.core.prompt.build_prompt` cuts
a message's end). `with_attachments` gives all attachments of a prompt at most a share of
the token budget, the newest message's first.

Everything here is pure (decoding is CPU work: callers run `decode` in a worker thread).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from charset_normalizer import from_bytes

from bot.core.conversation import Message
from bot.core.prompt import clean_name

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 4  # files read per message
MAX_TEXT_CHARS = 100_000  # stored per file
CUT_MARK = "\n[…cut]"
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".py", ".json", ".log", ".csv", ".yaml", ".yml", ".toml", ".js", ".ts", ".c", ".cpp",
    ".h", ".rs", ".go", ".java", ".sh", ".ini", ".cfg", ".xml", ".html", ".css", ".sql",
})
TEXT_APPLICATION_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/x-sh", "application/sql",
    "application/toml", "application/yaml", "application/x-yaml",
})
TEXT_ONLY = "not read — the model reads text only"
LEFT_OUT = "[attached files left out: no room in the context]"
READ_TIMEOUT_SECONDS = 20.0
FIT_STEPS = 6  # token counts to find where a too long text is cut
READS_AT_ONCE = 4  # files downloaded and decoded at once by the whole bot (memory: 4 × 256 KiB)


@dataclass(frozen=True)
class Attachment:
    """What Discord says about an attached file, as plain data."""

    filename: str
    size: int
    content_type: str | None = None


def is_text(attachment: Attachment) -> bool:
    """A text file by its extension or its content type."""
    kind = (attachment.content_type or "").split(";")[0].strip().lower()
    suffix = PurePosixPath(attachment.filename.lower()).suffix
    return suffix in TEXT_SUFFIXES or kind.startswith("text/") or kind in TEXT_APPLICATION_TYPES


def refusal(attachment: Attachment, accepted: int) -> str | None:
    """Why this attachment is not read, `accepted` files of its message being read already;
    None to read it."""
    if not is_text(attachment):
        return TEXT_ONLY
    if attachment.size > MAX_FILE_BYTES:
        return f"not read — {attachment.size / 1024:,.0f} KiB, over the {MAX_FILE_BYTES // 1024} KiB limit for a file"
    if accepted >= MAX_FILES:
        return f"not read — at most {MAX_FILES} files are read per message"
    return None


def plan(attachments: Sequence[Attachment]) -> list[str | None]:
    """For each attachment of a message, why it is not read (None: it is read)."""
    reasons: list[str | None] = []
    for attachment in attachments:
        reasons.append(refusal(attachment, reasons.count(None)))
    return reasons


def display_name(filename: str) -> str:
    """A file name on one safe line (the prompt's rules for names)."""
    return clean_name(filename)


def note(attachment: Attachment, reason: str | None) -> str:
    return f"[attachment {display_name(attachment.filename)}: {reason or 'not read'}]"


def file_block(attachment: Attachment, text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + CUT_MARK
    return f"[file {display_name(attachment.filename)}]\n{text.strip(chr(10))}"


def decode(data: bytes) -> str | None:
    """The text of a file's bytes: UTF-8 (a BOM dropped), UTF-16/32 by their BOM, else the
    encoding charset-normalizer finds; None when the bytes are not text."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best = from_bytes(data).best()
    return str(best) if best is not None else None


def summarize(blocks: Sequence[str]) -> str:
    """The stored attachments of one message."""
    return "\n\n".join(blocks)


def unread(attachments: Sequence[Attachment]) -> list[str]:
    """The names of attachments that were not read (for the notice under a question)."""
    return [display_name(a.filename) for a, reason in zip(attachments, plan(attachments)) if reason]


def notes_only(attachments: Sequence[Attachment]) -> str:
    """What is stored before (or without) reading: a note for each attachment."""
    return summarize([note(a, reason) for a, reason in zip(attachments, plan(attachments))])


def fit(text: str, count_tokens: Callable[[str], int], max_tokens: int, chars_per_token: int = 8) -> str:
    """`text` whole if it takes at most `max_tokens`, else a prefix that does, marked as cut
    ("" if not even a little fits). No more than `chars_per_token` characters per token are
    ever counted, and the cut is found in a few counts (each step scales the length by the
    tokens it took), so a huge text costs no more than a few counts of a fitting one."""
    if max_tokens <= 0:
        return ""
    head = text[: max_tokens * chars_per_token]
    used = count_tokens(head if head == text else head + CUT_MARK)
    if used <= max_tokens:
        return text if head == text else head + CUT_MARK
    best = 0
    length = int(len(head) * max_tokens / used)
    for _ in range(FIT_STEPS):
        length = max(0, min(length, len(head)))
        used = count_tokens(head[:length] + CUT_MARK)
        if used <= max_tokens:
            best = max(best, length)
            if length == len(head) or used >= max_tokens * 0.97:
                break
            length = int(length * max_tokens / max(used, 1))
        else:
            length = int(length * max_tokens / used * 0.97)
    return head[:best] + CUT_MARK if best else ""


def with_attachments(history: Sequence[Message], count_tokens: Callable[[str], int], max_tokens: int) -> list[Message]:
    """The history with each message's attachments after its text, all of them together
    within `max_tokens` (the newest message's first; older ones get what is left, or a line
    saying they were left out). Messages without attachments are returned as they are."""
    left = max_tokens
    merged = list(history)
    for index in range(len(merged) - 1, -1, -1):
        message = merged[index]
        if not message.attachments:
            continue
        text = fit(message.attachments, count_tokens, left)
        if text:
            left -= count_tokens(text)
        else:
            text = LEFT_OUT
        content = f"{message.content}\n{text}" if message.content.strip() else text
        merged[index] = replace(message, content=content, attachments="")
    return merged


async def read_all(attachments: Sequence[Attachment], fetch: Callable[[int], Awaitable[bytes]],
                   timeout: float = READ_TIMEOUT_SECONDS, gate: asyncio.Semaphore | None = None) -> str:
    """The stored attachments of a message: each readable file fetched (`fetch(index)`,
    within `timeout`), checked against the size cap again and decoded in a worker thread,
    while holding `gate` (so the bytes in memory at once are bounded however many messages
    arrive together); a note for every other one."""
    blocks: list[str] = []
    for index, (attachment, reason) in enumerate(zip(attachments, plan(attachments))):
        text: str | None = None
        if reason is None:
            async with gate or contextlib.nullcontext():
                text, reason = await _read_one(attachment, index, fetch, timeout)
        blocks.append(note(attachment, reason) if text is None else file_block(attachment, text))
    return summarize(blocks)


async def _read_one(attachment: Attachment, index: int, fetch: Callable[[int], Awaitable[bytes]],
                    timeout: float) -> tuple[str | None, str | None]:
    """(the file's text, None), or (None, why it was not read)."""
    try:
        data = await asyncio.wait_for(fetch(index), timeout)
    except Exception as error:  # a failed download: a note, never a lost message
        log.info("could not read attachment %s: %s", attachment.filename, error)
        return None, "not read — the download failed"
    if len(data) > MAX_FILE_BYTES:
        return None, f"not read — over the {MAX_FILE_BYTES // 1024} KiB limit for a file"
    text = await asyncio.to_thread(decode, data)
    return (text, None) if text is not None else (None, "not read — it is not text")
