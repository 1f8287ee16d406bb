"""Scenes: several characters in one channel. Who answers a message, and how each
character sees the others in its prompt (pure: no Discord, no database).

Who answers (`choose_speakers`), as SillyTavern's group chats do it:
1. the characters the message addresses: the one whose message it replies to, then every
   character named in it (whole word, any case), in the order they appear; at most
   `MAX_ADDRESSED`, each once;
2. otherwise the channel's strategy picks one:
   - `natural`: the character who spoke least recently (never spoken first, in list order);
   - `list`: round robin in the listed order, after the last one who spoke;
   - `random`: any character, from the random generator passed in.

How the others are seen (`as_seen_by`): when character A answers, A's own earlier lines are
its responses, and every other character's lines are speaker lines (``B: …``) of the
instruction, like a person's: the model writes A alone, and stops at ``\\nB:``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bot.core.conversation import Message

STRATEGIES = ("natural", "list", "random")
DEFAULT_STRATEGY = "natural"
MAX_ADDRESSED = 3  # characters that answer one message at most
MAX_MEMBERS = 10  # characters per scene (Discord allows 15 webhooks per channel, others use some)


@dataclass(frozen=True)
class Member:
    """A character of a scene: its persona key and the name it speaks under."""

    key: str
    name: str


def named_in(text: str, members: Sequence[Member]) -> list[Member]:
    """The members whose name appears in `text` as a whole word (any case), in order of
    first appearance. A longer name wins where two overlap ("Vex" inside "Captain Vex")."""
    found: list[tuple[int, int, Member]] = []
    for member in members:
        name = member.name.strip()
        if not name:
            continue
        match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE)
        if match:
            found.append((match.start(), -len(name), member))
    found.sort(key=lambda item: (item[0], item[1]))
    chosen: list[Member] = []
    covered: list[tuple[int, int]] = []
    for start, negative_length, member in found:
        end = start - negative_length
        if any(s <= start < e for s, e in covered):
            continue  # inside a longer name already chosen
        covered.append((start, end))
        chosen.append(member)
    return chosen


def choose_speakers(
    text: str,
    members: Sequence[Member],
    strategy: str | None,
    recent_speakers: Sequence[str],
    rng: random.Random,
    replied_to: str | None = None,
) -> list[Member]:
    """Who answers `text` (see the module doc). `recent_speakers`: the persona keys of the
    scene's replies, oldest first; `replied_to`: the key of the character whose message
    this one replies to."""
    if not members:
        return []
    addressed = [m for m in members if m.key == replied_to] + named_in(text, members)
    unique: list[Member] = []
    for member in addressed:
        if member not in unique:
            unique.append(member)
    if unique:
        return unique[:MAX_ADDRESSED]
    strategy = strategy if strategy in STRATEGIES else DEFAULT_STRATEGY
    if strategy == "random":
        return [rng.choice(list(members))]
    keys = [m.key for m in members]
    spoken = [key for key in recent_speakers if key in keys]
    if strategy == "list":
        if not spoken:
            return [members[0]]
        return [members[(keys.index(spoken[-1]) + 1) % len(members)]]
    # natural: whoever spoke least recently (never, first of all)
    last_turn = {key: index for index, key in enumerate(spoken)}
    return [min(members, key=lambda m: (last_turn.get(m.key, -1), keys.index(m.key)))]


def as_seen_by(history: Sequence[Message], name: str) -> list[Message]:
    """The history as character `name` sees it: the bot's messages under another name (the
    other characters of the scene) become speaker lines, its own stay its responses."""
    return [replace(m, is_bot=False) if m.is_bot and m.author_name != name else m for m in history]
