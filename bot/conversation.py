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


@dataclass(frozen=True)
class ConversationState:
    """What the store keeps about a conversation besides its messages."""

    key: str
    persona: str | None = None
    enabled: bool = False
    known: bool = False  # the conversation has been stored before
