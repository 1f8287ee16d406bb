"""Fixtures for end-to-end tests: the fake Discord server, and the real bot (real discord.py,
real SQLite store, the scripted or the real llama.cpp engine) connected to it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.edge.bot import HermesBot, create_bot
from bot.engine.base import Engine
from bot.roleplay.personas import load_personas, merge_imported
from bot.lifecycle.responder import Responder
from bot.core.settings import Settings, load_settings
from bot.storage.store import Store
from tests.e2e.fake_discord import FakeDiscord
from tests.e2e.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Harness:
    discord: FakeDiscord
    bot: HermesBot
    store: Store
    engine: Engine
    settings: Settings


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """The Discord stand-in; FAKE_DISCORD_LATENCY=0.1 makes every answer to the bot come
    0.1 s after the request took effect (Discord's own latency), to hunt for races between
    what people see and what the bot has stored (a test that clears faults clears it too)."""
    server = FakeDiscord()
    await server.start()
    latency = float(os.environ.get("FAKE_DISCORD_LATENCY") or 0)
    if latency:
        server.answer_late("*", "*", latency)
    yield server
    await server.stop()


def e2e_settings(server: FakeDiscord, database_url: str, models_dir: Path, **extra: str) -> Settings:
    return load_settings(
        {
            "DISCORD_TOKEN": "fake-token",
            "DATABASE_URL": database_url,
            "DISCORD_API_BASE": server.api_base,
            "DISCORD_GATEWAY_URL": server.gateway_url,
            "ADMIN_USER_IDS": str(server.bob.id),
            "MODELS_DIR": str(models_dir),
            "MAX_NEW_TOKENS": "64",
            "N_CTX": "2048",
            # Summaries would take scripted replies meant for the chat (tests/e2e/test_memory.py
            # switches memory on).
            "MEMORY_SUMMARY_WORDS": "0",
            **extra,
        },
        dotenv_path=None,
    )


StartBot = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_bot(fake_discord: FakeDiscord, database_url: str, tmp_path: Path) -> AsyncIterator[StartBot]:
    """Start (or restart) the bot against the fake server; all are closed at the end."""
    running: list[tuple[HermesBot, asyncio.Task, Store]] = []

    async def start(engine: Engine | None = None, **settings_extra: str) -> Harness:
        settings = e2e_settings(fake_discord, database_url, tmp_path / "models", **settings_extra)
        store = await Store.open(settings.database_url, retry_seconds=settings.database_retry_seconds)
        engine = engine or ScriptedEngine(n_ctx=settings.n_ctx)
        personas = merge_imported(load_personas(REPO / "personas"), await store.imported_personas())
        responder = Responder(settings, store, engine, personas)
        bot = create_bot(settings, responder, guild_ready_timeout=0.1)
        fake_discord.identified.clear()
        task = asyncio.create_task(bot.start(settings.require_token()))
        running.append((bot, task, store))
        await asyncio.wait_for(bot.wait_until_ready(), 20)
        return Harness(fake_discord, bot, store, engine, settings)

    yield start
    for bot, task, store in running:
        await bot.close()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
