"""Skyferry bus component."""
