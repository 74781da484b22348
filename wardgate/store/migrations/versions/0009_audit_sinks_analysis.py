"""Audit delivery cursors, per-statement decisions and results, session risk analyses, settings snapshots.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_sink_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("statements") as batch:
        batch.add_column(sa.Column("decision", sa.String(16), nullable=True))
        batch.add_column(sa.Column("rules", sa.JSON, nullable=True))
        batch.add_column(sa.Column("params", sa.JSON, nullable=True))
        batch.add_column(sa.Column("result", sa.JSON, nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("purged_at", sa.Float, nullable=True))
    op.create_table(
        "analyses",
        sa.Column("session_id", sa.String(32), primary_key=True),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("explanation", sa.Text, nullable=False),
        sa.Column("findings", sa.JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_table(
        "snapshots",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("snapshots")
    op.drop_table("analyses")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("statements") as batch:
        for c in ("result", "params", "rules", "decision"):
            batch.drop_column(c)
    op.drop_table("audit_sink_cursors")
