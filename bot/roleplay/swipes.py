"""Swipes and Continue: the pure rules (no Discord, no database).

A reply can have several alternatives (SillyTavern's swipes). The store keeps them in
`reply_alternatives` (message id, position, content) and the reply's `swipe` column names
the position shown; the reply's own `content` is always the text shown, and it is the one
in history. The row of the shown position may be missing or stale (a reply being written,
or continued, changes only `content`): it is (re)written whenever the reply leaves that
position, before anything else happens to the reply (a Regenerate, a swipe). So the
alternatives of a reply are the saved positions plus the shown one.

Positions only grow (a new alternative takes the highest plus one); what people see is the
rank, "2/3". At most `MAX_ALTERNATIVES` are kept: past that, Regenerate drops the oldest
one that is not shown.

Continue extends a reply in place: the prompt is the chat up to that reply, with the reply's
text left open after `### Response:` (`bot.core.prompt.render_chat(continue_last=True)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.core.conversation import Message

MAX_ALTERNATIVES = 20
FIRST_POSITION = 1


@dataclass(frozen=True)
class SwipeView:
    """The alternatives of one reply as the buttons show them."""

    positions: tuple[int, ...]  # sorted, the shown one included
    shown: int

    @classmethod
    def of(cls, saved: Sequence[int], shown: int | None) -> SwipeView:
        shown = FIRST_POSITION if shown is None else shown
        return cls(tuple(sorted({*saved, shown})), shown)

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def rank(self) -> int:
        """The shown alternative's number, from 1."""
        return self.positions.index(self.shown) + 1

    @property
    def label(self) -> str:
        return f"{self.rank}/{self.count}"

    def neighbour(self, step: int) -> int | None:
        """The position `step` (-1 or +1) away from the shown one; None past either end."""
        index = self.positions.index(self.shown) + step
        return self.positions[index] if 0 <= index < self.count else None


@dataclass(frozen=True)
class Regeneration:
    """What Regenerate does to a reply's alternatives before it streams a new one."""

    save_at: int | None  # the position the shown text is saved at (None: nothing worth keeping)
    drop: tuple[int, ...]  # positions deleted to stay within the limit
    new_position: int  # the position of the alternative about to be written


def plan_regeneration(view: SwipeView, shown_text: str, limit: int = MAX_ALTERNATIVES) -> Regeneration:
    """Keep the shown text (unless it is empty: a failure with nothing written is not an
    alternative, the new one takes its place), then make room for the new one."""
    others = [p for p in view.positions if p != view.shown]
    keep_shown = bool(shown_text.strip())
    excess = len(others) + keep_shown + 1 - limit
    drop = tuple(others[: max(0, excess)])
    if keep_shown:
        return Regeneration(view.shown, drop, view.positions[-1] + 1)
    return Regeneration(None, drop, view.shown)


def history_to_continue(history: Sequence[Message], reply_platform_id: str) -> list[Message] | None:
    """The history up to and including the reply to continue (what came after it is not
    part of the prompt: the reply is extended where it stands). None if it is not there."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].platform_id == reply_platform_id and history[index].is_bot:
            return list(history[: index + 1])
    return None
