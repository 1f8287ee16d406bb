"""The chat pipeline shared by every edge: history → persona → prompt → engine → history.

The Discord cogs and the terminal chat both answer through a `Responder`, so a message is
treated the same way wherever it comes from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from bot.core.conversation import Message, StoredReply
from bot.core.prompt import MAX_CHARS_PER_TOKEN, BuiltPrompt, PromptTooLong, clean_name, preamble_length
from bot.core.settings import Settings
from bot.engine.base import Engine, Generation, GenerationRequest, SamplingParams
from bot.lifecycle.memory_keeper import MemoryKeeper
from bot.lifecycle.prompt_assembly import assemble_prompt
from bot.roleplay.author_note import note_insertions
from bot.roleplay.memory import context_after_memory
from bot.roleplay.personas import DEFAULT_PERSONA, Persona, short_key, visible_in
from bot.roleplay.scenes import as_seen_by
from bot.roleplay.swipes import history_to_continue
from bot.storage.store import Store

log = logging.getLogger(__name__)


def with_context(history: list[Message], context: Sequence[Message]) -> list[Message]:
    """The stored history plus the context messages it lacks, in platform order."""
    stored = {m.platform_id for m in history}
    extra = [m for m in context if m.platform_id not in stored]
    if not extra:
        return history
    # Discord ids grow with time; a row without one (a reply just begun) stays last.
    return sorted(history + extra, key=lambda m: int(m.platform_id) if (m.platform_id or "").isdigit() else 2**63)


def others_as_speakers(history: Sequence[Message], own_ids: Collection[str]) -> list[Message]:
    """Only the bot's own words (authored by one of `own_ids`) are its responses; other
    bots' and webhooks' messages are speaker lines like people's, whatever name they
    take (a webhook called like the persona, or like a scene character, forges nothing)."""
    return [replace(m, is_bot=False) if m.is_bot and m.author_id not in own_ids else m for m in history]


def newest_within(history: list[Message], max_chars: int) -> list[Message]:
    """The newest messages whose contents add up to at most `max_chars` (at least one)."""
    total = 0
    for index in range(len(history) - 1, -1, -1):
        total += len(history[index].content) + len(history[index].author_name) + 4
        if total > max_chars:
            return history[index + 1:] or history[-1:]
    return history


@dataclass
class Reply:
    """A generation under way and the prompt it answers."""

    generation: Generation
    prompt: BuiltPrompt
    persona: Persona


class Responder:
    """History → persona → prompt → engine, for every edge (Discord, the terminal)."""

    def __init__(
        self, settings: Settings, store: Store, engine: Engine, personas: dict[str, Persona]
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.personas = personas
        self.memory = MemoryKeeper(store, engine, settings.memory_summary_words, seed=settings.seed)

    def visible_personas(self, scope: str | None) -> dict[str, Persona]:
        """The shipped personas and the ones imported in `scope` (None: shipped only)."""
        return {k: p for k, p in self.personas.items() if visible_in(k, scope)}

    def find_persona(self, name: str, scope: str | None = None) -> str | None:
        """The key of the persona seen in `scope` with this key or display name (any case)."""
        wanted = name.strip().lower()
        return next((k for k, p in self.visible_personas(scope).items()
                     if wanted in (k, short_key(k), p.name.lower())), None)

    def persona(self, key: str | None) -> Persona:
        """The persona a conversation chose (its key), else the default assistant."""
        if key is not None and key in self.personas:
            return self.personas[key]
        return self.personas[(self.find_persona(key) if key is not None else None) or DEFAULT_PERSONA]

    async def conversation_persona(self, key: str) -> Persona:
        return self.persona((await self.store.state(key)).persona)

    async def start_reply(self, key: str, speaker: str, context: Sequence[Message] = (),
                          continue_reply: StoredReply | None = None, persona: Persona | None = None,
                          others: Sequence[str] = (), own_id: str | None = None) -> Reply:
        """Build the prompt from the stored history and queue its generation.

        `speaker` is the display name of the person being answered (for `{{user}}` in the
        post-history instructions; in the preamble only while they are alone in the
        history, see `bot.roleplay.personas.preamble_user`);
        `context`: messages read from the platform around the question but not stored
        (merged into the history by their platform ids);
        `continue_reply` (Continue): the model writes on after that reply's text, in a prompt
        of the history up to it (`bot.roleplay.swipes.history_to_continue`);
        `persona`: the scene character that answers (else the conversation's persona); the
        other characters' lines are then speaker lines (`bot.roleplay.scenes.as_seen_by`), and `others`
        (the names of the scene's other characters) end the reply like a person's name;
        `own_id`: the bot's author id (its Discord user): other bots' messages are then
        speaker lines (`others_as_speakers`).
        """
        in_scene = persona is not None
        persona = persona or await self.conversation_persona(key)
        # Long memory and the author's note (bot.roleplay.memory, bot.roleplay.author_note): the turns the
        # summary covers are not rendered again.
        memory, note, user_turns = await self.store.prompt_extras(key)
        stored = await self.store.recent_messages(key, self.settings.history_limit, after_id=memory.until)
        history = with_context(stored, context_after_memory(context, stored, memory))
        if own_id is not None:
            history = others_as_speakers(history, {own_id})
        available = len(history)
        if continue_reply is not None:
            cut = history_to_continue(history, continue_reply.part_ids[0]) if continue_reply.part_ids else None
            if cut is None:
                raise PromptTooLong("the reply to continue is no longer in the history")
            history = cut
        if in_scene:
            history = as_seen_by(history, persona.name)
        n_ctx = self.engine.info.n_ctx
        history = newest_within(history, (n_ctx - self.settings.max_new_tokens) * MAX_CHARS_PER_TOKEN)
        described = await self.store.user_personas_in(key, [m.author_id for m in history if not m.is_bot])
        # Counting tokens (the lorebook's budget, attached files, what fits) is the heavy
        # part, and with a fleet it may ask a server: never on the event loop.
        prompt = await asyncio.to_thread(
            assemble_prompt, history, persona, speaker, self.engine.count_tokens, n_ctx=n_ctx,
            max_new_tokens=self.settings.max_new_tokens, described=described, summary=memory.summary,
            notes=note_insertions(note, persona, speaker, user_turns), continue_last=continue_reply is not None,
        )
        if continue_reply is None and (len(prompt.messages) < available or len(stored) >= self.settings.history_limit):
            self.memory.overflowed(key, len(prompt.messages))
        if prompt.truncated:
            log.info("conversation %s: the prompt was cut to fit the context", key)
        request = GenerationRequest(
            prompt=prompt.text,
            max_new_tokens=self.settings.max_new_tokens,
            stop=tuple(dict.fromkeys([*prompt.stop, *(f"\n{clean_name(n)}:" for n in others)])),
            sampling=SamplingParams(
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                top_k=self.settings.top_k,
                repeat_penalty=self.settings.repeat_penalty,
                seed=self.settings.seed,
            ),
            conversation=key,
            shared_prefix_chars=preamble_length(prompt.text),
        )
        return Reply(self.engine.submit(request), prompt, persona)

    async def save_reply(
        self, key: str, persona: Persona, text: str, bot_id: str, platform_id: str | None = None
    ) -> None:
        """Store words of the bot that are not a streamed reply (the terminal's replies, a
        persona's greeting), once and unsplit; `platform_id` is the first message showing them."""
        message = Message(author_id=bot_id, author_name=persona.name, content=text, is_bot=True, platform_id=platform_id)
        await self.store.add_message(key, message)
