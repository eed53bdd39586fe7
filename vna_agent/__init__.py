"""Skyferry vna_agent component."""
