"""Retention: messages older than RETENTION_DAYS are deleted, at start and every hour."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from bot.core.conversation import utcnow
from bot.storage.store import Store

log = logging.getLogger(__name__)
PURGE_EVERY_SECONDS = 3600.0


async def purge_forever(store: Store, days: int) -> None:
    """Run until cancelled; nothing to do when `days` is 0 (keep everything)."""
    if days <= 0:
        return
    while True:
        try:
            deleted = await store.purge_older_than(utcnow() - timedelta(days=days))
            if deleted:
                log.info("retention: deleted %d messages older than %d days", deleted, days)
        except Exception:
            log.exception("retention purge failed; trying again in an hour")
        await asyncio.sleep(PURGE_EVERY_SECONDS)
