"""Identities keyed by a stable id: users gain `uid`, `kind` (user or service), the IdP `subject` that
keys a signed-in person, when they were removed and when the IdP last confirmed their groups. Every
record that belongs to someone (sessions, reviews, API keys, exec results, console sessions) names
that id, so a later user of the same name starts with nothing. Service accounts become users of kind
service named `svc:<name>`.

Revision ID: 0014
Revises: 0013
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

OWNED = (("sessions", "user_id"), ("reviews", "requester_id"), ("api_keys", "user_id"), ("exec_results", "user_id"),
         ("console_state", "user_id"))


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("uid", sa.String(32), nullable=True))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="user"))
        batch.add_column(sa.Column("subject", sa.String(255), nullable=True))
        batch.add_column(sa.Column("removed_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("seen_at", sa.Float, nullable=True))
    for table, column in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(column, sa.String(32), nullable=True))
    conn = op.get_bind()
    users = sa.table("users", sa.column("id"), sa.column("uid"), sa.column("name"), sa.column("source"),
                     sa.column("subject"), sa.column("kind"), sa.column("groups", sa.JSON), sa.column("scram_salt"),
                     sa.column("disabled"), sa.column("created_at"), sa.column("removed_at"))
    uid_of: dict[str, str] = {}
    for row in conn.execute(sa.select(users.c.id, users.c.name, users.c.source, users.c.disabled)).all():
        uid = secrets.token_hex(8)
        values: dict[str, object] = {"uid": uid}
        if row.source.startswith("oidc:"):
            values["subject"] = row.name  # what keyed them before; the next sign-in rekeys by `sub`
        if row.disabled and "#removed-" in row.name:
            values["removed_at"] = 0.0
        name = row.name
        if row.source == "apikey" and not name.startswith("svc:"):  # made for a service key's caller
            name = values["name"] = f"svc:{name}"
            values["kind"] = "service"
        conn.execute(sa.update(users).where(users.c.id == row.id).values(**values))
        if not row.disabled:
            uid_of[name] = uid
    # Service accounts: one user of kind service per service key name.
    keys = sa.table("api_keys", sa.column("id"), sa.column("kind"), sa.column("name"), sa.column("user_name"),
                    sa.column("user_id"))
    for row in conn.execute(sa.select(keys.c.id, keys.c.kind, keys.c.user_name)).all():
        if row.kind == "service":
            principal = row.user_name if row.user_name.startswith("svc:") else f"svc:{row.user_name}"
            if principal not in uid_of:
                uid = secrets.token_hex(8)
                conn.execute(sa.insert(users).values(uid=uid, name=principal, source="apikey", kind="service", groups=[],
                                                     scram_salt=secrets.token_bytes(16), disabled=False,
                                                     created_at=0.0))
                uid_of[principal] = uid
            conn.execute(sa.update(keys).where(keys.c.id == row.id)
                         .values(user_name=principal, user_id=uid_of[principal]))
        elif row.user_name in uid_of:
            conn.execute(sa.update(keys).where(keys.c.id == row.id).values(user_id=uid_of[row.user_name]))
    # Records made before: attached to whoever holds the name now (the only owner there was). Not the
    # sessions: their rows are sealed as recorded; one without a user_id belongs to the holder of its
    # name who existed when it started (Store.owned_by).
    for table, column, name_column in (("reviews", "requester_id", "requester"),
                                       ("exec_results", "user_id", "user_name"),
                                       ("console_state", "user_id", "user_name")):
        t = sa.table(table, sa.column(column), sa.column(name_column))
        for name, uid in uid_of.items():
            conn.execute(sa.update(t).where(t.c[name_column] == name).values({column: uid}))
    with op.batch_alter_table("users") as batch:
        batch.create_index("ux_users_uid", ["uid"], unique=True)
        batch.create_index("ix_users_subject", ["source", "subject"])
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_index("ix_reviews_requester_id", "reviews", ["requester_id"])


def downgrade() -> None:
    op.drop_index("ix_reviews_requester_id", "reviews")
    op.drop_index("ix_sessions_user_id", "sessions")
    for table, column in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
    with op.batch_alter_table("users") as batch:
        batch.drop_index("ix_users_subject")
        batch.drop_index("ux_users_uid")
        for column in ("seen_at", "removed_at", "subject", "kind", "uid"):
            batch.drop_column(column)
