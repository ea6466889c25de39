"""``python -m loupelive``: the command line."""

from .cli import main

main()
