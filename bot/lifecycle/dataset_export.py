"""Opted-in conversations → Alpaca records that `hermes-train` reads (`hermes-bot export-dataset`).

Each reply of the bot that ended `done` with text, in a conversation opted in with
`/channel training-export on`, becomes one record. Its prompt is the history before it as
the bot renders it (`bot.core.prompt.build_prompt`, the persona's preamble, lorebook, response
prefix and post-history instructions, the same history window as `bot.lifecycle.responder`; in a
scene, the character that spoke sees the others as speakers; attached files follow their
messages). Three things the bot adds are left out: the rolling memory summary and the
author's note (settings that change over time: what they were when the reply was written is
not kept, and the history window stands in for the summary) and the people's `/me`
descriptions (their own words about themselves, not the chat). Its
output is the reply's stored text, which is the swipe people kept (discarded alternatives
live in another table and are never read). Stopped, interrupted and failed replies are
context only, never outputs: their text is not an answer the bot finished.

The bot's prompt `P` is split so that the trainer rebuilds it exactly::

    preamble + alpaca_prompt(instruction, input) + output == P + reply

`preamble` is the text before the first `### Instruction:` (the persona's preamble, and a
greeting the bot opened with), `input` the post-history instructions (the bot renders them
as the `### Input:` block) and `output` starts with the response prefix (``Name: ``).
`training.data` prepends a record's optional `preamble`.

Privacy: the people of a conversation are "User 1", "User 2", … in order of first
appearance (per conversation, so nobody can be followed from one channel to another); their
display names (whole words, any case) and ids in every text, `<@id>` mentions included,
become the pseudonym; role and channel mentions become `@role` / `#channel`. Deleted
messages, messages forgotten for good (those rows no longer exist) and everything before a
/reset never appear; notices shown under replies are never read.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot.core.conversation import DONE, Message
from bot.roleplay.personas import DEFAULT_PERSONA, Persona
from bot.core.prompt import INPUT, INSTRUCTION, MAX_CHARS_PER_TOKEN, RESPONSE, alpaca_prompt, neutralize
from bot.lifecycle.prompt_assembly import assemble_prompt
from bot.lifecycle.responder import newest_within, others_as_speakers
from bot.roleplay.scenes import as_seen_by
from bot.storage.store import Store

log = logging.getLogger(__name__)
TokenCounter = Callable[[str], int]
BATCH = 500  # rows read from the store at a time
_MENTION = re.compile(r"<@!?(\d+)>")
_OTHER_MENTIONS = ((re.compile(r"<@&\d+>"), "@role"), (re.compile(r"<#\d+>"), "#channel"))


@dataclass(frozen=True)
class PromptLimits:
    """The bot's prompt settings: context, reply room and history window."""

    n_ctx: int
    max_new_tokens: int
    history_limit: int


@dataclass
class ExportStats:
    conversations: int = 0
    records: int = 0
    not_done: int = 0  # stopped, interrupted or failed replies: context only
    unsplittable: int = 0  # a prompt with no instruction block (only the bot spoke before)


class Pseudonyms:
    """A conversation's people as "User 1", "User 2", … (order of first appearance)."""

    def __init__(self, people: Iterable[tuple[str, str]], bots: Mapping[str, str] | None = None) -> None:
        self._by_id: dict[str, str] = {}
        names: dict[str, str] = {}
        for author_id, name in people:
            pseudonym = self.of(author_id)
            for form in {name, " ".join(name.split())}:
                if len(form.strip()) >= 2:
                    names.setdefault(form.strip().casefold(), pseudonym)
        self._bots = dict(bots or {})
        self._names = names
        words = sorted(names, key=len, reverse=True)
        self._name_pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
            if words else None
        )
        # Platform ids (Discord snowflakes) written out in a text, whole numbers only.
        ids = sorted((i for i in self._by_id if i.isdigit()), key=len, reverse=True)
        self._id_pattern = re.compile(r"(?<!\d)(?:" + "|".join(ids) + r")(?!\d)") if ids else None

    def of(self, author_id: str) -> str:
        """The pseudonym of a person (a new one for an id not seen before)."""
        if author_id not in self._by_id:
            self._by_id[author_id] = f"User {len(self._by_id) + 1}"
        return self._by_id[author_id]

    def text(self, content: str) -> str:
        """`content` with every mention, id and display name of a person replaced."""

        def mention(match: re.Match[str]) -> str:
            found = match.group(1)
            return "@" + (self._bots.get(found) or self.of(found))

        content = _MENTION.sub(mention, content)
        for pattern, label in _OTHER_MENTIONS:
            content = pattern.sub(label, content)
        if self._id_pattern is not None:
            content = self._id_pattern.sub(lambda m: self._by_id[m.group(0)], content)
        if self._name_pattern is not None:
            content = self._name_pattern.sub(lambda m: self._names[m.group(0).casefold()], content)
        return content

    def message(self, message: Message) -> Message:
        """The message as it may appear in the dataset (no id, no person's name)."""
        name = message.author_name if message.is_bot else self.of(message.author_id)
        return replace(message, author_id="", author_name=name, content=self.text(message.content), platform_id=None,
                       attachments=self.text(message.attachments))


def bot_prompt(
    history: Sequence[Message], persona: Persona, speaker: str, count_tokens: TokenCounter, limits: PromptLimits,
    in_scene: bool = False,
) -> str:
    """The prompt the bot sends to answer `speaker` after `history` (the same
    `assemble_prompt` as `bot.lifecycle.responder`; a scene character sees the others as speakers).
    The /me descriptions, the rolling memory and the author's note are left out: what
    they were when the reply was written is not stored."""
    history = as_seen_by(history, persona.name) if in_scene else list(history)
    history = newest_within(history, (limits.n_ctx - limits.max_new_tokens) * MAX_CHARS_PER_TOKEN)
    return assemble_prompt(history, persona, speaker, count_tokens, n_ctx=limits.n_ctx,
                           max_new_tokens=limits.max_new_tokens).text


def split_prompt(prompt: str, final_input: str) -> dict[str, str] | None:
    """`prompt` as {preamble, instruction, input, output-prefix} with
    ``preamble + alpaca_prompt(instruction, input) + prefix == prompt``; None when the
    prompt has no instruction block."""
    head, sep, prefix = prompt.rpartition(f"\n\n{RESPONSE}\n")
    if not sep:
        return None
    body = head + "\n\n"
    input_text = neutralize(final_input.strip()) if final_input.strip() else ""
    if input_text:
        block = f"\n\n{INPUT}\n{input_text}\n\n"
        if not body.endswith(block):
            return None
        body = body[: -len(block)] + "\n\n"
    start = 0 if body.startswith(INSTRUCTION + "\n") else body.find(f"\n\n{INSTRUCTION}\n") + 2
    if start < 0 or start == 1:
        return None
    preamble, instruction = body[:start], body[start + len(INSTRUCTION) + 1: -2]
    if preamble + alpaca_prompt(instruction, input_text or None) + prefix != prompt:
        return None
    return {"preamble": preamble, "instruction": instruction, "input": input_text, "prefix": prefix}


def make_record(
    history: Sequence[Message], reply: str, persona: Persona, count_tokens: TokenCounter, limits: PromptLimits,
    in_scene: bool = False,
) -> dict[str, str] | None:
    """The Alpaca record of one reply after `history` (already pseudonymized); None when
    its prompt cannot be written as one (see `split_prompt`)."""
    speaker = next((m.author_name for m in reversed(history) if not m.is_bot), "")
    if not speaker:
        return None
    prompt = bot_prompt(history, persona, speaker, count_tokens, limits, in_scene)
    parts = split_prompt(prompt, persona.post_history(speaker))
    if parts is None:
        return None
    record = {"instruction": parts["instruction"], "input": parts["input"], "output": parts["prefix"] + reply.strip()}
    if parts["preamble"]:
        record["preamble"] = parts["preamble"]
    return record


def _persona(personas: Mapping[str, Persona], character: str | None, chosen: str | None, author_name: str) -> Persona:
    """The persona that wrote a reply: the scene character it records; else the
    conversation's persona if the reply bears its name (it may have changed since); else
    the persona of that name; else the default assistant."""
    if character is not None and character in personas:
        return personas[character]
    current = personas.get(chosen) if chosen is not None else None
    if current is not None and current.name == author_name:
        return current
    return next((p for p in personas.values() if p.name == author_name), personas[DEFAULT_PERSONA])


async def export_conversation(
    store: Store, conversation: tuple[int, str, str | None, int | None], personas: Mapping[str, Persona],
    count_tokens: TokenCounter, limits: PromptLimits, write: Callable[[dict[str, str]], None], stats: ExportStats,
) -> None:
    """Write the records of one conversation, reading it `BATCH` rows at a time and keeping
    only the history window in memory."""
    conversation_id, _key, persona_key, forget_before_id = conversation
    pseudonyms = Pseudonyms(await store.conversation_people(conversation_id))
    window: deque[Message] = deque(maxlen=limits.history_limit)
    after = forget_before_id or 0
    own = await store.reply_author_ids(conversation_id)  # the bot's: other bots are speakers
    while batch := await store.export_turns(conversation_id, after, BATCH):
        for row_id, message, status, speaker_persona in batch:
            after = row_id
            if message.is_bot and status is not None and status != DONE:
                stats.not_done += 1
            if message.is_bot and status == DONE:
                persona = _persona(personas, speaker_persona, persona_key, message.author_name)
                record = make_record(window, pseudonyms.text(message.content), persona, count_tokens, limits,
                                     in_scene=speaker_persona is not None)
                if record is None:
                    stats.unsplittable += 1
                else:
                    write(record)
                    stats.records += 1
            window.append(pseudonyms.message(others_as_speakers([message], own)[0]))
    stats.conversations += 1


async def export_dataset(
    store: Store, personas: Mapping[str, Persona], out: Path, count_tokens: TokenCounter, limits: PromptLimits,
    progress: Callable[[int], Any] | None = None,
) -> ExportStats:
    """Write every opted-in conversation's records to `out` (JSON Lines), one conversation
    at a time; the file appears whole (written beside it, then renamed)."""
    stats = ExportStats()
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", encoding="utf-8") as file:

        def write(record: dict[str, str]) -> None:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(1)

        for conversation in await store.training_export_conversations():
            await export_conversation(store, conversation, personas, count_tokens, limits, write, stats)
    partial.replace(out)
    log.info("%d records from %d conversations (%d replies not done: context only; %d without an instruction)",
             stats.records, stats.conversations, stats.not_done, stats.unsplittable)
    return stats
