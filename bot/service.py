"""Run the Discord bot from settings (what `python -m bot` does): serve the operators' probes
(METRICS_ADDR: /metrics, /healthz at once, /readyz once Discord, the engine and the database
are), open the runtime (database, personas, engine), connect, and on SIGTERM or SIGINT shut
down gracefully: no new work (not ready any more), the replies under way end with their
final state in Discord and in the store, then the gateway, the engine and the database
close."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import discord

from bot.core.settings import Settings
from bot.edge.bot import HermesBot, create_bot
from bot.lifecycle.responder import Responder
from bot.runtime import open_runtime
from bot.telemetry import metrics
from bot.telemetry.probes import Probes, parse_address

log = logging.getLogger(__name__)


class Readiness:
    """What /readyz asks, of the parts as they start: each check is False until its part is up."""

    def __init__(self) -> None:
        self.responder: Responder | None = None
        self.bot: HermesBot | None = None

    def discord(self) -> bool:
        bot = self.bot
        return bot is not None and bot.is_ready() and not bot.is_closed() and not bot.stopping

    def engine(self) -> bool:
        return self.responder is not None and self.responder.engine.health.healthy

    async def database(self) -> bool:
        return self.responder is not None and await self.responder.store.ping()

    def attach(self, responder: Responder) -> None:
        """The runtime is open: the engine's gauges read it from now on."""
        self.responder = responder
        engine = responder.engine
        fleet = getattr(engine, "fleet", None)
        metrics.watch_engine(lambda: engine.queue_depth, lambda: float(engine.health.healthy),
                             engine.slot_usage, fleet if callable(fleet) else None)


async def start_probes(settings: Settings, readiness: Readiness) -> Probes | None:
    address = parse_address(settings.metrics_addr)
    if address is None:
        return None
    probes = Probes(*address, checks={"discord": readiness.discord, "engine": readiness.engine,
                                      "database": readiness.database})
    await probes.start()
    metrics.watch_discord(readiness.discord)
    return probes


async def serve(settings: Settings) -> None:
    token = settings.require_token()
    readiness = Readiness()
    probes = await start_probes(settings, readiness)  # /healthz answers while the model loads
    try:
        await _serve(settings, token, readiness)
    finally:
        if probes is not None:
            await probes.close()


async def _serve(settings: Settings, token: str, readiness: Readiness) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with open_runtime(settings) as responder:
        readiness.attach(responder)
        if stop.is_set():
            return
        bot = create_bot(settings, responder)
        readiness.bot = bot
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
    except OSError as error:
        if "METRICS_ADDR" not in str(error):
            raise
        raise SystemExit(f"error: {error}") from None
    except discord.LoginFailure as error:
        raise SystemExit(f"error: Discord refused the token ({error}); check DISCORD_TOKEN") from None
    except discord.PrivilegedIntentsRequired:
        raise SystemExit(
            "error: enable the Message Content intent in the Developer Portal (Bot → Privileged "
            "Gateway Intents) and restart"
        ) from None
