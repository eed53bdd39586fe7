"""``python -m manager.cli``: the same as the ``skyferry`` console script."""

from manager.cli import main

main()
