"""The seeder: realistic test data for a migration job (``python -m seed``)."""
