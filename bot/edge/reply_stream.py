"""A reply's life, kept in step in Discord and in the store.

    begin ─▶ streaming (the text is stored as it is shown, with the ids of its parts)
                ├─▶ done | stopped     final edit: Stop gone, Regenerate live
                ├─▶ failed             engine or prompt error: text kept, the person told
                └─▶ interrupted        shut down now, or found streaming at the next start

`ReplyStream` drives one reply while its generation runs. Every final state is stored
first (`undelivered`), then `sync_reply` makes Discord show it and marks it delivered: if
Discord is down, the stored reply is delivered later by the same function (a periodic
retry, and again at the next start). History keeps the model's text once, unsplit; the
notice under a reply is for people and never stored as the bot's words.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import discord

from bot.core.conversation import DONE, FAILED, INTERRUPTED, STOPPED, StoredReply
from bot.core.replies import EMPTY_REPLY, split_message
from bot.edge.buttons import controls
from bot.edge.delivery import is_gone, is_transient, retried
from bot.roleplay.swipes import SwipeView
from bot.storage.store import Store
from bot.telemetry import metrics

log = logging.getLogger(__name__)
NO_PINGS = discord.AllowedMentions.none()
STOPPED_NOTICE = "*(stopped)*"
INTERRUPTED_NOTICE = "*(interrupted: the bot restarted; press Regenerate for a whole answer)*"


def failed_notice(reason: str) -> str:
    return f"*({reason}; press Regenerate to try again)*"


def display(text: str, notice: str | None) -> str:
    """What people see: the model's text, then the notice (if any) on its own paragraph."""
    text = text.strip()
    if notice:
        return f"{text}\n\n{notice}" if text else notice
    return text or EMPTY_REPLY


class Poster(Protocol):
    """Who posts a reply's parts: the bot itself (`ChannelPoster`), or a scene character's
    webhook (`bot.edge.webhooks.WebhookPoster`). Each call is one Discord request (retried by
    the caller); `extra` holds the view, and for the first part the reply reference."""

    async def send(self, content: str, **extra: Any) -> int: ...

    async def edit(self, message_id: int, content: str, **extra: Any) -> None: ...

    async def delete(self, message_id: int) -> None: ...


class PartFrozen(Exception):
    """A part that Discord still shows but nobody can edit any more (the webhook that posted
    it was deleted): the writer posts it, and the parts after it, again."""


class ChannelPoster:
    """The bot's own messages in the channel."""

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self.channel = channel

    async def send(self, content: str, **extra: Any) -> int:
        return (await self.channel.send(content, allowed_mentions=NO_PINGS, **extra)).id

    async def edit(self, message_id: int, content: str, **extra: Any) -> None:
        message = self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
        await message.edit(content=content, allowed_mentions=NO_PINGS, **extra)

    async def delete(self, message_id: int) -> None:
        await self.channel.get_partial_message(message_id).delete()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Destination:
    """Where a reply goes: a channel, the question it answers, who asked; `poster`: who
    posts it there (default: the bot itself)."""

    channel: discord.abc.Messageable
    question_id: int | None
    requester_id: int
    poster: Poster | None = None


class PartWriter:
    """Makes Discord show a list of parts: edits the parts that changed, sends new ones
    (the first as a reply to the question, which may have been deleted), deletes surplus.
    Each call is retried on Discord's transient failures for `retry_seconds`."""

    def __init__(self, to: Destination, part_ids: Sequence[int], retry_seconds: float) -> None:
        self.to = to
        self.poster = to.poster or ChannelPoster(to.channel)
        self.part_ids = list(part_ids)
        self.shown: list[str | None] = [None] * len(self.part_ids)
        self.running: bool | None = None  # the buttons the first part shows (None: unknown)
        self.swipes: SwipeView | None = None  # the reply's alternatives, for the final buttons
        self._swipes_shown: SwipeView | None = None
        self.retry_seconds = retry_seconds
        # Stores the reply's part ids as parts join or leave it (set by the reply's owner): a
        # person deleting a part just posted must find it in the store to erase the reply.
        self.persist: Callable[[list[str]], Awaitable[None]] | None = None

    async def put(self, parts: list[str], running: bool) -> None:
        for index, part in enumerate(parts):
            if index < len(self.part_ids):
                buttons_changed = index == 0 and (self.running, self._swipes_shown) != (running, self.swipes)
                if self.shown[index] != part or buttons_changed:
                    try:
                        await self._edit(index, part, running)
                    except PartFrozen:
                        await self._abandon_from(index)
                        await self._send(index, part, running)
            else:
                await self._send(index, part, running)

    async def trim(self, count: int) -> None:
        """Delete the parts past the first `count` (a final reply shorter than before)."""
        for message_id in await self._drop_from(count):
            try:
                await retried(functools.partial(self.poster.delete, message_id), "delete a surplus part",
                              self.retry_seconds)
            except discord.NotFound:
                pass

    async def _drop_from(self, index: int) -> list[int]:
        """The parts from `index` on leave the reply: in the store first (`persist`), so
        that the deletion Discord then reports is not taken for a person deleting a part
        of the reply (which erases it); their ids, to delete in Discord."""
        dropped = self.part_ids[index:]
        del self.part_ids[index:], self.shown[index:]
        if dropped and self.persist is not None:
            await self.persist([str(i) for i in self.part_ids])
        return dropped

    async def _abandon_from(self, index: int) -> None:
        """Parts from `index` on can no longer be edited: they are deleted where Discord lets
        the bot (best effort) and forgotten, to be posted again after the ones before."""
        log.warning("parts %s of a reply can no longer be edited; posting them again", self.part_ids[index:])
        for message_id in await self._drop_from(index):
            with contextlib.suppress(discord.HTTPException, OSError, PartFrozen):
                await self.poster.delete(message_id)

    async def _edit(self, index: int, part: str, running: bool) -> None:
        message_id = self.part_ids[index]
        extra = {"view": controls(self.to.requester_id, running, self.swipes)} if index == 0 else {}
        try:
            await retried(lambda: self.poster.edit(message_id, part, **extra), "edit a reply", self.retry_seconds)
        except discord.NotFound:
            log.info("part %d of a reply was deleted in Discord; not editing it again", message_id)
        self.shown[index] = part
        if index == 0:
            self.running, self._swipes_shown = running, self.swipes

    async def _send(self, index: int, part: str, running: bool) -> None:
        extra: dict[str, object] = {}
        if index == 0:
            extra["view"] = controls(self.to.requester_id, running, self.swipes)
            if self.to.question_id is not None:
                # Still a reply when the question was deleted meanwhile: Discord sends it plain.
                extra["reference"] = discord.MessageReference(
                    message_id=self.to.question_id, channel_id=self.to.channel.id,  # type: ignore[attr-defined]
                    fail_if_not_exists=False,
                )
                extra["mention_author"] = False
        message_id = await retried(lambda: self.poster.send(part, **extra), "send a reply", self.retry_seconds)
        self.part_ids.append(message_id)
        self.shown.append(part)
        if self.persist is not None:
            await self.persist([str(i) for i in self.part_ids])
        if index == 0:
            self.running, self._swipes_shown = running, self.swipes


async def sync_reply(store: Store, reply: StoredReply, to: Destination, retry_seconds: float,
                     writer: PartWriter | None = None) -> bool:
    """Make Discord show a stored reply's final state, then mark it delivered. False when
    Discord could not be reached in time: it stays undelivered, to be tried again."""
    writer = writer or PartWriter(to, [int(i) for i in reply.part_ids], retry_seconds)
    writer.persist = writer.persist or functools.partial(store.set_part_ids, reply.id)
    writer.swipes = await store.swipe_view(reply.id)
    parts = split_message(display(reply.content, reply.notice))
    try:
        await writer.put(parts, running=False)
        await writer.trim(len(parts))
    except discord.HTTPException as error:
        if not is_transient(error):  # 403, or 404 for a channel that is gone: no later try helps
            raise
        log.warning("Discord did not take reply %d (%s); it is stored and will be delivered later", reply.id, error)
        await store.update_reply(reply.id, reply.content, [str(i) for i in writer.part_ids])
        return False
    except OSError as error:  # connection errors that outlived the retries
        log.warning("Discord unreachable for reply %d (%s); it will be delivered later", reply.id, error)
        return False
    await store.mark_delivered(reply.id, reply.content, [str(i) for i in writer.part_ids])
    return True


class ReplyStream:
    """One reply while it is written: `begin`, `show` as text arrives, then one of
    `finish` (done or stopped), `fail` or `interrupt`. With `previous`, that reply is
    written again (Regenerate; its text is kept as an alternative), or with `continuing`
    written on: its text stays in front of what `show` is given (`base`)."""

    def __init__(self, store: Store, key: str, to: Destination, author_id: str, author_name: str,
                 retry_seconds: float, previous: StoredReply | None = None, continuing: bool = False,
                 persona: str | None = None) -> None:
        self.store = store
        self.persona = persona  # the scene character that speaks (stored with the reply)
        self.key = key
        self.to = to
        self.author_id = author_id
        self.author_name = author_name
        self.retry_seconds = retry_seconds
        self.previous = previous
        self.writer = PartWriter(to, [int(i) for i in previous.part_ids] if previous else [], retry_seconds)
        self.reply_id: int | None = previous.id if previous else None
        if previous is not None:
            self.writer.persist = functools.partial(store.set_part_ids, previous.id)
        self.continuing = continuing and previous is not None
        self.base = previous.content.strip() if previous is not None and self.continuing else ""
        self.text = self.base
        self.undelivered = False  # Discord stopped taking this reply's edits

    @property
    def first_part_id(self) -> int | None:
        return self.writer.part_ids[0] if self.writer.part_ids else None

    async def begin(self) -> None:
        """Store the reply as `streaming` (regenerating: the same row, emptied; continuing:
        the same row, its text kept)."""
        if self.previous is not None and self.continuing:
            await self.store.resume_reply(self.previous.id)
            return
        if self.previous is not None:
            await self.store.restart_reply(self.previous.id, self.author_name)
            return
        self.reply_id = await self.store.begin_reply(
            self.key, author_id=self.author_id, author_name=self.author_name,
            reply_to=str(self.to.question_id) if self.to.question_id else None,
            requester_id=str(self.to.requester_id), persona=self.persona,
        )
        self.writer.persist = functools.partial(self.store.set_part_ids, self.reply_id)

    async def show(self, text: str, notice: str | None = None) -> None:
        """Show the text so far (and a notice such as the queue position), Stop live; the
        store holds what Discord shows (and may be one step ahead of it). If Discord stays
        down, the text is still stored and showing resumes with the final state."""
        assert self.reply_id is not None, "begin() first"
        text = self.base + text
        self.text = text
        # Stored before it is shown: a crash in between never leaves Discord showing text
        # that history lacks. A part's id is known only once Discord took it: the writer
        # stores it next (a crash in that window leaves an orphan part that recovery adopts).
        await self.store.update_reply(self.reply_id, text, [str(i) for i in self.writer.part_ids])
        if self.undelivered:
            return
        try:
            await self.writer.put(split_message(display(text, notice)), running=True)
        except (discord.HTTPException, OSError) as error:
            if isinstance(error, discord.HTTPException) and not (is_transient(error) or is_gone(error)):
                raise
            log.warning("Discord is not taking reply %d (%s); it goes on in the store", self.reply_id, error)
            self.undelivered = True

    async def finish(self, stopped: bool = False) -> bool:
        return await self._final(STOPPED if stopped else DONE, STOPPED_NOTICE if stopped else None)

    async def fail(self, reason: str) -> bool:
        return await self._final(FAILED, failed_notice(reason))

    async def interrupt(self) -> bool:
        return await self._final(INTERRUPTED, INTERRUPTED_NOTICE)

    def ending(self, status: str, notice: str | None) -> tuple[str, str | None]:
        """The final state to store: a Continue that wrote nothing (it failed, was stopped
        or cut off before its first words) leaves the reply as it was, a finished answer
        finished."""
        if self.continuing and self.previous is not None and self.text.strip() == self.base:
            return self.previous.status, self.previous.notice
        return status, notice

    async def _final(self, status: str, notice: str | None) -> bool:
        """Store the final state, then bring Discord in step. True once Discord shows it."""
        assert self.reply_id is not None, "begin() first"
        self.text = self.text.strip()
        status, notice = self.ending(status, notice)
        await self.store.finish_reply(self.reply_id, status, self.text, notice)
        metrics.reply_finished(status)
        reply = StoredReply(
            id=self.reply_id, key=self.key, status=status, content=self.text, author_name=self.author_name,
            part_ids=tuple(str(i) for i in self.writer.part_ids), notice=notice, undelivered=True,
        )
        return await sync_reply(self.store, reply, self.to, self.retry_seconds, self.writer)

