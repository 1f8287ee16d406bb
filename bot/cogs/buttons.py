"""The buttons under a reply: Stop while it is written, Regenerate once it is final.

They are DynamicItems whose custom id carries the asker's id, so they keep working after a
restart; their clicks go to the Chat cog.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord

if TYPE_CHECKING:
    from bot.cogs.chat import Chat


class StopButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hermes:stop:(?P<user>\d+)"):
    """Ends the generation under way; what was written stays."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Stop", style=discord.ButtonStyle.danger, custom_id=f"hermes:stop:{requester_id}"
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> StopButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _chat_cog(interaction).stop(interaction, self.requester_id)


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hermes:regen:(?P<user>\d+)"):
    """Replaces the reply with a new one."""

    def __init__(self, requester_id: int, disabled: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label="Regenerate",
                style=discord.ButtonStyle.secondary,
                custom_id=f"hermes:regen:{requester_id}",
                disabled=disabled,
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> RegenerateButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _chat_cog(interaction).regenerate(interaction, self.requester_id)


def _chat_cog(interaction: discord.Interaction) -> Chat:
    from bot.cogs.chat import Chat

    cog = interaction.client.get_cog("Chat")  # type: ignore[attr-defined]
    assert isinstance(cog, Chat)
    return cog


def controls(requester_id: int, running: bool) -> discord.ui.View:
    """Stop and a disabled Regenerate while the reply is written; then Regenerate alone."""
    view = discord.ui.View(timeout=None)
    if running:
        view.add_item(StopButton(requester_id))
    view.add_item(RegenerateButton(requester_id, disabled=running))
    return view
