"""Answering one question in Discord: prompt → engine → a `ReplyStream` that shows and
stores the text as it comes, at most one edit per second per channel.

`Answerer` also keeps the replies under way (for Stop, and for a shutdown that gives each
of them its final state) and waits out the queue with the person's place in it shown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import discord

from bot.core.conversation import INTERRUPTED, Message, StoredReply
from bot.core.prompt import PromptTooLong
from bot.core.replies import EditThrottle, queue_notice
from bot.edge.convert import to_message
from bot.edge.reply_stream import INTERRUPTED_NOTICE, Destination, Poster, ReplyStream
from bot.edge.webhooks import WebhookDirectory
from bot.engine.base import EngineError, Generation
from bot.lifecycle.responder import Responder
from bot.roleplay.scenes import Member, choose_speakers
from bot.storage.store import ConversationGone
from bot.telemetry import metrics

log = logging.getLogger(__name__)
QUEUE_REFRESH_SECONDS = 2.0  # how often a queued reply's place in the queue is refreshed
QUEUE_FIRST_LOOK_SECONDS = 0.5  # how soon a reply that got no text yet looks at its place
TYPING_SECONDS = 8.0  # Discord shows "typing" for 10 s after each trigger
CONTEXT_MESSAGES = 20  # messages read around a question in a channel that is not enabled


@dataclass(frozen=True)
class Question:
    """A message to answer, as plain data."""

    key: str
    channel_id: int
    message_id: int | None
    author_id: int
    author_name: str
    read_context: bool = False  # read the chat before the question from Discord (not stored)
    text: str = ""  # what it says (a scene: who is named)
    replied_to: int | None = None  # the message it replies to (a scene: a character's)


@dataclass
class _UnderWay:
    stream: ReplyStream
    generation: Generation | None = None


class Answerer:
    """Answers questions in Discord: casts who answers, streams each reply through a
    `ReplyStream`, keeps the replies under way (Stop, shutdown)."""

    def __init__(self, responder: Responder, bot_user_id: int, retry_seconds: float, edit_interval: float = 1.0,
                 webhooks: WebhookDirectory | None = None) -> None:
        self.responder = responder
        self.webhooks = webhooks  # scene characters post through them
        self.rng = random.Random()  # a scene's `random` strategy
        self.store = responder.store
        self.bot_user_id = bot_user_id
        self.retry_seconds = retry_seconds
        self._throttles: collections.defaultdict[int, EditThrottle] = collections.defaultdict(
            lambda: EditThrottle(edit_interval)
        )
        self._under_way: dict[int, _UnderWay] = {}  # reply row id → reply being written
        self.shutting_down = False

    def generation_of(self, message_id: int, answers: int | None = None) -> Generation | None:
        """The generation of the reply whose first Discord part is this message. People can
        click a part before Discord's answer to the bot's POST brings its id: then the reply
        under way whose first part is still unknown and that answers the same question
        (`answers`: the message the clicked part replies to)."""
        under_way = list(self._under_way.values())
        found = next((u for u in under_way if u.stream.first_part_id == message_id), None)
        if found is None and answers is not None:
            found = next((u for u in under_way if u.stream.first_part_id is None and u.stream.to.question_id == answers),
                         None)
        return found.generation if found is not None else None

    def is_under_way(self, reply_id: int) -> bool:
        return reply_id in self._under_way

    def under_way_for(self, requester_id: int) -> int:
        """How many answers to this person are being prepared, queued or written."""
        return sum(u.stream.to.requester_id == requester_id for u in self._under_way.values())

    async def answer(self, question: Question, channel: discord.abc.Messageable,
                     previous: StoredReply | None = None, continuing: bool = False) -> None:
        """Write the answer (with `previous`, in place of that reply; `continuing`: after
        that reply's text, extending it). In a scene, each character who answers (see
        `bot.roleplay.scenes`) writes its own reply, through its webhook; `previous` keeps its character."""
        for persona_key in await self._cast(question, previous):
            if self.shutting_down:
                break  # the question stays stored: answered after the restart
            await self._answer_as(question, channel, previous, continuing, persona_key)

    async def _cast(self, question: Question, previous: StoredReply | None) -> list[str | None]:
        """The scene characters who answer (persona keys); [None]: the conversation's persona."""
        if previous is not None:
            return [previous.persona]
        keys, strategy = await self.store.scene(question.key)
        members = [Member(k, self.responder.personas[k].name) for k in keys if k in self.responder.personas]
        if not members:
            return [None]
        replied = (await self.store.part_persona(question.key, str(question.replied_to))
                   if question.replied_to else None)
        recent = await self.store.scene_speakers(question.key)
        chosen = [m.key for m in choose_speakers(question.text, members, strategy, recent, self.rng, replied)]
        if question.message_id is None:
            return chosen
        # After a restart cut a turn short, the characters that answered already do not again.
        answered = await self.store.replied_personas(question.key, str(question.message_id))
        return [key for key in chosen if key not in answered]

    async def _others(self, key: str, persona_key: str | None) -> list[str]:
        """The names of the scene's other characters (their lines end this one's reply)."""
        if persona_key is None:
            return []
        keys, _ = await self.store.scene(key)
        return [self.responder.personas[k].name for k in keys if k != persona_key and k in self.responder.personas]

    def _poster(self, channel: discord.abc.Messageable, channel_id: int, persona_key: str | None,
                name: str) -> Poster | None:
        if persona_key is None or self.webhooks is None:
            return None
        return self.webhooks.poster(channel, channel_id, persona_key, name)

    async def _answer_as(self, question: Question, channel: discord.abc.Messageable, previous: StoredReply | None,
                         continuing: bool, persona_key: str | None) -> None:
        if previous is not None:  # it waited in the lane: a swipe may have changed its text or parts
            previous = await self.store.reply(previous.id) or previous
        persona = (self.responder.persona(persona_key) if persona_key is not None
                   else await self.responder.conversation_persona(question.key))
        to = Destination(channel, question.message_id, question.author_id,
                         self._poster(channel, question.channel_id, persona_key, persona.name))
        stream = ReplyStream(self.store, question.key, to, str(self.bot_user_id), persona.name,
                             self.retry_seconds, previous, continuing, persona=persona_key)
        try:
            await stream.begin()
        except ConversationGone as error:
            log.info("not answering: %s", error)
            return
        assert stream.reply_id is not None
        under_way = self._under_way[stream.reply_id] = _UnderWay(stream)
        try:
            async with _typing(channel):
                context = await self._context(question, channel) if question.read_context else []
                try:
                    reply = await self.responder.start_reply(question.key, speaker=question.author_name,
                                                             context=context,
                                                             continue_reply=previous if continuing else None,
                                                             persona=persona if persona_key is not None else None,
                                                             others=await self._others(question.key, persona_key),
                                                             own_id=str(self.bot_user_id))
                except (EngineError, PromptTooLong) as error:
                    log.warning("cannot answer in %s: %s", question.key, error)
                    await stream.fail(f"I can't answer right now: {error}")
                    return
                under_way.generation = reply.generation
                if self.shutting_down:
                    reply.generation.cancel()
                await self._stream(stream, reply.generation, question.channel_id)
        except asyncio.CancelledError:
            # Cut off (a shutdown past its grace): keep the final state in the store at least;
            # the next start shows it in Discord.
            status, notice = stream.ending(INTERRUPTED, INTERRUPTED_NOTICE)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.finish_reply(stream.reply_id, status, stream.text.strip(), notice))
                metrics.reply_finished(status)
            raise
        except Exception:
            # A bug or an error Discord will not get over (403: the bot lost its rights
            # there): the reply ends failed in the store, and Discord is told if it can be.
            log.exception("answering in %s failed", question.key)
            with contextlib.suppress(Exception):
                await stream.fail("something went wrong while answering")
        finally:
            self._under_way.pop(stream.reply_id, None)

    async def _context(self, question: Question, channel: discord.abc.Messageable) -> list[Message]:
        """The chat just before the question, read from Discord (best effort)."""
        if question.message_id is None:
            return []
        try:
            return [to_message(m) async for m in channel.history(
                limit=CONTEXT_MESSAGES, before=discord.Object(question.message_id), oldest_first=False)
                if m.author.id != self.bot_user_id and not (self.webhooks and self.webhooks.owns(m))]
        except (discord.HTTPException, OSError) as error:
            log.info("cannot read the chat around the question in %s (%s); answering without it", question.key, error)
            return []

    async def _stream(self, stream: ReplyStream, generation: Generation, channel_id: int) -> None:
        throttle = self._throttles[channel_id]
        loop = asyncio.get_running_loop()
        if generation.position > 0:
            await stream.show("", queue_notice(generation.position))
            throttle.mark(loop.time())
        follower: asyncio.Task[None] | None = asyncio.create_task(self._follow_queue(stream, generation))
        text = ""
        error: EngineError | None = None
        queued, first = time.perf_counter(), None
        metrics.ACTIVE.inc()
        try:
            async for piece in generation:
                if first is None:
                    first = time.perf_counter()
                if follower is not None:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
                    follower = None
                text += piece
                if text.strip() and throttle.ready(loop.time()):
                    await stream.show(text)
                    throttle.mark(loop.time())
        except EngineError as failure:
            log.error("generation failed: %s", failure)
            error = failure
        finally:
            if follower is not None:
                follower.cancel()
            metrics.ACTIVE.dec()
            stats = generation.stats
            metrics.generation_ended(None if first is None else first - queued, time.perf_counter() - queued,
                                     stats.completion_tokens, stats.prompt_tokens, stats.reused_tokens)
        stream.text = stream.base + text
        await asyncio.sleep(throttle.wait_time(loop.time()))
        throttle.mark(loop.time())
        if error is not None and not self.shutting_down:
            await stream.fail(f"generation failed: {error}")
        elif self.shutting_down and generation.stats.stopped_by in ("cancelled", "error"):
            await stream.interrupt()
        else:
            await stream.finish(stopped=generation.stats.stopped_by == "cancelled")

    @staticmethod
    async def _follow_queue(stream: ReplyStream, generation: Generation) -> None:
        """Until the first text, show the reply's place in the queue when it changes (an
        engine may only know it once the scheduler has looked at the request)."""
        position = generation.position
        while True:
            await asyncio.sleep(QUEUE_FIRST_LOOK_SECONDS if position == 0 else QUEUE_REFRESH_SECONDS)
            if 0 < generation.position != position:
                position = generation.position
                await stream.show("", queue_notice(position))

    def interrupt_all(self) -> int:
        """Shutting down: end every generation; each reply then takes the `interrupted`
        state in Discord and in the store. How many there were."""
        self.shutting_down = True
        for under_way in self._under_way.values():
            if under_way.generation is not None:
                under_way.generation.cancel()
        return len(self._under_way)


@contextlib.asynccontextmanager
async def _typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "typing" while the reply is prepared; best effort (a failing trigger is no
    reason to lose the reply, unlike discord.py's own `typing()`, which raises)."""

    async def keep() -> None:
        while True:
            with contextlib.suppress(discord.HTTPException, OSError):
                await channel.typing()  # awaited, it triggers once
            await asyncio.sleep(TYPING_SECONDS)

    task = asyncio.create_task(keep())
    try:
        yield
    finally:
        task.cancel()
