"""Alembic environment: runs migrations on the connection Wardgate hands over (see store.Store.migrate)."""

from alembic import context

from wardgate.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
