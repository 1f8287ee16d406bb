"""Plain data that flows between the edges (Discord, terminal) and the core.

Nothing here knows about discord.py or the database: the edges convert their objects into
these, and the prompt, policy and store work only with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Message:
    """One message of a conversation, as the prompt sees it."""

    author_id: str
    author_name: str
    content: str
    is_bot: bool = False
    platform_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    attachments: str = ""  # text read from attached files, and notes on the ones not read
    # The people it mentions, as (id, display name): their names are in `content` as
    # "@name" (kept for pseudonymizing exported datasets; never read back into prompts).
    mentions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ConversationState:
    """What the store keeps about a conversation besides its messages."""

    key: str
    persona: str | None = None
    enabled: bool = False
    known: bool = False  # the conversation has been stored before
    is_dm: bool = False
    # When to speak, for messages that do not address the bot (/channel speak).
    reply_chance: int = 0  # percent
    follow_up_seconds: int = 0
    name_trigger: bool = False


# A reply's life: streaming while the model writes, then one final state.
STREAMING, DONE, STOPPED, INTERRUPTED, FAILED = "streaming", "done", "stopped", "interrupted", "failed"
FINAL_STATES = frozenset({DONE, STOPPED, INTERRUPTED, FAILED})


@dataclass(frozen=True)
class StoredReply:
    """One reply of the bot as the store keeps it: the model's text (once, unsplit), its
    state, the notice shown under it for people (never fed to the model), and its Discord
    parts. `undelivered`: Discord does not show its final state yet."""

    id: int
    key: str
    status: str
    content: str
    author_name: str
    part_ids: tuple[str, ...] = ()
    reply_to: str | None = None  # the question's platform id
    requester_id: str | None = None
    notice: str | None = None
    undelivered: bool = False
    persona: str | None = None  # the character that spoke (a scene's), else None
