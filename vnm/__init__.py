"""Skyferry vnm component."""
