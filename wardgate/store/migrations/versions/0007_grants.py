"""Access grants: reviews of kind "access" carry the window asked for and, once approved, its end.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("duration", sa.Float, nullable=True))
        batch.add_column(sa.Column("window_end", sa.Float, nullable=True))
        batch.add_column(sa.Column("reason", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("reason")
        batch.drop_column("window_end")
        batch.drop_column("duration")
