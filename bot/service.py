"""Run the Discord bot from settings (what `python -m bot` does): open the runtime (database,
personas, engine), connect, and on SIGTERM or SIGINT shut down gracefully: no new work, the
replies under way end with their final state in Discord and in the store, then the gateway,
the engine and the database close."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import discord

from bot.core.settings import Settings
from bot.edge.bot import create_bot
from bot.runtime import open_runtime

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    token = settings.require_token()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with open_runtime(settings) as responder:
        if stop.is_set():
            return
        bot = create_bot(settings, responder)
        async with bot:
            runner = asyncio.create_task(bot.start(token))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                started = time.monotonic()
                log.info("stop signal received: finishing the replies under way")
                await bot.shutdown()
                log.info("Discord side closed in %.2f s; closing the engine and the database", time.monotonic() - started)
            stopping.cancel()
            await runner
    if stop.is_set():
        # Everything is stored and closed. A model download or load still running in a
        # worker thread (a /reload-model) would hold the exit for minutes: abandon it.
        logging.shutdown()
        os._exit(0)


def run(settings: Settings) -> None:
    settings.require_token()  # fail before loading a 40 GB model
    try:
        asyncio.run(serve(settings))
    except discord.LoginFailure as error:
        raise SystemExit(f"error: Discord refused the token ({error}); check DISCORD_TOKEN") from None
    except discord.PrivilegedIntentsRequired:
        raise SystemExit(
            "error: enable the Message Content intent in the Developer Portal (Bot → Privileged "
            "Gateway Intents) and restart"
        ) from None
