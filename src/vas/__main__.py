"""``python -m vas`` runs the ``vas`` command."""

from vas.cli import main

main()
