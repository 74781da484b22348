"""The web console's sessions, pending sign-ins and used sign-in links, in the store (shared by replicas).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_state",
        sa.Column("key", sa.String(96), primary_key=True),
        sa.Column("user_name", sa.String(128), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_console_state_user_name", "console_state", ["user_name"])
    op.create_index("ix_console_state_expires_at", "console_state", ["expires_at"])


def downgrade() -> None:
    op.drop_table("console_state")
