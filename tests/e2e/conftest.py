"""Fixtures of the end-to-end tests."""

from tests.e2e.overlay_fixtures import vnas_for

__all__ = ["vnas_for"]
