"""Lorebooks (`character_book` of Character Card V2/V3): entries whose keys appear in the
recent conversation are inserted into the prompt, within the book's token budget.

Rules, following the V2 spec: an entry is active when it is enabled and either constant
or one of its keys appears in the last `scan_depth` messages (case-sensitively only when
the entry says so); a `selective` entry also needs one of its `secondary_keys`. Active
entries are ordered by `insertion_order`; when they exceed `token_budget`, the lowest
`priority` ones are dropped first. `position` puts an entry before or after the
character's description.

Recursion (SillyTavern's "recursive scanning", on when the book's `recursive_scanning` is
true): after the first scan of the conversation, the contents of the entries just
activated are scanned too, and entries they mention activate in a next step, and so on
until a step activates nothing new or `max_recursion_steps` steps have run (the book's
`extensions.max_recursion_steps`; 0 = the bound `MAX_RECURSION_STEPS`; each entry
activates at most once, so a cycle ends). As in SillyTavern, per entry (in its
`extensions`): `exclude_recursion` — only the conversation can activate it, never another
entry; `prevent_recursion` — its content activates nothing; `delay_until_recursion` (true
or a level 1, 2, …) — only other entries' contents can activate it, level by level (level
2 opens once level 1 finds nothing more). The budget is filled step by step (an entry
found directly wins over one found through another's content; within a step the highest
`priority` first); once an entry does not fit, recursion stops, and only entries that made
it in are scanned for the next step.

Bounded for any card a stranger imports: at most `MAX_RECURSION_STEPS` scan steps (the
book may ask for fewer), the conversation scanned is its newest `MAX_SCAN_CHARS`
characters, the contents added by recursion stop being scanned past
`MAX_RECURSION_CHARS`, and a book holds at most `MAX_KEYS` keys (entries past that are
skipped and logged). Each scan lowercases its text once.

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
MAX_RECURSION_STEPS = 8  # scan steps in all, the first included (SillyTavern's UI allows up to 10)
MAX_SCAN_CHARS = 64_000  # the newest characters of the conversation that are scanned
MAX_RECURSION_CHARS = 32_000  # entry contents scanned by recursion, at most
MAX_KEYS = 5_000  # keys and secondary keys of one book


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
    exclude_recursion: bool = False  # never activated by another entry's content
    prevent_recursion: bool = False  # its content activates no other entry
    delay_until_recursion: int = 0  # > 0: activated only by other entries, at this level

    def matches(self, text: str, lowered: str | None = None) -> bool:
        """Whether a key (and, when selective, a secondary key) appears in `text`;
        `lowered` is `text.lower()` when the caller has it already."""
        if not self.enabled:
            return False
        if self.constant:
            return True
        haystack = text if self.case_sensitive else (lowered if lowered is not None else text.lower())

        def found(keys: Sequence[str]) -> bool:
            return any(k and (k if self.case_sensitive else k.lower()) in haystack for k in keys)

        return found(self.keys) and (not self.selective or found(self.secondary_keys))


@dataclass(frozen=True)
class Lorebook:
    entries: tuple[LoreEntry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int = DEFAULT_TOKEN_BUDGET
    skipped: tuple[str, ...] = ()  # entries (and settings) dropped for a wrong type, and why
    recursive: bool = False  # the book's `recursive_scanning`
    max_recursion_steps: int = 0  # scan steps in all, the first included; 0: MAX_RECURSION_STEPS

    def activate(
        self, recent_texts: Sequence[str], count_tokens: Callable[[str], int]
    ) -> tuple[list[str], list[str]]:
        """The contents to insert (before the description, after it) for this conversation."""
        kept = self.activated(recent_texts, count_tokens)
        kept.sort(key=lambda e: e.insertion_order)
        before = [e.content for e in kept if e.position != "after_char"]
        after = [e.content for e in kept if e.position == "after_char"]
        return before, after

    def activated(self, recent_texts: Sequence[str], count_tokens: Callable[[str], int]) -> list[LoreEntry]:
        """The entries that make it into the prompt, in the order they were activated: the
        first scan, then (when the book recurses) each recursion step (see the module doc)."""
        window = "\n".join(recent_texts[-self.scan_depth :])[-MAX_SCAN_CHARS:] if self.scan_depth > 0 else ""
        levels = sorted({e.delay_until_recursion for e in self.entries if e.delay_until_recursion > 0})
        level = levels.pop(0) if levels else 0
        limit = min(self.max_recursion_steps or MAX_RECURSION_STEPS, MAX_RECURSION_STEPS)
        kept: list[LoreEntry] = []
        decided: set[int] = set()  # entries activated (kept or over budget): at most once each
        used = 0
        recursed = ""  # the contents later steps scan, besides the conversation
        step = 0
        while step < limit:
            step += 1
            recursion = step > 1
            text = window + "\n" + recursed if recursion else window
            lowered = text.lower()
            found = [
                (index, entry) for index, entry in enumerate(self.entries)
                if index not in decided
                and (recursion or not entry.delay_until_recursion)
                and not (recursion and entry.exclude_recursion)
                and entry.delay_until_recursion <= level
                and entry.matches(text, lowered)
            ]
            overflow = False
            new_text: list[str] = []
            for index, entry in sorted(found, key=lambda f: (-f[1].priority, f[1].insertion_order)):
                decided.add(index)
                cost = count_tokens(entry.content)
                if used + cost > self.token_budget:
                    overflow = True
                    continue
                kept.append(entry)
                used += cost
                if not entry.prevent_recursion and entry.content:
                    new_text.append(entry.content)
            if not self.recursive or overflow:
                break
            if new_text and len(recursed) >= MAX_RECURSION_CHARS:
                break  # as much entry text as is ever scanned
            if new_text:
                recursed = (recursed + "\n" + "\n".join(new_text))[:MAX_RECURSION_CHARS]
            elif levels:
                level = levels.pop(0)  # nothing new at this level: open the next one
            else:
                break
        return kept


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
    extensions = _extensions(raw)
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
        exclude_recursion=_flag(extensions, "exclude_recursion", False),
        prevent_recursion=_flag(extensions, "prevent_recursion", False),
        delay_until_recursion=_delay_level(extensions),
    )


def _extensions(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The free-form `extensions` object (anything else there is ignored, as it always was)."""
    value = raw.get("extensions")
    return value if isinstance(value, Mapping) else {}


def _delay_level(extensions: Mapping[str, Any]) -> int:
    """`delay_until_recursion`: false/true (level 1) or a level number (SillyTavern)."""
    value = extensions.get("delay_until_recursion")
    if isinstance(value, bool) or value is None:
        return int(bool(value))
    return _number(extensions, "delay_until_recursion", 0, 0, _MAX_ORDER)


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
    keys = 0
    for index, raw in enumerate(raw_entries if isinstance(raw_entries, list) else []):
        try:
            entry = entry_from_dict(raw)
        except LoreError as error:
            problem = f"{_entry_label(index, raw)}: {error}"
            log.warning("%s: skipping lorebook %s", origin, problem)
            skipped.append(problem)
            continue
        keys += len(entry.keys) + len(entry.secondary_keys)
        if keys > MAX_KEYS:
            problem = f"{_entry_label(index, raw)} and the rest: the book holds more than {MAX_KEYS} keys"
            log.warning("%s: skipping lorebook %s", origin, problem)
            skipped.append(problem)
            break
        entries.append(entry)
    settings = {}
    for key, default, high in (("scan_depth", DEFAULT_SCAN_DEPTH, _MAX_SCAN_DEPTH),
                               ("token_budget", DEFAULT_TOKEN_BUDGET, _MAX_TOKEN_BUDGET)):
        try:
            settings[key] = _number(book, key, default, 0, high) or default
        except LoreError as error:
            log.warning("%s: lorebook %s; using %d", origin, error, default)
            skipped.append(f"{error} (using {default})")
            settings[key] = default
    recursive = book.get("recursive_scanning")
    if recursive is not None and not isinstance(recursive, bool):
        log.warning("%s: lorebook recursive_scanning must be true or false; not recursing", origin)
        skipped.append("recursive_scanning must be true or false (not recursing)")
        recursive = False
    try:
        steps = _number(_extensions(book), "max_recursion_steps", 0, 0, _MAX_SCAN_DEPTH)
    except LoreError as error:
        log.warning("%s: lorebook %s; no step limit", origin, error)
        skipped.append(f"{error} (no step limit)")
        steps = 0
    return Lorebook(entries=tuple(entries), skipped=tuple(skipped), recursive=bool(recursive),
                    max_recursion_steps=steps, **settings)
