"""Skyferry manager component."""
