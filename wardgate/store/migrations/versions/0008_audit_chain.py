"""The audit hash chain: events get a sequence number and hashes; the chain head and signed checkpoints.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from wardgate.recording.audit import GENESIS, chain

    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer, nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))
        batch.create_index("ix_events_seq", ["seq"], unique=True)
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
    )
    # Events recorded before the chain existed join it in the order they happened.
    conn = op.get_bind()
    cols = ("id", "at", "kind", "outcome", "user_name", "agent", "source", "client_addr", "detail")
    rows = [dict(zip(cols, r, strict=True)) for r in conn.execute(sa.text(f"SELECT {', '.join(cols)} FROM events ORDER BY at, id"))]
    seq, head = chain(rows, 0, GENESIS)
    for r in rows:
        conn.execute(sa.text("UPDATE events SET seq = :seq, prev_hash = :prev_hash, hash = :hash WHERE id = :id"), r)
    conn.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash)"), {"seq": seq, "hash": head})


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_seq")
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
