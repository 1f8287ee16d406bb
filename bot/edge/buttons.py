"""The buttons under a reply: Stop while it is written; once it is final, Regenerate and
Continue, and, when it has several alternatives, ◀ 2/3 ▶ to page through them (swipes).

They are DynamicItems whose custom id carries the asker's id, so they keep working after a
restart; Stop and Regenerate go to the Chat cog, the others to the Swipes cog.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import discord

from bot.roleplay.swipes import SwipeView


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


class SwipeButton(discord.ui.DynamicItem[discord.ui.Button],
                  template=r"hermes:swipe:(?P<way>prev|next):(?P<user>\d+)"):
    """Shows the previous or the next alternative of the reply."""

    def __init__(self, requester_id: int, way: str, disabled: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label="◀" if way == "prev" else "▶",
                style=discord.ButtonStyle.secondary,
                custom_id=f"hermes:swipe:{way}:{requester_id}",
                disabled=disabled,
            )
        )
        self.requester_id = requester_id
        self.way = way

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> SwipeButton:
        return cls(int(match["user"]), match["way"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await _swipes_cog(interaction).swipe(interaction, self.requester_id, -1 if self.way == "prev" else 1)


class ContinueButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hermes:continue:(?P<user>\d+)"):
    """Has the model write on after the reply's text."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Continue", style=discord.ButtonStyle.secondary, custom_id=f"hermes:continue:{requester_id}"
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> ContinueButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _swipes_cog(interaction).continue_reply(interaction, self.requester_id)


class _ChatActions(Protocol):
    """What Stop and Regenerate ask of the Chat cog."""

    async def stop(self, interaction: discord.Interaction, requester_id: int) -> None: ...

    async def regenerate(self, interaction: discord.Interaction, requester_id: int) -> None: ...


class _SwipeActions(Protocol):
    """What ◀ ▶ and Continue ask of the Swipes cog."""

    async def swipe(self, interaction: discord.Interaction, requester_id: int, step: int) -> None: ...

    async def continue_reply(self, interaction: discord.Interaction, requester_id: int) -> None: ...


def _cog(interaction: discord.Interaction, name: str) -> Any:
    """The cog `name` of the bot the interaction came to (loaded by then: it adds the buttons)."""
    cog = interaction.client.get_cog(name)  # type: ignore[attr-defined]
    assert cog is not None, f"the {name} cog is not loaded"
    return cog


def _swipes_cog(interaction: discord.Interaction) -> _SwipeActions:
    return _cog(interaction, "Swipes")


def _chat_cog(interaction: discord.Interaction) -> _ChatActions:
    return _cog(interaction, "Chat")


def controls(requester_id: int, running: bool, swipes: SwipeView | None = None) -> discord.ui.View:
    """Stop and a disabled Regenerate while the reply is written; then ◀ n/m ▶ (with
    several alternatives), Regenerate and Continue."""
    view = discord.ui.View(timeout=None)
    if running:
        view.add_item(StopButton(requester_id))
        view.add_item(RegenerateButton(requester_id, disabled=True))
        return view
    if swipes is not None and swipes.count > 1:
        view.add_item(SwipeButton(requester_id, "prev", disabled=swipes.rank == 1))
        view.add_item(discord.ui.Button(label=swipes.label, disabled=True, custom_id=f"hermes:swipes:{requester_id}"))
        view.add_item(SwipeButton(requester_id, "next", disabled=swipes.rank == swipes.count))
    view.add_item(RegenerateButton(requester_id))
    view.add_item(ContinueButton(requester_id))
    return view
