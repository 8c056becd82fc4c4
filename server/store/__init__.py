"""Persistence: SQLAlchemy models, the unit of work, migrations and the event log."""
