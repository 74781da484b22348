"""Reviews of held statements and the decisions of their approvers.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("requester", sa.String(128), nullable=False, index=True),
        sa.Column("agent", sa.String(128), nullable=True),
        sa.Column("connection", sa.String(128), nullable=False),
        sa.Column("statement", sa.Text, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("rules", sa.JSON, nullable=False),
        sa.Column("approvers", sa.JSON, nullable=False),
        sa.Column("min_approvals", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=True),
        sa.Column("executed_at", sa.Float, nullable=True),
        sa.Column("session_id", sa.String(32), nullable=True),
    )
    op.create_table(
        "review_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("review_id", sa.String(32), sa.ForeignKey("reviews.id"), nullable=False, index=True),
        sa.Column("by", sa.String(128), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("review_decisions")
    op.drop_table("reviews")
