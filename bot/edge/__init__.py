"""The Discord edge: discord.py objects become plain values here (`convert`), and replies
go back out (`answering` → `reply_stream`, through `webhooks` for scene characters, with
`delivery`'s retries); `recovery` finishes what a restart left; `held_messages` keeps what
arrives while the database is away; `sharding` splits the work between processes. The bot
class (`bot`) loads the cogs (`cogs/`, discord.py extensions) and the reply buttons
(`buttons`).

May import every package below it (`lifecycle`, `storage`, `engine`, `roleplay`, `core`);
nothing of the project imports it but the application modules (`bot.service`, `bot.cli`).
"""
