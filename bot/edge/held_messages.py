"""Messages that arrived while the database was away for longer than the retries wait.

They are not dropped: each is kept here, in arrival order (at most `MAX_HELD`), and handled
again, oldest first, once the database answers `ping` (every `PING_SECONDS`). While some are
kept, newer messages queue behind them, so history keeps Discord's order. What is still
kept when the process stops is back-filled from Discord at the next start (`bot.edge.recovery`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bot.storage.reconnect import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_HELD = 1000
PING_SECONDS = 2.0


class HeldMessages(Generic[T]):
    """Kept messages and the task that hands them back (see the module doc). `handle` must
    raise `DatabaseUnavailable` for a message it could not store: it is kept, at the front."""

    def __init__(self, handle: Callable[[T], Awaitable[None]], ping: Callable[[], Awaitable[bool]],
                 limit: int = MAX_HELD, interval: float = PING_SECONDS) -> None:
        self._handle = handle
        self._ping = ping
        self.limit = limit
        self.interval = interval
        self._items: deque[T] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def hold(self, item: T) -> bool:
        """Keep `item` until the database is back; False when `limit` are kept already."""
        if len(self._items) >= self.limit:
            return False
        if not self._items:
            log.warning("keeping the messages that arrive until the database is back")
        self._items.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="held-messages")
        return True

    async def _drain(self) -> None:
        while self._items:
            if not await self._ping():
                await asyncio.sleep(self.interval)
                continue
            try:
                await self._handle(self._items[0])
            except DatabaseUnavailable:
                continue  # away again: kept, at the front
            except Exception:  # noqa: BLE001 - one bad message must not keep the others
                log.exception("a kept message could not be handled")
            self._items.popleft()
        log.info("every message kept while the database was away is handled")

    async def close(self) -> None:
        """Stop handing messages back (the next start back-fills them from Discord)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._items:
            log.warning("%d message(s) kept for the database are left to the next start's back-fill", len(self._items))
