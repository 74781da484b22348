"""Names of identities that cannot block their removal, and approvals counted by identity.

Users gain `name_key` (unique among live users: names that read alike are one name, see
wardgate/names.py), `former_name` (the name a removed identity had; its `name` becomes
`#removed-<uid>`, which fits the column whatever the name was) and `revoked_before` (what was issued
to the identity before it was removed stays dead after a restore). Review decisions gain `by_id`, the
uid of who decided: approvals count identities, not names. Reviews gain `agent_id`: the agent that
asked, by its API key or its provider (Identity.agent_id), not by a name another key may carry.

Revision ID: 0016
Revises: 0015
"""

import hashlib
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def _key(name: str) -> str:  # wardgate.names.name_key as of this revision
    return hashlib.sha256(unicodedata.normalize("NFKC", name).casefold().encode("utf-8", "surrogatepass")).hexdigest()[:40]


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("name_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("former_name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("revoked_before", sa.Float, nullable=True))
    with op.batch_alter_table("review_decisions") as batch:
        batch.add_column(sa.Column("by_id", sa.String(32), nullable=True))
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("agent_id", sa.String(255), nullable=True))
    conn = op.get_bind()
    users = sa.table("users", sa.column("id"), sa.column("uid"), sa.column("name"), sa.column("name_key"),
                     sa.column("former_name"), sa.column("removed_at"))
    taken: set[str] = set()
    for row in conn.execute(sa.select(users.c.id, users.c.uid, users.c.name, users.c.removed_at).order_by(users.c.id)).all():
        if row.removed_at is not None:
            former = row.name.split("#removed-", 1)[0]
            conn.execute(sa.update(users).where(users.c.id == row.id).values(
                name=f"#removed-{row.uid}", former_name=former, name_key=None))
            continue
        key = _key(row.name)
        if key in taken:  # an older live user already reads alike: this one keeps its name, its own key
            key = f"{key}#{row.uid}"
        taken.add(key)
        conn.execute(sa.update(users).where(users.c.id == row.id).values(name_key=key))
    op.create_index("ix_users_name_key", "users", ["name_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_users_name_key", "users")
    conn = op.get_bind()
    users = sa.table("users", sa.column("id"), sa.column("name"), sa.column("former_name"), sa.column("removed_at"))
    for row in conn.execute(sa.select(users.c.id, users.c.former_name).where(users.c.removed_at.is_not(None))).all():
        conn.execute(sa.update(users).where(users.c.id == row.id).values(name=f"{row.former_name}#removed-{row.id}"))
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("agent_id")
    with op.batch_alter_table("review_decisions") as batch:
        batch.drop_column("by_id")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("revoked_before")
        batch.drop_column("former_name")
        batch.drop_column("name_key")
