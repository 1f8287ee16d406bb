"""Sampled tokens' bytes in, the text safe to show out (UTF-8 decoded incrementally, cut at
the first stop string): pure, used by the batching engine's scheduler."""

from __future__ import annotations

import codecs


class TextStream:
    """The bytes of sampled tokens in, the text safe to show out.

    UTF-8 is decoded incrementally: a character split over tokens waits for its last
    bytes, and an invalid byte becomes U+FFFD instead of spoiling the rest of the reply.
    The text is cut at the first stop string; what could still be the start of one is
    held back until it is clear.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # decoded so far (up to a stop string, once one is found)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hold = max((len(s) - 1 for s in self.stop), default=0)

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add a token's bytes (`final`: no more will come); return the new text that is
        safe to show ("" while a character or a possible stop string is incomplete)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(data, final)
        hits = [h for stop in self.stop if (h := self.text.find(stop, max(0, self.sent - len(stop)))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.rest()
        safe = max(self.sent, len(self.text) - self._hold)
        piece, self.sent = self.text[self.sent : safe], safe
        return piece

    def rest(self) -> str:
        """At the end: what was held back (a partial character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", True)
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
