"""Alembic migrations that own the bot's database schema (applied by `bot.storage.migrate`)."""
