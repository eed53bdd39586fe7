"""Skyferry capture_agent component."""
