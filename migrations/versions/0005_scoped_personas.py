"""Imported personas belong to where they were imported: their key gets a scope
("g<server id>/", or "u<user id>/" for a DM). Cards imported before scopes existed go to
the person who imported them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

personas = sa.table("imported_personas", sa.column("id", sa.BigInteger), sa.column("key", sa.String),
                    sa.column("imported_by", sa.String))


def upgrade() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.select(personas.c.id, personas.c.key, personas.c.imported_by)).all():
        if "/" not in row.key:
            new_key = f"u{row.imported_by}/{row.key}"[:100]
            connection.execute(personas.update().where(personas.c.id == row.id).values(key=new_key))


def downgrade() -> None:
    connection = op.get_bind()
    seen: set[str] = set()
    for row in connection.execute(sa.select(personas.c.id, personas.c.key).order_by(personas.c.id)).all():
        short = row.key.rpartition("/")[2]
        if short in seen:  # two scopes had the same name: only one survives without scopes
            connection.execute(personas.delete().where(personas.c.id == row.id))
            continue
        seen.add(short)
        connection.execute(personas.update().where(personas.c.id == row.id).values(key=short))
