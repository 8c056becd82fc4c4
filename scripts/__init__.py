"""Developer scripts: stub generation, migrations, demo pictures."""
