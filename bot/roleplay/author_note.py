"""The author's note and a card's depth prompt: text placed inside the chat, near its end.

SillyTavern's semantics ("In-chat @ depth", authors-note.js `setFloatingPrompt`):

* **Depth**: the note goes `depth` messages from the end of the history (0: after the last
  message, 1: before it, …; deeper than the history: before its first message). The prompt
  renders it as an `### Input:` block there (`bot.core.prompt.render_chat`'s `notes`), its text
  neutralized like the preamble, so a note cannot forge a turn.
* **Frequency** (`every`) counts the people's messages in the conversation (the user
  turns, the one being answered included): 0 = never, 1 = every turn, N = when that count
  is a multiple of N (and never before the first message).
* `{{char}}` is the character's name, `{{user}}` the person being answered.
* A card's `extensions.depth_prompt` (`{prompt, depth}`, SillyTavern's "Character's Note")
  is inserted at its depth on every turn; the author's note comes after it at equal depth.

Defaults as SillyTavern's: depth 4, every turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.roleplay.personas import Persona, render_macros

DEFAULT_DEPTH = 4
DEFAULT_EVERY = 1
MAX_DEPTH = 1000
MAX_EVERY = 1000
MAX_NOTE_CHARS = 2000


@dataclass(frozen=True)
class AuthorNote:
    """A conversation's author's note (conversations.author_note, _depth, _every)."""

    text: str = ""
    depth: int = DEFAULT_DEPTH
    every: int = DEFAULT_EVERY


def is_due(every: int, user_turns: int) -> bool:
    """Whether the note goes into this prompt (SillyTavern: interval 1 always, ≤ 0 never,
    otherwise when the count of user messages is a positive multiple of the interval)."""
    if every <= 0:
        return False
    if every == 1:
        return True
    return user_turns > 0 and user_turns % every == 0


def card_depth_prompt(persona: Persona) -> tuple[int, str] | None:
    """A card's `extensions.depth_prompt` as `(depth, prompt)`, if it has a usable one."""
    data: Mapping[str, Any] = persona.extra.get("data", persona.extra)
    extensions = data.get("extensions") if isinstance(data, Mapping) else None
    found = extensions.get("depth_prompt") if isinstance(extensions, Mapping) else None
    if not isinstance(found, Mapping):
        return None
    prompt, depth = found.get("prompt"), found.get("depth", DEFAULT_DEPTH)
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        depth = DEFAULT_DEPTH
    return min(max(int(depth), 0), MAX_DEPTH), prompt[:MAX_NOTE_CHARS]


def note_insertions(note: AuthorNote, persona: Persona, user: str, user_turns: int) -> list[tuple[int, str]]:
    """The `(depth, text)` notes for this prompt: the card's depth prompt, then the author's
    note when it is due; macros rendered."""
    notes: list[tuple[int, str]] = []
    card = card_depth_prompt(persona)
    if card is not None:
        notes.append((card[0], render_macros(card[1].strip(), persona.name, user)))
    if note.text.strip() and is_due(note.every, user_turns):
        depth = min(max(note.depth, 0), MAX_DEPTH)
        notes.append((depth, render_macros(note.text.strip()[:MAX_NOTE_CHARS], persona.name, user)))
    return notes


def describe(note: AuthorNote) -> str:
    """The note's settings in words, for /note."""
    if not note.text.strip():
        return "No author's note is set here."
    every = ("every turn" if note.every == 1 else "never (frequency 0)" if note.every <= 0
             else f"every {note.every} turns")
    where = "after the last message" if note.depth == 0 else f"{note.depth} messages from the end"
    return f"Author's note ({where}, {every}):\n>>> {note.text}"
