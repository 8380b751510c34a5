"""``python -m lunaseg`` runs the command-line interface."""

from lunaseg.cli import run

run()
