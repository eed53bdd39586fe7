"""Skyferry migrater component."""
