"""API keys; agents beside users on credentials and sessions; where a user came from.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("agent", sa.String(128), nullable=True),
        sa.Column("groups", sa.JSON, nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("last_used_at", sa.Float, nullable=True),
    )
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("agent", sa.String(128), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("agent", sa.String(128), nullable=True))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("source", sa.String(64), nullable=False, server_default="local"))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("source")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("agent")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("agent")
    op.drop_table("api_keys")
