"""Alembic migrations: the registry's schema (``invardiff-registry db upgrade``)."""
