"""Discord calls that survive Discord's bad moments: retried with backoff on 5xx (503
included, which discord.py itself does not retry) and on connection errors, for a bounded
time. Anything else (403, 404, 400) is not retried: the caller decides what it means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import discord

from bot.telemetry import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = 30.0  # how long one Discord call is retried before it counts as failed
FIRST_DELAY, MAX_DELAY = 0.5, 5.0


def is_transient(error: BaseException) -> bool:
    """Discord's 5xx, a dropped or refused connection, a timeout: worth another try."""
    if isinstance(error, discord.HTTPException):
        return error.status >= 500
    return isinstance(error, aiohttp.ClientError | OSError | asyncio.TimeoutError)


def is_gone(error: BaseException) -> bool:
    """The message (or channel) is not there any more: 404, or 10008 Unknown Message."""
    return isinstance(error, discord.NotFound)


async def retried(
    call: Callable[[], Awaitable[T]], what: str, seconds: float | None = None
) -> T:
    """Run `call` (a fresh coroutine each try) until it succeeds, retrying transient
    failures with exponential backoff for `seconds` (default `RETRY_SECONDS`); then the
    last error is raised."""
    deadline = time.monotonic() + (RETRY_SECONDS if seconds is None else seconds)
    delay = FIRST_DELAY
    while True:
        try:
            return await call()
        except Exception as error:
            left = deadline - time.monotonic()
            retrying = is_transient(error) and left > 0
            if isinstance(error, discord.HTTPException | aiohttp.ClientError | OSError | asyncio.TimeoutError):
                metrics.discord_failed(error.status if isinstance(error, discord.HTTPException) else 0, retrying)
            if not retrying:
                raise
            log.warning("Discord failed to %s (%s); retrying in %.1f s", what, _describe(error), min(delay, left))
            await asyncio.sleep(min(delay, left))
            delay = min(MAX_DELAY, delay * 2)


def _describe(error: BaseException) -> str:
    if isinstance(error, discord.HTTPException):
        return f"HTTP {error.status}"
    return type(error).__name__
