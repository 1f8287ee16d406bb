"""Lorebooks (`character_book` of Character Card V2/V3): entries whose keys appear in the
recent conversation are inserted into the prompt, within the book's token budget.

Rules, following the V2 spec: an entry is active when it is enabled and either constant
or one of its keys appears in the last `scan_depth` messages (case-sensitively only when
the entry says so); a `selective` entry also needs one of its `secondary_keys`. Active
entries are ordered by `insertion_order`; when they exceed `token_budget`, the lowest
`priority` ones are dropped first. `position` puts an entry before or after the
character's description.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, (str, int, float)))
    return ()


def lorebook_from_dict(book: Mapping[str, Any]) -> Lorebook:
    entries = []
    for raw in book.get("entries") or []:
        if not isinstance(raw, Mapping):
            continue
        entries.append(
            LoreEntry(
                keys=_strings(raw.get("keys")),
                content=str(raw.get("content") or ""),
                enabled=bool(raw.get("enabled", True)),
                constant=bool(raw.get("constant", False)),
                selective=bool(raw.get("selective", False)),
                secondary_keys=_strings(raw.get("secondary_keys")),
                case_sensitive=bool(raw.get("case_sensitive", False)),
                insertion_order=int(raw.get("insertion_order") or 0),
                priority=int(raw.get("priority") or 0),
                position=str(raw.get("position") or "before_char"),
            )
        )
    return Lorebook(
        entries=tuple(entries),
        scan_depth=int(book.get("scan_depth") or DEFAULT_SCAN_DEPTH),
        token_budget=int(book.get("token_budget") or DEFAULT_TOKEN_BUDGET),
    )
