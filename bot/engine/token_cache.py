"""Token counts remembered by engines whose tokenizer is far away (a server's `/tokenize`) or
asked often (the prompt is fitted into the context one turn at a time): counts by a digest
of the text (LRU), and the last few whole tokenizations, since the prompt just counted is
usually the one submitted next. Thread-safe: prompts are built off the event loop."""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable

COUNT_CACHE = 8192  # token counts remembered (by a digest of the text)
TOKENS_CACHE = 16  # whole tokenizations remembered


def digest(text: str) -> bytes:
    """A short, stable key for `text` (lone surrogates included)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class TokenCache:
    def __init__(self, counts: int = COUNT_CACHE, tokens: int = TOKENS_CACHE) -> None:
        self._lock = threading.Lock()
        self._limits = (counts, tokens)
        self._counts: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._tokens: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()

    def count(self, text: str, tokenize: Callable[[str], list[int] | None]) -> int | None:
        """The number of tokens in `text`, remembered or from `tokenize` (None: it had no answer,
        and nothing is remembered)."""
        key = digest(text)
        with self._lock:
            count = self._counts.get(key)
            if count is not None:
                self._counts.move_to_end(key)
                return count
        tokens = tokenize(text)
        if tokens is None:
            return None
        with self._lock:
            self._counts[key] = len(tokens)
            if len(self._counts) > self._limits[0]:
                self._counts.popitem(last=False)
            self._tokens[key] = tokens
            if len(self._tokens) > self._limits[1]:
                self._tokens.popitem(last=False)
        return len(tokens)

    def tokens(self, text: str) -> list[int] | None:
        """`text`'s token ids if it was among the last texts counted."""
        with self._lock:
            return self._tokens.get(digest(text))

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tokens.clear()
