"""Imported personas belong to the server (or the DM) where they were imported — through
real discord.py, with a second server owned by a stranger."""

from __future__ import annotations

import sys

import pytest

from tests.card_files import png_card, v3_card
from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import GUILD2_ID, GUILD_ID, FakeDiscord, User, wait_for


async def import_card(d: FakeDiscord, user: User, channel: int, name: str, description: str) -> str:
    before = len(d.followups)
    card = v3_card()
    card["data"]["name"], card["data"]["description"] = name, description
    await d.slash(user, channel, "persona", sub="import", files={"card": (f"{name}.png", png_card(card))})
    reply = await wait_for(lambda: d.followups[before:] and d.followups[-1])
    return reply["content"]


async def listed(d: FakeDiscord, user: User, channel: int) -> str:
    shown = await d.slash(user, channel, "persona", sub="list")
    await wait_for(lambda: shown.response_type == 4)
    return d.original(shown)["content"]


async def test_an_import_belongs_to_its_server_and_never_replaces_anothers(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    assert "Imported **Nova**" in await import_card(d, d.stranger, d.other_general, "Nova", "the stranger's Nova")
    assert "Imported **Nova**" in await import_card(d, d.mod, d.general, "Nova", "our Nova")
    personas = h.bot.responder.personas
    assert personas[f"g{GUILD2_ID}/nova"].description == "the stranger's Nova"
    assert personas[f"g{GUILD_ID}/nova"].description == "our Nova", "same name, another scope: both kept"
    assert "`nova`" in await listed(d, d.ann, d.random), "seen in every channel of its server"
    in_dm = await listed(d, d.ann, d.dm)
    assert "nova" not in in_dm, "a server's import is not seen in a DM"
    chosen = await d.slash(d.mod, d.general, "persona", sub="set", options={"name": "nova"})
    await wait_for(lambda: chosen.response_type == 4)
    assert (await h.store.state(f"discord:{d.general}")).persona == f"g{GUILD_ID}/nova"


async def test_dm_imports_are_private_and_shipped_personas_read_only(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    assert "Imported **Pip**" in await import_card(d, d.ann, d.dm, "Pip", "Ann's own")
    assert f"u{d.ann.id}/pip" in h.bot.responder.personas
    assert "pip" not in await listed(d, d.mod, d.general)
    refused = await import_card(d, d.mod, d.general, "Marlowe", "a fake Marlowe")
    assert "shipped with the bot" in refused
    assert h.bot.responder.personas["marlowe"].description != "a fake Marlowe"


async def test_a_quota_per_server(start_bot: StartBot, monkeypatch: pytest.MonkeyPatch) -> None:
    h = await start_bot()
    # The module discord.py loaded as the extension (load_extension executes it anew).
    monkeypatch.setattr(sys.modules[type(h.bot.get_cog("Personas")).__module__], "PERSONA_QUOTA", 2)
    d = h.discord
    people = [d.mod, d.owner, User(100000000000000099, "Another", permissions=d.mod.permissions)]
    results = [await import_card(d, person, d.general, f"Card {i}", "x") for i, person in enumerate(people)]
    assert "Imported" in results[0] and "Imported" in results[1]
    assert "the most it may keep (2)" in results[2]
    assert sum(k.startswith(f"g{GUILD_ID}/") for k in h.bot.responder.personas) == 2
