"""History on disk: SQLAlchemy 2 tables and queries (`store`), Alembic migrations run one
process at a time (`migrate`), retention (`retention`) and riding out a database that went
away (`reconnect`).

May import `bot.core` and `bot.roleplay` (the plain values it stores); never Discord or
the engine.
"""
