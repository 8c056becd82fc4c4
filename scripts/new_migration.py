"""Autogenerate a migration from the models against a scratch SQLite database.

Usage: python scripts/new_migration.py "message"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from server.store.migrate import alembic_config


def main(message: str) -> None:
    """Upgrade a scratch database to head, then autogenerate the difference to the models."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
            command.revision(alembic_config(conn), message=message, autogenerate=True)
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "change")
