"""Alembic environment: Threadline runs migrations in-process on a connection it passes in."""

from alembic import context

from threadline.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via `alembic` CLI, which Threadline does not need
    raise RuntimeError("run migrations through threadline.store.Store.migrate()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
