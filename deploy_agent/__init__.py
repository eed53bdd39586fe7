"""Skyferry deploy_agent component."""
