"""Exec results kept for long-polls in the store, so that any replica answers them.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exec_results",
        sa.Column("session_id", sa.String(32), primary_key=True),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("envelope", sa.JSON, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_exec_results_expires_at", "exec_results", ["expires_at"])


def downgrade() -> None:
    op.drop_table("exec_results")
