"""Skyferry mapper component."""
