"""/channel training-export through discord.py against the Discord stand-in, then
`export-dataset` over what the bot stored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bot.lifecycle.dataset_export import PromptLimits, export_dataset
from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import wait_for
from tests.e2e.store_waits import stored

MANAGE_CHANNELS = 1 << 4


async def test_training_export_needs_manage_channels_and_exports_the_channel(start_bot: StartBot, tmp_path: Path) -> None:
    h = await start_bot()
    d = h.discord
    channel = next(c for c in d.commands if c["name"] == "channel")
    assert int(channel["default_member_permissions"]) == MANAGE_CHANNELS, "hidden from members without it"
    assert any(o["name"] == "training-export" for o in channel["options"])

    refused = await d.slash(d.ann, d.general, "channel", sub="training-export", options={"state": "on"})
    await wait_for(lambda: refused.response_type == 4)
    assert "Manage Channels" in d.original(refused)["content"]
    assert d.original(refused)["flags"] & 64, "refusals are ephemeral"

    async def export() -> list[dict[str, str]]:
        out = tmp_path / "chats.jsonl"
        limits = PromptLimits(h.settings.n_ctx, h.settings.max_new_tokens, h.settings.history_limit)
        await export_dataset(h.store, h.bot.responder.personas, out, h.engine.count_tokens, limits)
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    h.engine.say("Paris, Ann.")
    question = await d.user_says(d.ann, d.general, "what is the capital of France?", mention_bot=True)
    await wait_for(lambda: d.replies_to(question))
    await stored(h, d.general, 2)
    assert await export() == [], "refused: the channel is not opted in"

    accepted = await d.slash(d.mod, d.general, "channel", sub="training-export", options={"state": "on"})
    await wait_for(lambda: accepted.response_type == 4)
    assert "training dataset" in d.original(accepted)["content"]
    for _ in range(100):  # the reply is exported once it is `done`
        if records := await export():
            break
        await asyncio.sleep(0.05)
    assert [r["output"] for r in records] == ["Paris, User 1."]
    assert records[0]["instruction"].endswith("User 1: @Hermes what is the capital of France?")
    assert "Ann" not in json.dumps(records) and str(d.ann.id) not in json.dumps(records)

    off = await d.slash(d.mod, d.general, "channel", sub="training-export", options={"state": "off"})
    await wait_for(lambda: off.response_type == 4)
    assert await export() == []
