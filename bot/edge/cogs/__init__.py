"""Slash commands and listeners, one discord.py extension per concern (each module's
`setup(bot)` adds its cog). Cogs reach the bot through the `HermesBot` given to them and
reach each other through `bot.get_cog`; nothing imports a cog but another cog."""
