"""``python -m influencelab`` = the ``influencelab`` command."""

from .cli import main

main()
