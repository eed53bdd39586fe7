"""Benchmarks of Skyferry; see ``bench/README.md`` for how to run each one."""
