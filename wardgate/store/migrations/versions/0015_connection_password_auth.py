"""Connections gain `password_auth`: which password requests of the upstream server the gateway answers.
"scram-sha-256" (the default, existing connections included) answers only SCRAM, which hands the server
nothing it could replay; "any" also answers md5 and cleartext requests. A stored connection to a server
that asks for md5 or a cleartext password must be set to "any" to keep working.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("password_auth", sa.String(16), nullable=False, server_default="scram-sha-256"))


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("password_auth")
