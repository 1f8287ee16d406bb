"""User personas (`/me set`): who each person plays, placed in the prompt the way
SillyTavern places its persona description.

SillyTavern's default story string ends with `{{persona}}` ("In Story String / Prompt
manager"): after the system prompt, world info before, the character's description,
personality, scenario and world info after, and before the example dialogue. A Discord
channel holds several people, so the preamble carries one line per person present in the
history, `[Ann: a tall ranger who distrusts magic]`, with `{{user}}` rendered as that
person's display name and `{{char}}` as the character's.

Prefix reuse (see `bot.roleplay.personas.preamble_user`): the preamble is the start of every prompt
of a conversation, so the lines do not depend on who is answered. They are ordered by each
person's first appearance in the history; the asker is always among the (at most
`MAX_PEOPLE`) people described, the others are the earliest to appear, and the lines stay
within `max_chars`.

Integrity: a description is one line (every run of whitespace, line breaks included,
becomes one space) after the prompt's `neutralize`, and the name is `clean_name`d, so a
description can neither open a turn nor write a speaker line.

Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.core.conversation import Message
from bot.roleplay.personas import render_macros
from bot.core.prompt import clean_name, neutralize

MAX_DESCRIPTION_CHARS = 1000  # what `/me set` accepts
MAX_PEOPLE = 4  # people described in one prompt


class DescriptionError(ValueError):
    """A description `/me set` refuses; the message says why."""


def check_description(text: str) -> str:
    """The description to store: stripped, not empty, at most `MAX_DESCRIPTION_CHARS`."""
    text = text.strip()
    if not text:
        raise DescriptionError("The description is empty: say who you play, e.g. `a tall ranger who distrusts magic`.")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise DescriptionError(
            f"The description has {len(text)} characters; at most {MAX_DESCRIPTION_CHARS} fit. Shorten it."
        )
    return text


def people_present(history: Sequence[Message]) -> list[tuple[str, str]]:
    """(author id, newest display name) of each person in the history (the bot's own
    messages left out), in the order of their first message."""
    names: dict[str, str] = {}
    for message in history:
        if not message.is_bot:
            names[message.author_id] = message.author_name  # insertion order: first appearance
    return list(names.items())


def persona_line(name: str, description: str, char: str) -> str:
    """`[Name: description]`, macros rendered, on one safe line."""
    person = clean_name(name)
    text = render_macros(description, char, person)
    return f"[{person}: {' '.join(neutralize(text).split())}]"


def user_persona_lines(
    history: Sequence[Message], descriptions: Mapping[str, str], char: str, max_chars: int,
    max_people: int = MAX_PEOPLE,
) -> list[str]:
    """The lines describing the people of `history` who have a description (author id →
    text in `descriptions`), ordered by first appearance. The asker (the author of the
    newest message from a person) is always chosen first, then the others in order of
    appearance, while there are at most `max_people` and the lines add up to at most
    `max_chars` characters (the asker's own line is cut to fit if it must)."""
    people = [(pid, name) for pid, name in people_present(history) if descriptions.get(pid, "").strip()]
    asker = next((m.author_id for m in reversed(history) if not m.is_bot), None)
    order = sorted(range(len(people)), key=lambda i: people[i][0] != asker)  # the asker first; stable
    chosen: dict[int, str] = {}
    used = 0
    for index in order:
        if len(chosen) >= max_people:
            break
        person_id, name = people[index]
        line = persona_line(name, descriptions[person_id], char)
        if used + len(line) > max_chars:
            if person_id != asker or max_chars - used < 16:
                continue
            line = line[: max_chars - used - 2].rstrip() + "…]"
        chosen[index] = line
        used += len(line) + 1
    return [chosen[i] for i in sorted(chosen)]
