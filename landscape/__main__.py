"""``python -m landscape`` (and ``torchrun -m landscape``) runs the command line."""

from landscape_cli.main import main

main()
