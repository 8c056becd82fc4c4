"""Alembic migrations, kept inside the package and run by the service at start-up."""
