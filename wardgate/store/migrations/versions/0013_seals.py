"""Seals: every recorded session and statement row bound into the audit chain (recording/seals.py).

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seals",
        sa.Column("event_seq", sa.Integer, primary_key=True),
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("part", sa.String(20), nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
    )
    op.create_index("ix_seals_row", "seals", ["session_id", "seq"])


def downgrade() -> None:
    op.drop_table("seals")
