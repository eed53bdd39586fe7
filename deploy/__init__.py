"""Deployment: systemd units, NATS configurations, install scripts and the lab (:mod:`deploy.lab`)."""
