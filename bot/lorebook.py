"""Lorebooks (`character_book` of Character Card V2/V3): entries whose keys appear in the
recent conversation are inserted into the prompt, within the book's token budget.

Rules, following the V2 spec: an entry is active when it is enabled and either constant
or one of its keys appears in the last `scan_depth` messages (case-sensitively only when
the entry says so); a `selective` entry also needs one of its `secondary_keys`. Active
entries are ordered by `insertion_order`; when they exceed `token_budget`, the lowest
`priority` ones are dropped first. `position` puts an entry before or after the
character's description.

Every field is type-checked (`entry_from_dict`): numbers must be JSON numbers, flags
true/false, keys lists of text. A bad entry is skipped with a log line naming the card and
the entry, never a crash, so one typo in a card cannot stop the bot from starting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SCAN_DEPTH = 10
DEFAULT_TOKEN_BUDGET = 512


@dataclass(frozen=True)
class LoreEntry:
    keys: tuple[str, ...]
    content: str
    enabled: bool = True
    constant: bool = False
    selective: bool = False
    secondary_keys: tuple[str, ...] = ()
    case_sensitive: bool = False
    insertion_order: int = 0
    priority: int = 0
    position: str = "before_char"  # or "after_char"

    def matches(self, text: str) -> bool:
        if not self.enabled:
            return False
        if self.constant:
            return True
        haystack = text if self.case_sensitive else text.lower()

        def found(keys: Sequence[str]) -> bool:
            return any(k and (k if self.case_sensitive else k.lower()) in haystack for k in keys)

        return found(self.keys) and (not self.selective or found(self.secondary_keys))


@dataclass(frozen=True)
class Lorebook:
    entries: tuple[LoreEntry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int = DEFAULT_TOKEN_BUDGET
    skipped: tuple[str, ...] = ()  # entries (and settings) dropped for a wrong type, and why

    def activate(
        self, recent_texts: Sequence[str], count_tokens: Callable[[str], int]
    ) -> tuple[list[str], list[str]]:
        """The contents to insert (before the description, after it) for this conversation."""
        window = "\n".join(recent_texts[-self.scan_depth :]) if self.scan_depth > 0 else ""
        active = [e for e in self.entries if e.matches(window)]
        # Keep the highest priorities that fit the budget, then restore insertion order.
        kept: list[LoreEntry] = []
        used = 0
        for entry in sorted(active, key=lambda e: (-e.priority, e.insertion_order)):
            cost = count_tokens(entry.content)
            if used + cost <= self.token_budget:
                kept.append(entry)
                used += cost
        kept.sort(key=lambda e: e.insertion_order)
        before = [e.content for e in kept if e.position != "after_char"]
        after = [e.content for e in kept if e.position == "after_char"]
        return before, after


class LoreError(ValueError):
    """A lorebook entry or setting has the wrong type or is out of range."""


_MAX_ORDER = 2**31  # insertion_order and priority lie within ±this
_MAX_SCAN_DEPTH = 1000
_MAX_TOKEN_BUDGET = 1_000_000
_POSITIONS = ("before_char", "after_char")


def _number(raw: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """A JSON number (an int, or a float with no fraction) within [low, high]; missing or
    null is `default`. Strings ("10", "abc") and booleans are errors: the spec says number."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoreError(f"{key} must be a number, not {type(value).__name__} {_show(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise LoreError(f"{key} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise LoreError(f"{key} is {value}; it must be between {low} and {high}")
    return int(value)


def _flag(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LoreError(f"{key} must be true or false, not {type(value).__name__} {_show(value)}")
    return value


def _keys(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A list of text keys (numbers are taken as their text; a single string is one key)."""
    value = raw.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise LoreError(f"{key} must be a list of text, not {type(value).__name__}")
    keys = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise LoreError(f"{key} must be a list of text; it holds {type(item).__name__} {_show(item)}")
        keys.append(str(item))
    return tuple(keys)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def entry_from_dict(raw: Any) -> LoreEntry:
    """One lorebook entry, every field checked for its type; `LoreError` says which is wrong."""
    if not isinstance(raw, Mapping):
        raise LoreError(f"an entry must be an object, not {type(raw).__name__}")
    content = raw.get("content")
    if content is not None and not isinstance(content, str):
        raise LoreError(f"content must be text, not {type(content).__name__}")
    position = raw.get("position")
    if position in (None, ""):
        position = "before_char"
    elif position not in _POSITIONS:
        raise LoreError(f"position must be 'before_char' or 'after_char', not {_show(position)}")
    return LoreEntry(
        keys=_keys(raw, "keys"),
        content=content or "",
        enabled=_flag(raw, "enabled", True),
        constant=_flag(raw, "constant", False),
        selective=_flag(raw, "selective", False),
        secondary_keys=_keys(raw, "secondary_keys"),
        case_sensitive=_flag(raw, "case_sensitive", False),
        insertion_order=_number(raw, "insertion_order", 0, -_MAX_ORDER, _MAX_ORDER),
        priority=_number(raw, "priority", 0, -_MAX_ORDER, _MAX_ORDER),
        position=position,
    )


def _entry_label(index: int, raw: Any) -> str:
    """How a log line names an entry: its index, and its name/comment/id when it has one."""
    label = f"entry {index}"
    if isinstance(raw, Mapping):
        for field in ("name", "comment", "id"):
            value = raw.get(field)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                return f"{label} ({field} {_show(value)})"
    return label


def lorebook_from_dict(book: Mapping[str, Any], origin: str = "a lorebook") -> Lorebook:
    """A lorebook from a card's `character_book`. An entry with a field of the wrong type
    (e.g. `"insertion_order": "abc"`) is skipped with a log line naming `origin` (the file
    or card) and the entry; a bad book setting (scan_depth, token_budget) falls back to its
    default, also logged. Nothing here raises for a bad entry. A setting of 0 means the
    default, as it always has."""
    entries: list[LoreEntry] = []
    skipped: list[str] = []
    raw_entries = book.get("entries")
    for index, raw in enumerate(raw_entries if isinstance(raw_entries, list) else []):
        try:
            entries.append(entry_from_dict(raw))
        except LoreError as error:
            problem = f"{_entry_label(index, raw)}: {error}"
            log.warning("%s: skipping lorebook %s", origin, problem)
            skipped.append(problem)
    settings = {}
    for key, default, high in (("scan_depth", DEFAULT_SCAN_DEPTH, _MAX_SCAN_DEPTH),
                               ("token_budget", DEFAULT_TOKEN_BUDGET, _MAX_TOKEN_BUDGET)):
        try:
            settings[key] = _number(book, key, default, 0, high) or default
        except LoreError as error:
            log.warning("%s: lorebook %s; using %d", origin, error, default)
            skipped.append(f"{error} (using {default})")
            settings[key] = default
    return Lorebook(entries=tuple(entries), skipped=tuple(skipped), **settings)
